"""Shared bench helpers: interleaved best-of timing (both peers see the same machine load) and peak memory."""
import os
import subprocess
import sys
import tempfile
import time


def interleaved_rounds(runs: dict, rounds: int) -> dict:
    """Seconds of every call of each `runs[name]()`, `rounds` calls each, alternating peers round by round so a
    busy moment on the machine does not land on one side only."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def report_ratio(best: dict, target: str, times: dict | None = None):
    """Print dlcli's time over PyTorch's (best against best), and with `times` the spread of the per-round
    ratios (rounds ran back to back, so each pair saw about the same machine load)."""
    if "pytorch" not in best:
        return
    line = f"ratio dlcli/pytorch: {best['dlcli'] / best['pytorch']:.2f}x  (target {target})"
    if times is not None and len(times["dlcli"]) > 1:
        per_round = sorted(a / b for a, b in zip(times["dlcli"], times["pytorch"]))
        line += f"; per-round ratios {per_round[0]:.2f}-{per_round[-1]:.2f}x"
    print(line)


def child_peak_rss_mib(argv: list[str]) -> tuple[int, float]:
    """Run a command to completion; its exit code and its own peak resident memory (MiB): os.wait4 gives this
    child's rusage (RUSAGE_CHILDREN would report the largest of every child so far)."""
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            print(err.read(), file=sys.stderr)
    return code, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def mnist_train(shape, limit=None, kind="mnist"):
    """MNIST (or `kind`, e.g. fashion_mnist) training images reshaped to `shape` per sample (float32) and int64 labels; a clear message and
    exit 1 when the data cannot be found (set DLCLI_DATA_DIR)."""
    import numpy as np

    from dlcli.data import load_dataset
    from dlcli.errors import DlcliError

    try:
        ds = load_dataset({"type": kind, "limit": limit})
    except DlcliError as e:
        sys.exit(f"bench: {e.message}")
    return ds.x_train.reshape(-1, *shape).astype(np.float32), ds.y_train.astype(np.int64)


def torch_or_none():
    try:
        import torch
    except ImportError:
        print("torch not installed: `pip install torch==2.13.0` (the CPU build) to compare")
        return None
    torch.set_num_threads(2)
    return torch
