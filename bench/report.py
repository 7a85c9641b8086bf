"""Every bench side by side in one run, and how cost grows: writes bench/results/report.md (the table README
shows, with date and machine: the CPU model is printed first) and bench/results/cost_growth.png (time per sample
against batch size, sequence length and layer width). The peers: PyTorch CPU with 2 threads and Keras 3 on JAX
(CPU), each column "-" when not installed; the last row reads the book convnet's epoch from a folder of MNIST PNGs.

    pip install -e ".[bench]"
    DLCLI_DATA_DIR=../shared/datasets python bench/report.py [--quick] [--out bench/results]

Each workload alternates rounds between the peers and keeps the best of each; the spread columns give the
lowest and highest per-round ratio (each round's peers ran back to back). `--quick` shrinks every workload to a
smoke test (figures then mean little).
"""
import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import convnet_epoch  # noqa: E402
import folder_epoch  # noqa: E402
import keras_peer  # noqa: E402
import mlp_epoch  # noqa: E402
import predict_throughput  # noqa: E402
import recurrent_step  # noqa: E402
import resnet_epoch  # noqa: E402

BATCH_SIZES = (16, 32, 64, 128, 256, 512)
SEQUENCE_LENGTHS = (25, 50, 100, 200, 400)
WIDTHS = (64, 128, 256, 512, 1024, 2048)


def measure(runs: dict, rounds: int) -> dict:
    return common.compare(runs, rounds)[0]


def workloads(quick: bool, rounds: int | None = None):
    """(name, unit label, per-call divisor to that unit, runs factory, rounds, targets vs PyTorch and vs Keras)."""
    q = quick

    def r(default):
        return rounds or (1 if q else default)
    mnist = common.mnist_train((784,), limit=2048 if q else None)
    return [
        ("book MLP epoch (MNIST, batch 128)", "s per 2,048 samples" if q else "s/epoch", 1,
         lambda: mlp_epoch.runners(*mnist, 128), r(3), mlp_epoch.TARGETS),
        ("book convnet epoch (MNIST, batch 64)", "s/epoch (extrapolated)", (12 if q else 40) / 938,
         lambda: convnet_epoch.runners(12 if q else 40), r(3), convnet_epoch.TARGETS),
        ("LSTM(32) step via fit (100x32, batch 64)", "ms/step", (2 if q else 10) / 1000,
         lambda: recurrent_step.runners("lstm", batches=2 if q else 10), r(5), recurrent_step.TARGETS["lstm"]),
        ("GRU(32) step via fit (100x32, batch 64)", "ms/step", (2 if q else 10) / 1000,
         lambda: recurrent_step.runners("gru", batches=2 if q else 10), r(5), recurrent_step.TARGETS["gru"]),
        ("fashion_mnist_resnet.yaml epoch (batch 64)", "s/epoch (extrapolated)", (2 if q else 20) / 844,
         lambda: resnet_epoch.runners(64, 2 if q else 20), r(3), resnet_epoch.TARGETS),
        ("book convnet predict (batch 512)", "ms/batch", (1 if q else 8) / 1000,
         lambda: predict_throughput.runners(512, 1 if q else 8), r(5), predict_throughput.TARGETS),
    ]


def _ratio(times: dict, best: dict, peer: str) -> str:
    """dlcli's best over the peer's best, and the spread of the per-round ratios (each round's pair back to back)."""
    if peer not in best:
        return "- | -"
    spread = sorted(a / b for a, b in zip(times["dlcli"], times[peer]))
    return f"{best['dlcli'] / best[peer]:.2f}x | {spread[0]:.2f}-{spread[-1]:.2f}x"


