"""An LSTM(32) or GRU(32) training step as training runs it: sequences of 100 steps x 32 features, batch 64,
Recurrent -> Dense(1, sigmoid), binary cross-entropy, RMSprop, through `fit` in dlcli and the equivalent loop in
PyTorch CPU (2 threads). The recurrent layer reads the model's input, so neither peer computes an input gradient.

    python bench/recurrent_step.py [--cell lstm|gru] [--rounds 5] [--batches 10] [--steps 100] [--batch 64]
        [--threads 2] [--cpu | --main]

Each round trains `--batches` batches (one `fit` epoch in dlcli: shuffling gather, metrics and all); rounds
alternate between peers and the best round counts. On a busy machine wall time says little (a peer's second thread
waits for a core): `--threads 1` runs dlcli (its BLAS, so one lane) and PyTorch on one thread, `--cpu` times process
CPU seconds instead of wall, `--main` the calling thread's CPU (with 2 threads: dlcli's training thread, whose lane
runs half of the batch's time loop). Keras + JAX keeps its own threads and shows only with wall times.
"""
import argparse
import os
import sys
import time
from contextlib import nullcontext

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import keras_peer  # noqa: E402
from common import compare, fit_runner, peers, report_ratio, torch_epoch_runner  # noqa: E402

CELLS = ("lstm", "gru")
# issue 26: dlcli/peer time per step, against PyTorch and against Keras + JAX (bench/report.py reads these too)
TARGETS = {"lstm": ("<= 0.8x", "<= 1.0x"), "gru": ("<= 0.6x", "<= 1.0x")}


def data(n, steps, features, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, steps, features)).astype(np.float32)
    y = (x[:, -5:, 0].mean(1) > 0).astype(np.float32)[:, None]
    return x, y


def dlcli_runner(cell, x, y, batch, units):
    from dlcli import layers, models

    rnn = {"lstm": layers.LSTM, "gru": layers.GRU}[cell](units, input_shape=x.shape[1:])
    model = models.Sequential([rnn, layers.Dense(1, activation="sigmoid")])
    model.build(rng=np.random.default_rng(0))
    model.compile(optimizer="rmsprop", loss="binary_crossentropy", metrics=["accuracy"])
    return fit_runner(model, x, y, batch)


def torch_runner(torch, cell, x, y, batch, units):
    nn = torch.nn
    torch.manual_seed(0)
    rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](x.shape[-1], units, batch_first=True)
    head = nn.Linear(units, 1)
    return torch_epoch_runner(torch, lambda xb: head(rnn(xb)[0][:, -1]),
                              list(rnn.parameters()) + list(head.parameters()), x, y, batch,
                              nn.BCEWithLogitsLoss(), lambda logits, yb: int(((logits > 0) == (yb > 0.5)).sum()))


def runners(cell, batch=64, steps=100, features=32, units=32, batches=10):
    x, y = data(batch * batches, steps, features)
    return peers(lambda: dlcli_runner(cell, x, y, batch, units), lambda t: torch_runner(t, cell, x, y, batch, units),
                 lambda k: keras_peer.fit_runner(keras_peer.recurrent(k, cell, steps, features, units), x, y, batch))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=CELLS, default="lstm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="dlcli's BLAS threads and PyTorch's (default 2)")
    clocks = parser.add_mutually_exclusive_group()
    clocks.add_argument("--cpu", action="store_true", help="process CPU seconds instead of wall")
    clocks.add_argument("--main", action="store_true", help="the calling thread's CPU seconds")
    args = parser.parse_args()
    clock = time.process_time if args.cpu else time.thread_time if args.main else time.perf_counter
    runs = runners(args.cell, args.batch, args.steps, 32, args.units, args.batches)
    if args.cpu or args.main:
        runs.pop("keras", None)  # XLA's threads are its own: CPU seconds would compare unlike things
    limit = nullcontext()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(args.threads, user_api="blas")
        if "pytorch" in runs:
            import torch

            torch.set_num_threads(args.threads)
    with limit:
        times, best = compare(runs, args.rounds, clock)
    what = "process CPU" if args.cpu else "training-thread CPU" if args.main else "wall"
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads or 2} thread(s); {what}")
    for name, sec in best.items():
        print(f"{name:8s} {sec / args.batches * 1000:7.2f} ms per training step ({args.cell.upper()}({args.units}), "
              f"{args.steps} steps, batch {args.batch}, best of {args.rounds} rounds of {args.batches} batches)")
    report_ratio(best, TARGETS[args.cell][0], times)


if __name__ == "__main__":
    main()
