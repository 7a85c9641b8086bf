"""The book's MNIST convnet (Conv2D 32 -> MaxPool -> Conv2D 64 -> MaxPool -> Conv2D 64 -> Flatten -> Dense 64 ->
Dense 10, RMSprop, batch 64): seconds per training epoch in dlcli and in PyTorch CPU (2 threads), in one run.

    DLCLI_DATA_DIR=../shared/datasets python bench/convnet_epoch.py [--batches 40] [--rounds 3] [--memory]

The epoch time is extrapolated: each peer trains `--batches` batches per round (forward, backward, optimizer
step), rounds alternate between peers, the best round counts, and that is scaled to 60,000 / 64 = 938 batches.
`--memory` also trains one real epoch on all 60,000 images through the CLI in a child process and reports its
peak resident memory (target: under 2 GiB).
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import keras_peer  # noqa: E402
from common import (child_peak_rss_mib, compare, keras_rmsprop, mnist_train, peers, report_ratio,  # noqa: E402
                    torch_train_steps_runner, train_steps_runner)

CONFIG = "configs/mnist_cnn.yaml"
BATCH = 64
EPOCH_BATCHES = -(-60000 // BATCH)
TARGETS = ("<= 0.8x", "<= 0.5x")  # issue 26: dlcli / PyTorch, dlcli / Keras + JAX


def torch_net(torch):
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(576, 64),
                         nn.ReLU(), nn.Linear(64, 10))


def torch_runner(torch, x, y, batch=BATCH):
    net = torch_net(torch)
    return torch_train_steps_runner(torch, net, keras_rmsprop(torch, net.parameters()), x, y, batch)


def runners_for(x, y, batch=BATCH) -> dict:
    """{peer: one pass of training steps over x, y}; PyTorch only when installed."""
    return peers(lambda: train_steps_runner(CONFIG, x, y, batch), lambda t: torch_runner(t, x, y, batch),
                 lambda k: keras_peer.fit_runner(keras_peer.convnet(k), x, y, batch, shuffle=False,
                                                   lead_in=True))


def runners(batches=40) -> dict:
    return runners_for(*mnist_train((28, 28, 1), limit=batches * BATCH))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args()
    times, best = compare(runners(args.batches), args.rounds)
    for name, sec in best.items():
        print(f"{name:8s} {sec / args.batches * 1000:7.1f} ms/batch  -> {sec / args.batches * EPOCH_BATCHES:6.1f} "
              f"s/epoch (extrapolated from {args.batches} batches x best of {args.rounds} rounds)")
    report_ratio(best, TARGETS[0], times)
    if args.memory:
        with tempfile.TemporaryDirectory() as runs_dir:
            code, mib = child_peak_rss_mib([sys.executable, "-m", "dlcli.cli", "train", CONFIG,
                                            "--set", "train.epochs=1", "--runs-dir", runs_dir, "--quiet"])
        print(f"peak resident memory, one epoch on all 60,000 images: {mib:,.0f} MiB (target < 2048 MiB)"
              + ("" if code == 0 else f"  [the run failed: exit {code}]"))


if __name__ == "__main__":
    main()
