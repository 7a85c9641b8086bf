"""Training from a memory-mapped array larger than the memory it may use (issue 14): one epoch of the book's MLP
from a .npy of --gib GiB (MNIST rows tiled, float32) opened with type: npy, against the same array loaded into
memory; peak memory of each, split into the process's own (anonymous) memory and mapped file pages.

    DLCLI_DATA_DIR=../shared/datasets python bench/mmap_epoch.py [--gib 2] [--budget-mib 512] [--rounds 2]

Each epoch runs in a child process sampling /proc/self/status. File pages of a mapping count in RSS but are page
cache the kernel drops under pressure; the bounded part is the anonymous memory. "cold" drops the file's cached
pages first (posix_fadvise DONTNEED), so the epoch reads from disk, as it must when the array exceeds RAM.
No cgroup is used: the sandbox's cgroups are not ours to change.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import mnist_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(mode: str, folder: Path, cold: bool):
    from dlcli.builder import build_model
    from dlcli.config import load_config
    from dlcli.data import Dataset, load_dataset
    from dlcli.trainer import Run

    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k in peaks:
                peaks[k] = max(peaks[k], status_kib(k))
            stop.wait(0.05)

    threading.Thread(target=sample, daemon=True).start()
    if cold:
        fd = os.open(folder / "x.npy", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    cfg = load_config(ROOT / "configs" / "mnist.yaml").to_dict()
    cfg["model"]["input_shape"] = [784]
    cfg["model"]["layers"] = cfg["model"]["layers"][1:]  # rows are already flat
    model = build_model(cfg)
    start = time.perf_counter()
    if mode == "mmap":
        d = load_dataset({"type": "npy", "x": str(folder / "x.npy"), "y": str(folder / "y.npy")})
        x = d.x_train
    else:
        x = np.load(folder / "x.npy")
        d = load_dataset({"type": "npy", "x": str(folder / "x.npy"), "y": str(folder / "y.npy")})
    load = time.perf_counter() - start
    start = time.perf_counter()
    Run(model, verbose=0, rng=np.random.default_rng(0)).fit(Dataset(x, [d.y_train]), epochs=1, batch_size=128)
    seconds = time.perf_counter() - start
    stop.set()
    print(json.dumps({"mode": mode, "cold": cold, "load": load, "epoch": seconds,
                      **{k: v / 1024 for k, v in peaks.items()}}))


def make_array(folder: Path, gib: float):
    if (folder / "done").exists():
        return
    x, y = mnist_train((784,))
    rows = int(gib * 2**30 // (784 * 4))
    mm = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=(rows, 784))
    for start in range(0, rows, len(x)):
        stop = min(rows, start + len(x))
        mm[start:stop] = x[:stop - start]
    mm.flush()
    del mm
    np.save(folder / "y.npy", np.resize(y, rows))
    (folder / "done").write_text("ok")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--budget-mib", type=float, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "dlcli-bench-mmap")
    parser.add_argument("--child", choices=["mmap", "memory"])
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.dir, args.cold)
    args.dir.mkdir(parents=True, exist_ok=True)
    make_array(args.dir, args.gib)
    size = (args.dir / "x.npy").stat().st_size / 2**20
    print(f"array: {size:,.0f} MiB = {size / args.budget_mib:.1f}x a {args.budget_mib:.0f} MiB budget")
    results = {}
    for r in range(args.rounds):
        for mode, cold in (("memory", False), ("mmap", False), ("mmap", True)):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(args.dir)]
                                 + (["--cold"] if cold else []), capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            key = f"{mode}{' (cold page cache)' if cold else ''}"
            print(f"  round {r + 1} {key}: epoch {row['epoch']:.2f} s, peak RSS {row['VmRSS']:,.0f} MiB "
                  f"(anonymous {row['RssAnon']:,.0f}, file pages {row['RssFile']:,.0f})", flush=True)
            if key not in results or row["epoch"] < results[key]["epoch"]:
                results[key] = row
    base = results["memory"]["epoch"]
    for key, row in results.items():
        print(f"{key:28s} epoch {row['epoch']:6.2f} s ({row['epoch'] / base:.2f}x in memory)  load {row['load']:.2f} s"
              f"  peak anonymous {row['RssAnon']:,.0f} MiB ({row['RssAnon'] / size:.0%} of the array)")


if __name__ == "__main__":
    main()
