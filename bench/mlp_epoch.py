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
from common import interleaved_rounds, mnist_train, report_ratio, torch_or_none  # noqa: E402


def dlcli_runner(x, y, batch_size, units=512):
    import numpy as np

    from dlcli import layers, models

    model = models.Sequential([layers.Dense(units, activation="relu", input_shape=(784,)),
                               layers.Dense(10, activation="softmax")])
    model.build(rng=np.random.default_rng(0))
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    seeds = iter(range(1000))
    return lambda: model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0, seed=next(seeds))


def torch_runner(torch, x, y, batch_size, units=512):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, units), torch.nn.ReLU(), torch.nn.Linear(units, 10))
    # Keras' RMSprop defaults (rho 0.9, eps 1e-7) expressed in PyTorch's names.
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    seeds = iter(range(1000))

    def epoch():
        order = torch.randperm(len(tx), generator=torch.Generator().manual_seed(next(seeds)))
        correct = 0
        for i in range(0, len(tx), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = tx[idx], ty[idx]
            opt.zero_grad(set_to_none=False)
            out = net(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            opt.step()
            correct += int((out.argmax(1) == yb).sum())  # the same accuracy bookkeeping dlcli does
        return correct / len(tx)
    return epoch


def runners(x, y, batch_size=128, units=512) -> dict:
    """{peer: one epoch over x, y}; PyTorch only when installed."""
    runs = {"dlcli": dlcli_runner(x, y, batch_size, units)}
    torch = torch_or_none()
    if torch is not None:
        runs["pytorch"] = torch_runner(torch, x, y, batch_size, units)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    runs = runners(*mnist_train((784,)), args.batch_size)
    for fn in runs.values():  # warm-up epoch
        fn()
    times = interleaved_rounds(runs, args.repeats)
    best = {name: min(t) for name, t in times.items()}
    for name, sec in best.items():
        print(f"{name:8s} {sec:6.2f} s/epoch  (best of {args.repeats} interleaved epochs after one warm-up)")
    report_ratio(best, "<= 1.0x", times)

if __name__ == "__main__":
    main()
