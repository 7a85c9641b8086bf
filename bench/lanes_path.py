"""The critical path of a training step on lanes (engine/lanes.py), from thread CPU: what a busy machine's wall
times cannot show. Each lanes run's parts are timed in the thread that runs them; the step on idle cores would take
about the calling thread's work outside the runs (serial) plus, for each run, its longest part.

    DLCLI_DATA_DIR=../shared/datasets python bench/lanes_path.py [convnet|resnet|mlp] [--steps 30] [--threads 2]
        [--layers] [--idle]

Prints, medians (and best) over the steps: the calling thread's CPU, its serial part (outside every lanes run),
its CPU in the runs besides its own parts (hand-overs, and waits for the lanes while they poll: a spinning wait is
CPU), the runs' longest parts, all parts, the estimate (serial + longest parts) and the even split ((serial + all
parts) / threads, every part alike).
`--layers` adds the same per layer, forward and backward. `--idle`: short parts (lanes.run's `short`) go to the
lanes as on a machine with a core to spare, with no polling (the lanes sleep between runs), where a busy machine
would keep them on the calling thread. Thread CPU includes what the other jobs' caches and memory traffic cost, not
what two lanes cost each other (README: 17-33% per part side by side on the quiet machine).
"""
import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict

from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(__file__))
import convnet_epoch  # noqa: E402
import resnet_epoch  # noqa: E402
from common import config_model, mnist_train  # noqa: E402

from dlcli.engine import lanes  # noqa: E402

# net: (data, config, sample shape, batch)
NETS = {"resnet": ("fashion_mnist", resnet_epoch.CONFIG, (28, 28, 1), 64),
        "convnet": ("mnist", convnet_epoch.CONFIG, (28, 28, 1), 64),
        "mlp": ("mnist", "configs/mnist.yaml", (28, 28), 128)}
COLUMNS = ("calling thread", "serial", "hand-overs", "longest parts", "all parts")


def timed_step(model, x, y):
    """step() -> {layer pass or "step": [calling thread, serial, hand-overs, longest parts, all parts] in seconds}."""
    caller, current, record = threading.get_ident(), ["step"], defaultdict(lambda: [0.0] * len(COLUMNS))
    run = lanes.run

    def timed_run(work, parts, short=False, halfway=None):
        times, between = [], [0.0]  # (on the calling thread, thread CPU) of each lane's share; halfway's between

        def timed(work):
            def share(run):
                start = time.thread_time()
                out = list(work(run))
                times.append((threading.get_ident() == caller, time.thread_time() - start))
                return out
            return share

        def timed_between():  # the caller's alone, as it was between two runs: serial
            start = time.thread_time()
            halfway[0]()
            between[0] += time.thread_time() - start
        start = time.thread_time()
        out = run(timed(work), parts, short, halfway and (timed_between, timed(halfway[1])))
        spent, own = time.thread_time() - start - between[0], sum(t for mine, t in times if mine)
        halves = [times] if halfway is None else [times[:len(times) // 2], times[len(times) // 2:]]
        for key in {current[0], "step"}:
            record[key][1] -= spent
            record[key][2] += spent - own
            record[key][3] += sum(max(t for _, t in half) for half in halves)
            record[key][4] += sum(t for _, t in times)
        return out
    lanes.run = timed_run

    def timed_pass(layer, kind, fn):
        def call(*args, **kw):
            current[0], start = f"{layer.name} {kind}", time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                for column in (0, 1):
                    record[current[0]][column] += time.thread_time() - start
                current[0] = "step"
        return call
    for layer in model.layers:
        layer.forward, layer.backward = (timed_pass(layer, "forward", layer.forward),
                                         timed_pass(layer, "backward", layer.backward))

    def step():
        record.clear()
        start = time.thread_time()
        model.train_step([x], [y])
        record["step"][0] += time.thread_time() - start
        record["step"][1] += record["step"][0]
        return {key: list(values) for key, values in record.items()}
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("net", nargs="?", default="resnet", choices=tuple(NETS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=0, help="the net's own when 0: 64 (128 for the MLP)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", action="store_true")
    parser.add_argument("--idle", action="store_true")
    args = parser.parse_args()
    kind, config, shape, batch = NETS[args.net]
    x, y = mnist_train(shape, limit=args.batch or batch, kind=kind)
    if args.idle:
        lanes._waiter = lambda: (lambda counter, seen: False)
    step = timed_step(config_model(config), x, y)
    with threadpool_limits(args.threads, user_api="blas"):
        for _ in range(3):  # warm-up
            step()
        steps = [step() for _ in range(args.steps)]
    whole = [s["step"] for s in steps]
    estimate = [serial + longest for _, serial, _, longest, _ in whole]
    even = [(serial + every) / args.threads for _, serial, _, _, every in whole]
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s){', idle hand-overs' if args.idle else ''}; "
          f"thread CPU ms a step, median (best) of {args.steps}")
    for name, values in zip(COLUMNS, zip(*whole)):
        print(f"  {name:16s} {statistics.median(values) * 1e3:7.2f} ({min(values) * 1e3:.2f})")
    for name, values in (("estimate", estimate), ("even split", even)):
        print(f"  {name:16s} {statistics.median(values) * 1e3:7.2f} ({min(values) * 1e3:.2f})")
    if args.layers:
        print(f"  {'layer pass':28s} " + " ".join(f"{c:>14s}" for c in COLUMNS))
        for key in (k for k in steps[0] if k != "step"):
            medians = [statistics.median(s.get(key, [0.0] * len(COLUMNS))[i] for s in steps) * 1e3
                       for i in range(len(COLUMNS))]
            print(f"  {key:28s} " + " ".join(f"{m:14.3f}" for m in medians))


if __name__ == "__main__":
    main()
