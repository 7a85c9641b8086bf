"""Peak resident memory of training every shipped config (configs/*.yaml) for one epoch through the CLI, each in
its own child process; target: under 2 GiB each. Writes its table to bench/results/memory.md (replacing it).

    DLCLI_DATA_DIR=../shared/datasets python bench/memory.py [configs/mnist.yaml ...]

With --steps-at LENGTH, a sequence model's config (its first layer takes token ids and has a sequence_length) is
measured at another length instead, printed only: two training steps at the config's batch size on random tokens
and targets, the input shape and the first layer's sequence_length set to LENGTH (as inspect-shapes --set model.
input_shape=[LENGTH] --set model.layers.0.sequence_length=LENGTH, whose activation memory this measures for real).

    python bench/memory.py --steps-at 512 configs/imdb_transformer.yaml configs/imdb_gpt.yaml
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
    parser.add_argument("--steps-at", type=int, metavar="LENGTH",
                        help="two training steps of a sequence model at this length instead of an epoch")
    parser.add_argument("--in-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_child:
        return train_steps_at(args.configs[0], args.steps_at)
    if args.steps_at:
        for config in args.configs:
            code, mib = child_peak_rss_mib([sys.executable, __file__, "--in-child", "--steps-at", str(args.steps_at),
                                            config])
            print(f"| {config} at length {args.steps_at} | {mib:,.0f} MiB | "
                  f"{'yes' if code == 0 and mib < LIMIT_MIB else 'NO'}{'' if code == 0 else f' (exit {code})'} |")
        return
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


def train_steps_at(config_path: str, length: int):
    import numpy as np
    import yaml

    from dlcli.builder import build_model
    from dlcli.config import parse_config

    config = yaml.safe_load(open(config_path))
    config["model"]["input_shape"] = [length]
    config["model"]["layers"][0]["sequence_length"] = length
    model = build_model(parse_config(yaml.safe_dump(config), config_path))
    rng = np.random.default_rng(0)
    batch = config["train"]["batch_size"]
    x = rng.integers(1, config["model"]["layers"][0]["vocabulary_size"], (batch, length)).astype(np.int32)
    out = (batch, *model.outputs[0].shape)
    y = (rng.integers(0, out[-1], out[:-1]).astype(np.int32) if "sparse" in str(config["compile"]["loss"])
         else rng.integers(0, 2, out).astype(np.float32))
    for _ in range(2):
        model.train_step([x], [y])


if __name__ == "__main__":
    main()
