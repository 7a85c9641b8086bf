"""The training loop's per-batch fixed cost (issue 26: under 2% of the book MLP's step): one `fit` epoch of the book's
MNIST MLP (Dense 512 relu -> Dense 10 softmax, RMSprop, batch 128) with the model's own work timed apart: forward,
loss, backward and the optimizer's update. Everything else `fit` spends per batch (the batch gather, metrics, logs,
callbacks, the progress bar, the step's bookkeeping: gradients cleared, divergence gate, norms) is the fixed cost,
reported per batch and as a fraction of the model's step.

    DLCLI_DATA_DIR=../shared/datasets python bench/loop_overhead.py [--rounds 3] [--threads 1] [--bar]

Each kernel path (DLCLI_KERNELS=numba, numpy) runs in its own process, rounds alternating between them; each round
is one epoch after a warm-up one, and the round with the smallest fraction counts. Times are the training thread's
CPU time (time.thread_time) with --threads 1 (a shared machine does not inflate it; the shuffled batch's gather runs
on a thread of its own, a group of batches ahead: the process' CPU time is shown beside it), wall-clock otherwise.
--bar draws the progress bar (to /dev/null) as a terminal run would. --parts also runs each round without each
LEFT_OUT piece (a no-op in its place, numba path only): the difference is that piece's share of the fixed cost, the
caches it leaves cold or warm for the rest included, where a timer of its own would add its clock reads (~0.7 us
each, more with the caches cold) to the figures it splits.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import blas_kernels  # noqa: E402


def timed(fn, clock, spent):
    """fn, adding the seconds of each call to spent[0] and counting it in spent[1]."""
    def call(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += clock() - start
            spent[1] += 1
    return call


def timer_cost(clock, calls=20000) -> tuple[float, float]:
    """(seconds a timed() wrapper adds inside the interval it measures, seconds it adds outside it) per call, from
    `calls` wrapped no-op calls against bare ones: the bench's own clock reads (a thread_time call is a system call,
    ~0.7 us), which are neither the model's work nor fit's. The smallest of 5 tries."""
    spent, bare = [0.0, 0], lambda: None
    wrapped, tries = timed(bare, clock, spent), []
    for _ in range(5):
        spent[0] = 0.0
        start = clock()
        for _ in range(calls):
            wrapped()
        total = clock() - start
        start = clock()
        for _ in range(calls):
            bare()
        tries.append((spent[0] / calls, (total - spent[0] - (clock() - start)) / calls))
    return min(t[0] for t in tries), min(t[1] for t in tries)


# --parts: the pieces of the fixed cost a round can run without (the figures then, not the training, are the point)
LEFT_OUT = {"gate": ("dlcli.trainer", "Run", "_divergence_gate"),  # the loss rules; the norms every NORM_EVERY steps
            "metrics": ("dlcli.metrics", "RunningLogs", "update")}  # the running loss and accuracy


def measure(rounds: int, bar: bool, clock, without: str = "") -> list[dict]:
    """Each round's (seconds of the fit epoch, of the model's own work, batches); `without` a LEFT_OUT piece."""
    import importlib

    import numpy as np

    from common import mnist_train
    from dlcli import layers, models
    from dlcli.callbacks import ProgressLogger
    from dlcli.trainer import Run
    from dlcli.data import Dataset

    x, y = mnist_train((784,))
    model = models.Sequential([layers.Dense(512, activation="relu", input_shape=(784,)),
                               layers.Dense(10, activation="softmax")])
    model.build(rng=np.random.default_rng(0))
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    spent = [0.0, 0]
    graph = model.graph
    graph.forward, graph.backward = timed(graph.forward, clock, spent), timed(graph.backward, clock, spent)
    model.compute_loss = timed(model.compute_loss, clock, spent)
    model.optimizer.apply = timed(model.optimizer.apply, clock, spent)
    if without:
        module, cls, method = LEFT_OUT[without]
        setattr(getattr(importlib.import_module(module), cls), method, lambda *args, **kwargs: None)
    devnull = open(os.devnull, "w")
    out = []
    for r in range(rounds + 1):  # the first is a warm-up (kernels loaded, buffers allocated)
        callbacks = [ProgressLogger(1, len(x), stream=devnull, bar=True)] if bar else []
        spent[0], spent[1] = 0.0, 0
        start, process, wall = clock(), time.process_time(), time.perf_counter()
        Run(model, callbacks, verbose=0, rng=np.random.default_rng(r)).fit(Dataset([x], [y]), epochs=1,
                                                                           batch_size=128)
        total = clock() - start
        if r:
            out.append({"total": total, "model": spent[0], "calls": spent[1], "batches": -(-len(x) // 128),
                        "process": time.process_time() - process, "wall": time.perf_counter() - wall})
    inside, outside = timer_cost(clock)
    for row in out:  # the bench's own clock reads taken out: the model's inside its intervals, the rest outside
        row["model"] -= row["calls"] * inside
        row["total"] -= row["calls"] * (inside + outside)
        row["timers"] = row["calls"] * (inside + outside)
    return out


def median_fixed(rows) -> float:
    """The median round's fixed cost, seconds a batch."""
    return sorted((r["total"] - r["model"]) / r["batches"] for r in rows)[len(rows) // 2]


def child(args):
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(json.dumps(measure(1, args.bar, clock, args.without)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (1: CPU time of the one thread)")
    parser.add_argument("--bar", action="store_true", help="draw the progress bar (to /dev/null)")
    parser.add_argument("--parts", action="store_true", help="also run without each LEFT_OUT piece (numba path)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--without", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    threads = str(args.threads)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "NUMBA_NUM_THREADS": threads}
    argv = [sys.executable, __file__, "--child", "--threads", threads] + (["--bar"] if args.bar else [])
    results = {"numba": [], "numpy": []}
    runs = [(path, "") for path in results] + [("numba", piece) for piece in LEFT_OUT if args.parts]
    without = {piece: [] for piece in LEFT_OUT if args.parts}
    for _ in range(args.rounds):
        for path, piece in runs:
            done = subprocess.run(argv + ["--without", piece], env={**env, "DLCLI_KERNELS": path},
                                  capture_output=True, text=True, check=True)
            (without[piece] if piece else results[path]).extend(json.loads(done.stdout.splitlines()[-1]))
    what = "CPU time, 1 thread" if args.threads == 1 else f"wall-clock, {args.threads} threads"
    print(f"fit's fixed cost per batch, book MLP, batch 128 ({what}; best of {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.1f}; {blas_kernels()})")
    for path, rows in results.items():
        fractions = [(r["total"] - r["model"]) / r["model"] for r in rows]
        best = rows[min(range(len(rows)), key=fractions.__getitem__)]
        fixed = (best["total"] - best["model"]) / best["batches"]
        step = best["model"] / best["batches"]
        print(f"  DLCLI_KERNELS={path:5s}  step {step * 1e3:6.2f} ms, fixed {fixed * 1e6:5.0f} us "
              f"= {min(fractions):.1%} of the step (rounds {', '.join(f'{f:.1%}' for f in fractions)}; target < 2%; "
              f"the bench's own timers, {best['timers'] / best['batches'] * 1e6:.1f} us a batch, taken out)")
        if path == "numba" and without:  # each piece's share: the median with it minus the median without it
            print(f"  {'':20s} medians, us a batch: fixed {median_fixed(rows) * 1e6:.0f}; " + ", ".join(
                f"without the {piece} {median_fixed(left) * 1e6:.0f}" for piece, left in without.items()))
        if args.threads == 1:  # the gather thread's share: the process' CPU beyond the training thread's
            print(f"  {'':20s} process CPU {best['process'] / best['batches'] * 1e3:6.2f} ms/batch, "
                  f"wall {best['wall'] / best['batches'] * 1e3:6.2f} ms/batch")


if __name__ == "__main__":
    main()
