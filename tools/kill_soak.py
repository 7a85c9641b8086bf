"""Kill soak: SIGKILL a small training run at many random moments (mid-batch, mid-checkpoint write, before the first
checkpoint), resume each time (resumes are killed too), and check the end weights are bit-identical to an
uninterrupted run's every time.

    python tools/kill_soak.py --trials 40          # by hand; prints one line per trial and a summary
    python tools/kill_soak.py --trials 3 --seed 1  # what tests/test_kill_soak.py runs in CI

A kill before the first checkpoint leaves nothing to resume: that run starts again from scratch (counted as a
restart). A kill that leaves a `.state.npz.*.tmp` behind landed inside a checkpoint write.
"""
import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = """\
name: soak
seed: 7
data: {{type: npz, path: {data}}}
model:
  input_shape: [12]
  layers:
    - {{type: Dense, units: 64, activation: relu}}
    - {{type: Dropout, rate: 0.3}}
    - {{type: Dense, units: 3, activation: softmax}}
compile:
  optimizer: {{type: adam, learning_rate: 0.01}}
  loss: sparse_categorical_crossentropy
  metrics: [accuracy]
train:
  epochs: {epochs}
  batch_size: 16
  validation_split: 0.2
  checkpoint_every: 2
  callbacks: [{{type: ReduceLROnPlateau, patience: 1, factor: 0.5, min_delta: 10}}]
"""


def write_config(folder: Path, samples: int = 800, epochs: int = 3) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 12)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)).astype(np.int64)
    np.savez(folder / "data.npz", x=x, y=y)
    path = folder / "soak.yaml"
    path.write_text(CONFIG.format(data=folder / "data.npz", epochs=epochs))
    return path


def _cmd(*args):
    return [sys.executable, "-m", "dlcli.cli", *map(str, args)]


def _weights(run: Path) -> dict:
    with np.load(run / "weights" / "last.npz") as f:
        return {k: f[k] for k in f.files}


def _run_dir(runs: Path):
    found = [p for p in runs.iterdir() if p.is_dir()] if runs.exists() else []
    return found[0] if found else None


def trial(config: Path, runs: Path, rng: random.Random, duration: float, max_kills: int = 4) -> dict:
    """Start, kill at random moments (up to max_kills times), resume until the run completes."""
    kills = mid_write = restarts = 0
    while True:
        run = _run_dir(runs)
        if run is not None and not (run / "checkpoint" / "state.npz").exists():
            shutil.rmtree(run)  # killed before its first checkpoint: nothing to resume
            restarts += 1
            run = None
        args = ("train", config, "--runs-dir", runs, "-q") if run is None else ("train", "--resume", run, "-q")
        proc = subprocess.Popen(_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # The first attempt always kills, within the first half of the reference's time, so a machine faster
        # now than when the reference ran still sees a kill; later attempts anywhere in it.
        if kills == 0 or (kills < max_kills and rng.random() < 0.85):
            try:
                proc.wait(timeout=rng.uniform(0.0, duration / 2 if kills == 0 else duration))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            run = _run_dir(runs)
            if run is not None and any((run / "checkpoint").glob(".state.npz.*.tmp")):
                mid_write += 1
                for tmp in (run / "checkpoint").glob(".state.npz.*.tmp"):
                    tmp.unlink()  # (left by the kill; the next write makes its own)
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"dlcli exited {proc.returncode} after {kills} kills:\n{err}")
        run = _run_dir(runs)
        meta = json.loads((run / "meta.json").read_text())
        return {"run": run, "kills": kills, "mid_write": mid_write, "restarts": restarts, "status": meta["status"]}


def soak(trials: int, seed: int = 0, workdir: Path | None = None, log=print) -> dict:
    rng = random.Random(seed)
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="dlcli-soak-")) if own else Path(workdir)
    try:
        config = write_config(workdir)
        start = time.perf_counter()
        done = subprocess.run(_cmd("train", config, "--runs-dir", workdir / "reference", "-q"), capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        duration = time.perf_counter() - start
        reference = _weights(_run_dir(workdir / "reference"))
        totals = {"trials": trials, "identical": 0, "kills": 0, "mid_write": 0, "restarts": 0,
                  "reference_seconds": round(duration, 2)}
        for i in range(trials):
            r = trial(config, workdir / f"trial-{i}", rng, duration)
            got = _weights(r["run"])
            same = sorted(got) == sorted(reference) and all(np.array_equal(got[k], reference[k]) for k in reference)
            totals["identical"] += same and r["status"] == "completed"
            for k in ("kills", "mid_write", "restarts"):
                totals[k] += r[k]
            log(f"trial {i + 1}/{trials}: {r['kills']} kills ({r['mid_write']} inside a checkpoint write, "
                f"{r['restarts']} before the first checkpoint) -> {'bit-identical' if same else 'DIFFERENT'}, "
                f"status {r['status']}")
        log(f"kill soak: {totals['identical']}/{trials} runs bit-identical to the uninterrupted run after "
            f"{totals['kills']} SIGKILLs ({totals['mid_write']} inside a checkpoint write, {totals['restarts']} "
            f"before the first checkpoint)")
        return totals
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    totals = soak(args.trials, args.seed)
    return 0 if totals["identical"] == totals["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
