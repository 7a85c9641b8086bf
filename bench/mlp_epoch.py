"""One epoch of the book's MNIST MLP (Flatten -> Dense 512 relu -> Dense 10 softmax, RMSprop 1e-3, batch 128)
in dlcli and in PyTorch CPU (2 threads), in one process run; prints seconds per epoch and the ratio.

    pip install torch==2.13.0        # the bench-only peer (CPU build)
    DLCLI_DATA_DIR=../shared/datasets python bench/mlp_epoch.py [--repeats 3]

Each side gets the same float32 arrays, batch size, shuffling scheme (a fresh permutation per epoch, batches
gathered by index) and optimizer; epochs alternate between peers and the best of `--repeats` counts.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import keras_peer  # noqa: E402
from common import (compare, fit_runner, mnist_train, peers, report_ratio,  # noqa: E402
                    torch_epoch_runner)

TARGETS = ("<= 0.8x", "<= 1.0x")  # issue 26: dlcli / PyTorch, dlcli / Keras + JAX


def dlcli_runner(x, y, batch_size, units=512):
    import numpy as np

    from dlcli import layers, models

    model = models.Sequential([layers.Dense(units, activation="relu", input_shape=(784,)),
                               layers.Dense(10, activation="softmax")])
    model.build(rng=np.random.default_rng(0))
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return fit_runner(model, x, y, batch_size)


def torch_runner(torch, x, y, batch_size, units=512):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, units), torch.nn.ReLU(), torch.nn.Linear(units, 10))
    return torch_epoch_runner(torch, net, net.parameters(), x, y, batch_size, torch.nn.CrossEntropyLoss(),
                              lambda out, yb: int((out.argmax(1) == yb).sum()))


def runners(x, y, batch_size=128, units=512) -> dict:
    """{peer: one epoch over x, y}; PyTorch only when installed."""
    return peers(lambda: dlcli_runner(x, y, batch_size, units), lambda t: torch_runner(t, x, y, batch_size, units),
                 lambda k: keras_peer.fit_runner(keras_peer.mlp(k, units), x, y, batch_size))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    times, best = compare(runners(*mnist_train((784,)), args.batch_size), args.repeats)
    for name, sec in best.items():
        print(f"{name:8s} {sec:6.2f} s/epoch  (best of {args.repeats} interleaved epochs after one warm-up)")
    report_ratio(best, TARGETS[0], times)


if __name__ == "__main__":
    main()
