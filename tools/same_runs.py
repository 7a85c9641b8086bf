"""Train every shipped config, cut short, and record what a refactor must leave bit-identical: history.csv without
its seconds column, the SHA-256 of every .npz the run wrote (weights, checkpoint) and the test metrics.

    python tools/same_runs.py record baseline.json     # before the change (DLCLI_DATA_DIR must reach the datasets)
    python tools/same_runs.py compare baseline.json    # after it: exit 1 naming each config that differs

The sweep config is left out (its trials are runs of mnist.yaml). One BLAS thread, so the figures do not depend on
how busy the machine is."""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHORT = ["train.epochs=2", "data.limit=600", "data.test_limit=300"]
SETS = {  # config -> --set texts: 1-2 epochs, a few hundred samples where the loader takes a limit
    "mnist.yaml": SHORT, "mnist_cnn.yaml": SHORT, "fashion_mnist.yaml": SHORT, "fashion_mnist_cnn.yaml": SHORT,
    "fashion_mnist_resnet.yaml": ["train.epochs=1", "data.limit=200", "data.test_limit=100"],
    "two_inputs.yaml": SHORT, "imdb_dense.yaml": SHORT, "imdb_lstm.yaml": SHORT,
    "imdb_transformer.yaml": ["train.epochs=2", "data.limit=200", "data.test_limit=100"],
    "cars_mpg.yaml": ["train.epochs=3"], "cars_mpg_kfold.yaml": ["train.epochs=2"],
    "penguins.yaml": ["train.epochs=3"], "penguins_functional.yaml": ["train.epochs=3"],
    "seattle_weather.yaml": ["train.epochs=2"],
    "timeseries_gru.yaml": ["train.epochs=2"],
}


def record(config: str) -> dict:
    with tempfile.TemporaryDirectory() as runs:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        args = [sys.executable, "-c", "from dlcli.cli import main; main()", "train", f"configs/{config}", "--runs-dir", runs, "--quiet"]
        done = subprocess.run(args + [a for s in SETS[config] for a in ("--set", s)], env=env, capture_output=True,
                              text=True)
        if done.returncode:
            return {"error": done.stderr[-2000:]}
        run = next(Path(runs).iterdir())
        out = {"test": json.loads((run / "meta.json").read_text()).get("test"), "files": {}, "history": {}}
        for path in sorted(run.rglob("*")):
            rel = str(path.relative_to(run))
            if path.suffix == ".npz":
                out["files"][rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.name in ("history.csv", "kfold.csv"):
                lines = [line.split(",") for line in path.read_text().splitlines()]
                drop = [i for i, h in enumerate(lines[0]) if h == "seconds" or h.startswith("seconds_")]
                out["history"][rel] = [",".join(c for i, c in enumerate(row) if i not in drop) for row in lines]
        return out


def main(mode: str, path: str, only=()) -> int:
    configs = [c for c in SETS if not only or c in only]
    if mode == "record":
        Path(path).write_text(json.dumps({c: record(c) for c in configs}, indent=1) + "\n")
        return 0
    base, bad = json.loads(Path(path).read_text()), 0
    for c in configs:
        if c not in base:
            print(f"new   {c} (not in {path})")
            continue
        now = record(c)
        same = now == base[c] and "error" not in now
        bad += not same
        print(f"{'same' if same else 'DIFFERENT'}  {c}" + ("" if same else f"\n  before: {base[c]}\n  now:    {now}"),
              flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("record", "compare"):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
