"""Peak resident memory of training every shipped config (configs/*.yaml) for one epoch through the CLI, each in
its own child process; target: under 2 GiB each. Appends a table to bench/results/memory.md.

    DLCLI_DATA_DIR=../shared/datasets python bench/memory.py [configs/mnist.yaml ...]
"""
import argparse
import datetime
import glob
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import child_peak_rss_mib  # noqa: E402

LIMIT_MIB = 2048


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="default: every configs/*.yaml")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory.md"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="an override for every config, as dlcli train's (e.g. data.limit=2000 on a busy machine)")
    args = parser.parse_args()
    configs = args.configs or sorted(glob.glob("configs/*.yaml"))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    settings = "".join(f", --set {o}" for o in args.overrides)
    rows = [f"Peak RSS training one epoch{settings}, measured {when}:", "", "| config | peak RSS | under 2 GiB |", "|---|---|---|"]
    failed = False
    for config in configs:
        with tempfile.TemporaryDirectory() as runs_dir:
            sets = [a for o in ["train.epochs=1", *args.overrides] for a in ("--set", o)]
            code, mib = child_peak_rss_mib([sys.executable, "-m", "dlcli.cli", "train", config, *sets, "--runs-dir",
                                            runs_dir, "--quiet"])
        ok = code == 0 and mib < LIMIT_MIB
        failed |= not ok
        row = f"| {config} | {mib:,.0f} MiB | {'yes' if ok else 'NO'}{'' if code == 0 else f' (exit {code})'} |"
        print(row, flush=True)
        rows.append(row)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(rows) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
