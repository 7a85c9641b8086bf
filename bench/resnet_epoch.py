"""`configs/fashion_mnist_resnet.yaml` (conv stem, three residual blocks with BatchNormalization, global average
pooling, Adam, batch 64): seconds per training epoch in dlcli and the same graph in PyTorch CPU (2 threads).

    DLCLI_DATA_DIR=../shared/datasets python bench/resnet_epoch.py [--batches 20] [--rounds 3] [--batch 64]

As bench/convnet_epoch.py: each peer trains `--batches` batches per round, rounds alternate, the best round is
scaled to an epoch of 54,000 / 64 = 844 batches (the config's 10% validation split held out). PyTorch pads the
stride-2 'same' conv symmetrically where TensorFlow pads bottom/right; shapes and arithmetic are the same.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import keras_peer  # noqa: E402
from common import (compare, mnist_train, peers, report_ratio, torch_train_steps_runner,  # noqa: E402
                    train_steps_runner)

CONFIG = "configs/fashion_mnist_resnet.yaml"
EPOCH_SAMPLES = 54000
TARGETS = ("<= 1.0x", "<= 1.0x")  # issue 26: dlcli / PyTorch, dlcli / Keras + JAX


def torch_net(torch):
    nn = torch.nn

    def conv_bn(cin, cout, k=3, stride=1):
        # Keras' BatchNormalization: momentum 0.99 (PyTorch counts 1 - momentum), epsilon 1e-3
        return [nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout, 1e-3, 0.01)]

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout))
            self.short = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride > 1 else nn.Identity()

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    return nn.Sequential(*conv_bn(1, 32), nn.ReLU(), nn.MaxPool2d(2), Block(32, 32, 1), Block(32, 64, 2),
                         Block(64, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, 10))


def torch_runner(torch, x, y, batch):
    torch.manual_seed(0)
    net = torch_net(torch)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)  # Keras' Adam epsilon
    return torch_train_steps_runner(torch, net, opt, x, y, batch)


def runners(batch=64, batches=20):
    x, y = mnist_train((28, 28, 1), limit=batch * batches, kind="fashion_mnist")
    return peers(lambda: train_steps_runner(CONFIG, x, y, batch), lambda t: torch_runner(t, x, y, batch),
                 lambda k: keras_peer.fit_runner(keras_peer.resnet(k), x, y, batch, shuffle=False,
                                                   lead_in=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    times, best = compare(runners(args.batch, args.batches), args.rounds)
    epoch_batches = -(-EPOCH_SAMPLES // args.batch)
    for name, sec in best.items():
        print(f"{name:8s} {sec / args.batches * 1000:7.1f} ms/batch  -> {sec / args.batches * epoch_batches:6.1f} "
              f"s/epoch (extrapolated from {args.batches} batches x best of {args.rounds} rounds)")
    report_ratio(best, TARGETS[0], times)


if __name__ == "__main__":
    main()