def summary_rows(quick: bool, rounds: int | None = None) -> list[str]:
    rows = ["| workload | dlcli | PyTorch | Keras + JAX | dlcli/PyTorch (best/best) | per-round spread | "
            "dlcli/Keras | per-round spread | targets (PyTorch, Keras) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, unit, per, factory, workload_rounds, targets in workloads(quick, rounds):
        times = measure(factory(), workload_rounds)
        best = {k: min(v) for k, v in times.items()}
        cell = {k: f"{best[k] / per:.3g} {unit}" if k in best else "-" for k in ("dlcli", "pytorch", "keras")}
        row = (f"| {name} | {cell['dlcli']} | {cell['pytorch']} | {cell['keras']} | {_ratio(times, best, 'pytorch')} | "
               f"{_ratio(times, best, 'keras')} | {targets[0]}, {targets[1]} |")
        print(row, flush=True)
        rows.append(row)
    rows.append(folder_epoch.report_row(640 if quick else 6400, rounds or (1 if quick else 3)))
    print(rows[-1], flush=True)
    return rows


def growth(quick: bool) -> dict:
    """{panel: (x label, xs, {peer: seconds per sample})}: one warm-up and the best of a few interleaved rounds
    per point, about the same number of samples at every point."""
    rounds = 1 if quick else 3
    panels = {}
    x, y = common.mnist_train((28, 28, 1), limit=512 if quick else 1024)
    curve = {"dlcli": [], "pytorch": []}
    for bs in BATCH_SIZES:
        runs = convnet_epoch.runners_for(x, y, bs)
        for k, v in measure(runs, rounds).items():
            curve.setdefault(k, []).append(min(v) / len(x))
        print(f"convnet training, batch {bs}: " + ", ".join(f"{k} {v[-1] * 1e3:.3f} ms/sample"
                                                            for k, v in curve.items()), flush=True)
    panels["convnet training step vs batch size"] = ("batch size", BATCH_SIZES, curve)
    curve = {"dlcli": [], "pytorch": []}
    for steps in SEQUENCE_LENGTHS:
        batches = 1 if quick else max(2, 400 // steps)
        runs = recurrent_step.runners("lstm", 64, steps, 32, 32, batches)
        for k, v in measure(runs, rounds).items():
            curve.setdefault(k, []).append(min(v) / (64 * batches))
        print(f"LSTM(32) training, {steps} steps: " + ", ".join(f"{k} {v[-1] * 1e3:.3f} ms/sample"
                                                               for k, v in curve.items()), flush=True)
    panels["LSTM(32) training step (batch 64) vs sequence length"] = ("time steps", SEQUENCE_LENGTHS, curve)
    curve = {"dlcli": [], "pytorch": []}
    xm, ym = common.mnist_train((784,), limit=512 if quick else 128 * 40)  # 40 batches per epoch
    for width in WIDTHS:
        runs = mlp_epoch.runners(xm, ym, 128, width)
        for k, v in measure(runs, rounds).items():
            curve.setdefault(k, []).append(min(v) / len(xm))
        print(f"MLP training, width {width}: " + ", ".join(f"{k} {v[-1] * 1e3:.4f} ms/sample"
                                                          for k, v in curve.items()), flush=True)
    panels["MLP epoch (batch 128) vs hidden width"] = ("hidden units", WIDTHS, curve)
    return panels


def plot(panels: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for ax, (title, (label, xs, curve)) in zip(axes, panels.items()):
        for peer, style in (("dlcli", "o-"), ("pytorch", "s--"), ("keras", "^:")):
            if peer in curve:
                ax.plot(xs, [v * 1e3 for v in curve[peer]], style, label=peer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.set_xlabel(label)
        ax.set_ylabel("ms per sample")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    import numpy as np

    torch = common.torch_or_none()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__} "
            f"({common.blas_kernels()}), PyTorch {torch.__version__ if torch else '-'} (2 threads), {keras_peer.versions()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, help="alternating rounds per workload (default 3-5, with --quick 1): "
                                                   "--quick --rounds 3 gives ratios on a busy machine in minutes")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--no-growth", action="store_true", help="the summary table only")
    args = parser.parse_args()
    if common.torch_or_none() is None:
        sys.exit("bench/report.py compares with PyTorch: pip install -e '.[bench]'")
    os.makedirs(args.out, exist_ok=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"CPU: {machine()}", flush=True)
    rows = summary_rows(args.quick, args.rounds)
    lines = [f"Measured {when} on {machine()}; ratios are dlcli's time over each peer's, from the same rounds.", "",
             *rows]
    if not args.no_growth:
        plot(growth(args.quick), os.path.join(args.out, "cost_growth.png"))
        lines += ["", "![time per sample against batch size, sequence length and width](cost_growth.png)"]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.out, 'report.md')}" + ("" if args.no_growth else " and cost_growth.png"))


if __name__ == "__main__":
    main()
