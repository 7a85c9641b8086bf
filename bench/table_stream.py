"""A table larger than memory, streamed: a synthetic penguins-shaped CSV of 5 million rows (~1 GiB, written to a
temporary folder and deleted after) trains the penguins model for one epoch with `data.stream: true`, and the
peak resident memory of each step is measured in its own child process (target: under 1 GiB). Reported: rows per
second for adaptation alone (dlcli's chunked passes), for the training epoch, and for pandas reading the same file
into memory (the peer; pandas is in the `bench` extra only).

    DLCLI_DATA_DIR=../shared/datasets python bench/table_stream.py [--rows 5000000]
Appends its table to bench/results/table_stream.md.
"""
import argparse
import csv
import datetime
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import child_peak_rss_mib  # noqa: E402

LIMIT_MIB = 1024
HEADER = ["species", "island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "sex", "year",
          "note"]  # note: a free-text column the features leave out, as real tables have (~120 characters)
CONFIG = """name: table-stream
seed: 0
data:
  type: table
  path: {path}
  label: species
  test_split: 0.01
  stream: true
  features:
    island: string_categorical
    sex: string_categorical
    year: integer_categorical
    bill_length_mm: float_normalized
    bill_depth_mm: float_normalized
    flipper_length_mm: float_normalized
    body_mass_g: {{type: float_discretized, num_bins: 8}}
  crosses: [{{features: [island, sex], crossing_dim: 16}}]
model:
  layers:
    - {{type: Dense, units: 32, activation: relu}}
    - {{type: Dense, units: 3, activation: softmax}}
compile: {{optimizer: adam, loss: sparse_categorical_crossentropy, metrics: [accuracy]}}
train: {{epochs: 1, batch_size: 1024}}
"""


def write_csv(path: str, rows: int, chunk: int = 250_000, seed: int = 0):
    """Penguins-shaped rows: the species decides the island mix and the measurements (with noise, 4 decimals),
    about 2% of the measurement and sex cells NA, as in the real table; plus an ignored note of ~120 characters,
    so 5 million rows make about 1 GiB."""
    rng = np.random.default_rng(seed)
    words = np.array("seen near the colony nest with chick banded again weather cold windy calm tagged by "
                     "team two on the ridge at dawn".split())
    notes = np.array([" ".join(rng.choice(words, 28)) for _ in range(1000)], dtype=object)
    species = np.array(["Adelie", "Chinstrap", "Gentoo"])
    islands = np.array(["Biscoe", "Dream", "Torgersen"])
    means = np.array([[38.8, 18.3, 190.0, 3700.0], [48.8, 18.4, 196.0, 3733.0], [47.5, 15.0, 217.0, 5076.0]])
    spread = np.array([2.7, 1.2, 6.5, 460.0])
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(HEADER)
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            kind = rng.integers(0, 3, n)
            island = np.where(kind == 2, 0, np.where(kind == 1, 1, rng.integers(0, 3, n)))
            values = means[kind] + rng.normal(0, 1, (n, 4)) * spread
            cells = np.char.mod("%.4f", values).astype(object)
            cells[rng.random((n, 4)) < 0.02] = "NA"
            sex = np.where(rng.random(n) < 0.5, "male", "female").astype(object)
            sex[rng.random(n) < 0.03] = "NA"
            year = rng.integers(2007, 2010, n).astype(str)
            out.writerows(zip(species[kind], islands[island], cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3],
                              sex, year, notes[rng.integers(0, len(notes), n)]))


ADAPT = """import json, sys, time
from dlcli.config import load_config
from dlcli.data.table import adapt_streamed
start = time.perf_counter()
state = adapt_streamed(load_config(sys.argv[1]).data)
json.dump({"rows": state["rows"], "seconds": time.perf_counter() - start}, open(sys.argv[2], "w"))
"""
PANDAS = """import json, sys, time
import pandas
start = time.perf_counter()
frame = pandas.read_csv(sys.argv[1], na_values=["NA", ""])
json.dump({"rows": len(frame), "seconds": time.perf_counter() - start}, open(sys.argv[2], "w"))
"""


def timed_child(folder: str, script: str, argv: list[str]) -> tuple[float, dict]:
    """(peak RSS MiB, the JSON the child wrote) of `script` run as a child process."""
    import json

    path, result = os.path.join(folder, "child.py"), os.path.join(folder, "child.json")
    with open(path, "w") as f:
        f.write(script)
    code, mib = child_peak_rss_mib([sys.executable, path, *argv, result])
    if code != 0:
        sys.exit(f"bench: the child step failed (exit {code})")
    with open(result) as f:
        return mib, json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "table_stream.md"))
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="dlcli-table-stream-")
    try:
        path = os.path.join(folder, "penguins_big.csv")
        start = time.perf_counter()
        write_csv(path, args.rows)
        size = os.path.getsize(path)
        print(f"wrote {args.rows:,} rows, {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)
        config = os.path.join(folder, "config.yaml")
        with open(config, "w") as f:
            f.write(CONFIG.format(path=path))
        # each step in its own child process: its own peak RSS (os.wait4)
        adapt_mib, adapted = timed_child(folder, ADAPT, [config])
        start = time.perf_counter()
        code, train_mib = child_peak_rss_mib([sys.executable, "-m", "dlcli.cli", "train", config, "--runs-dir",
                                              os.path.join(folder, "runs"), "--quiet"])
        train_seconds = time.perf_counter() - start
        if code != 0:
            sys.exit(f"bench: dlcli train failed (exit {code})")
        history = os.path.join(next(os.scandir(os.path.join(folder, "runs"))).path, "history.csv")
        with open(history) as f:
            epoch_seconds = float(list(csv.DictReader(f))[0]["seconds"])
        pandas_mib, read = timed_child(folder, PANDAS, [path])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows, trained = adapted["rows"], int(adapted["train_rows"]) if "train_rows" in adapted else None
    trained = trained or round(rows * 0.99)
    lines = [f"Streaming a {args.rows:,}-row penguins-shaped CSV ({size / 2**30:.2f} GiB), measured {when} "
             f"(2 cores shared with other jobs):", "",
             "| step | rows/s | seconds | peak RSS |", "|---|---|---|---|",
             f"| dlcli adaptation (chunked passes: labels, then features on the training rows) | "
             f"{rows / adapted['seconds']:,.0f} | {adapted['seconds']:.1f} | {adapt_mib:,.0f} MiB |",
             f"| dlcli train, whole run (adapt, encode, 1 epoch, test) | {rows / train_seconds:,.0f} | "
             f"{train_seconds:.1f} | {train_mib:,.0f} MiB |",
             f"| dlcli training epoch alone ({trained:,} rows, batch 1024) | {trained / epoch_seconds:,.0f} | "
             f"{epoch_seconds:.1f} | (the row above) |",
             f"| pandas.read_csv into memory (the peer) | {read['rows'] / read['seconds']:,.0f} | "
             f"{read['seconds']:.1f} | {pandas_mib:,.0f} MiB |"]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    if max(adapt_mib, train_mib) >= LIMIT_MIB:
        sys.exit(f"bench: peak RSS {max(adapt_mib, train_mib):,.0f} MiB is over {LIMIT_MIB} MiB")


if __name__ == "__main__":
    main()
