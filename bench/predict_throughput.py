"""Inference throughput of the book's MNIST convnet (configs/mnist_cnn.yaml) at batch 512: images per second
through `model.predict` in dlcli and through the same network under torch.inference_mode in PyTorch CPU
(2 threads).

    DLCLI_DATA_DIR=../shared/datasets python bench/predict_throughput.py [--batches 8] [--rounds 5] [--batch 512]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import keras_peer  # noqa: E402
from common import compare, config_model, mnist_train, peers, report_ratio  # noqa: E402
from convnet_epoch import CONFIG, torch_net  # noqa: E402


# issue 26: dlcli/peer time per batch, against PyTorch and against Keras + JAX (bench/report.py reads these too)
TARGETS = ("<= 0.7x", "<= 1.0x")


def dlcli_runner(x, batch):
    model = config_model(CONFIG)
    return lambda: model.predict(x, batch_size=batch)


def torch_runner(torch, x, batch):
    net = torch_net(torch).eval()
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # PyTorch is channels-first

    def run():
        with torch.inference_mode():
            return torch.cat([torch.softmax(net(tx[i:i + batch]), 1) for i in range(0, len(tx), batch)]).numpy()
    return run


def keras_runner(keras, x, batch):
    model = keras_peer.convnet(keras)
    return lambda: model.predict(x, batch_size=batch, verbose=0)


def runners(batch=512, batches=8):
    x, _ = mnist_train((28, 28, 1), limit=batch * batches)
    return peers(lambda: dlcli_runner(x, batch), lambda t: torch_runner(t, x, batch), lambda k: keras_runner(k, x, batch))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    times, best = compare(runners(args.batch, args.batches), args.rounds)
    n = args.batch * args.batches
    for name, sec in best.items():
        print(f"{name:8s} {n / sec:9,.0f} images/s  ({sec / args.batches * 1000:.1f} ms per batch of {args.batch}, "
              f"best of {args.rounds} rounds)")
    # throughput is the inverse of time: dlcli/pytorch time <= 0.7x means throughput >= 1/0.7x
    report_ratio(best, f"{TARGETS[0]} in time", times)


if __name__ == "__main__":
    main()
