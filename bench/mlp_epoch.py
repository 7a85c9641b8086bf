"""One epoch of the book's MNIST MLP (Flatten -> Dense 512 relu -> Dense 10 softmax, RMSprop 1e-3, batch 128)
in dlcli and in PyTorch CPU (2 threads), in one process run; prints seconds per epoch and the ratio.

    pip install torch==2.13.0        # the bench-only peer (CPU build)
    DLCLI_DATA_DIR=../shared/datasets python bench/mlp_epoch.py [--repeats 3]

Each side gets the same float32 arrays, batch size, shuffling scheme (a fresh permutation per epoch, batches
gathered by index) and optimizer; the figure is the best of `--repeats` epochs after one warm-up epoch.
"""
import argparse
import os
import time

import numpy as np


def mnist_arrays():
    from dlcli.data import load_dataset

    ds = load_dataset({"type": "mnist"})
    return ds.x_train.reshape(len(ds.x_train), -1).astype(np.float32), ds.y_train.astype(np.int64)


def dlcli_epoch(x, y, batch_size, repeats):
    from dlcli import layers, models
    from dlcli.engine.layer import set_random_seed

    set_random_seed(0)
    model = models.Sequential([layers.Dense(512, activation="relu", input_shape=(784,)),
                               layers.Dense(10, activation="softmax")])
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0, seed=0)  # warm-up
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        history = model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0, seed=r)
        times.append(time.perf_counter() - start)
    return min(times), history.history["accuracy"][-1]


def torch_epoch(x, y, batch_size, repeats):
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    # Keras' RMSprop defaults (rho 0.9, eps 1e-7) expressed in PyTorch's names.
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(tx), generator=g)
        correct = 0
        for i in range(0, len(tx), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = tx[idx], ty[idx]
            opt.zero_grad(set_to_none=False)
            out = net(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            opt.step()
            correct += int((out.argmax(1) == yb).sum())
        return correct / len(tx)

    epoch(0)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        acc = epoch(r + 1)
        times.append(time.perf_counter() - start)
    return min(times), acc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    x, y = mnist_arrays()
    d_sec, d_acc = dlcli_epoch(x, y, args.batch_size, args.repeats)
    print(f"dlcli   {d_sec:6.2f} s/epoch  (train accuracy {d_acc:.4f})")
    try:
        t_sec, t_acc = torch_epoch(x, y, args.batch_size, args.repeats)
    except ImportError:
        print("torch not installed: pip install torch==2.13.0 to compare")
        return
    print(f"pytorch {t_sec:6.2f} s/epoch  (train accuracy {t_acc:.4f}, {os.cpu_count()} cores, 2 threads)")
    print(f"ratio dlcli/pytorch: {d_sec / t_sec:.2f}x  (target <= 1.2x)")


if __name__ == "__main__":
    main()
