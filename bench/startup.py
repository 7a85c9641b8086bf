"""Start-up cost of the compiled kernels (issue 26: a later `dlcli train` starts within 0.5 s of DLCLI_KERNELS=numpy):
the same tiny `dlcli train` (configs/mnist.yaml, 600 samples, one epoch, 300 test samples) as a fresh process on
each kernel path, rounds alternating; prints each path's wall-clock and CPU seconds (best and median) and the
difference of the bests. The first numba run of a machine compiles the kernels into numba's cache: run once before.

    DLCLI_DATA_DIR=../shared/datasets python bench/startup.py [--rounds 5] [--config configs/mnist.yaml]

Wall-clock is what a user waits; on a busy machine it swells with the load (the CPU seconds barely move), so say
the load average beside it (printed).
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SETS = ["data.limit=600", "data.test_limit=300", "train.epochs=1"]
PATHS = ("numpy", "numba")


def run_once(config: str, kernels: str, runs: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one `dlcli train` on the kernel path `kernels`."""
    argv = [sys.executable, "-c", "from dlcli.cli import main; main()", "train", config, "--runs-dir", runs, "--quiet"]
    argv += [a for s in SETS for a in ("--set", s)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env={**os.environ, "DLCLI_KERNELS": kernels}, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default="configs/mnist.yaml")
    args = parser.parse_args()
    times = {path: [] for path in PATHS}
    with tempfile.TemporaryDirectory() as runs:
        run_once(args.config, "numba", runs)  # numba's cache filled, files in the page cache
        for _ in range(args.rounds):
            for path in PATHS:
                times[path].append(run_once(args.config, path, runs))
    print(f"`dlcli train {args.config}` ({', '.join(SETS)}), best and median of {args.rounds} rounds alternating, "
          f"load {os.getloadavg()[0]:.1f}")
    for path, rows in times.items():
        walls, cpus = [w for w, _ in rows], [c for _, c in rows]
        print(f"  DLCLI_KERNELS={path:5s}  wall {min(walls):5.2f} s (median {statistics.median(walls):5.2f})  "
              f"CPU {min(cpus):5.2f} s (median {statistics.median(cpus):5.2f})")
    best = {path: (min(w for w, _ in rows), min(c for _, c in rows)) for path, rows in times.items()}
    print(f"  numba - numpy: wall {best['numba'][0] - best['numpy'][0]:+.2f} s, CPU "
          f"{best['numba'][1] - best['numpy'][1]:+.2f} s (target: wall within 0.5 s)")


if __name__ == "__main__":
    main()
