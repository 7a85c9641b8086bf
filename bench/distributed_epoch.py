"""Data-parallel scaling on this machine: one training epoch of the book's MLP (configs/mnist.yaml) and convnet
(configs/mnist_cnn.yaml) as 1 process x 2 BLAS threads, as 2 MPI ranks x 1 thread (`dlcli train --distributed`'s
code path) and as 1 process x 1 thread, alternating round by round, best of each; then the ring-allreduce model extended to 4, 16, 64 nodes.

    pip install -e ".[distributed]"
    DLCLI_DATA_DIR=../shared/datasets python bench/distributed_epoch.py [--rounds 2] [--models mlp,convnet] [--limit N]

Per configuration: samples/s, time per step, and the time per step spent in the gradient allreduce (on 2 ranks,
including any wait for the slower rank). The model: a step on N nodes is compute(global batch) / N plus a ring
allreduce of the parameter bytes, 2(N-1)/N x bytes / bandwidth (bandwidth term only; no overlap, as dlcli reduces
once after the backward pass); efficiency = compute share / step time.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"mlp": ROOT / "configs" / "mnist.yaml", "convnet": ROOT / "configs" / "mnist_cnn.yaml"}
WARMUP_BATCHES = 20
PEERS = ((1, 2), (2, 1), (1, 1))  # (processes, BLAS threads each); 1 x 1 shows what a second thread buys


def worker(name: str, threads: int, limit: int | None = None):
    """Under mpiexec or alone: one warm-up slice, then one timed epoch; rank 0 prints a JSON line."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from dlcli import distributed
    from dlcli.builder import build_model
    from dlcli.config import load_config
    from dlcli.trainer import Run

    world = distributed.world(True)
    limits = distributed.limit_threads(world, threads)
    cfg = load_config(CONFIGS[name]).to_dict()
    sys.path.insert(0, os.path.dirname(__file__))
    from common import mnist_train

    model = build_model(cfg)
    shape = tuple(model.inputs[0].shape)
    x, y = mnist_train(shape, limit)
    batch = int(cfg["train"]["batch_size"])
    warm = Run(model, verbose=0, rng=np.random.default_rng(0), world=world)
    warm.fit([x[:WARMUP_BATCHES * batch]], [y[:WARMUP_BATCHES * batch]], epochs=1, batch_size=batch)
    trainer = Run(model, verbose=0, rng=np.random.default_rng(1), world=world)
    world.barrier()
    start = time.perf_counter()
    trainer.fit([x], [y], epochs=1, batch_size=batch)
    seconds = time.perf_counter() - start
    ex = trainer.exchange
    alone = 0.0
    if ex is not None:  # the allreduce by itself, every rank ready: what the wire costs without waiting
        for _ in range(3):
            world.allreduce(ex.buf)
        times = []
        for _ in range(20):
            world.barrier()
            t = time.perf_counter()
            world.allreduce(ex.buf)
            times.append(time.perf_counter() - t)
        alone = float(np.median(times))
    if world.is_root:
        print(json.dumps({"model": name, "ranks": world.size, "threads": threads, "seconds": seconds,
                          "steps": -(-len(x) // batch), "samples": len(x), "batch": batch,
                          "params": sum(p.value.size for p in model.trainable_weights),
                          "allreduce_seconds": ex.seconds if ex else 0.0, "buffer_bytes": ex.nbytes if ex else 0,
                          "allreduce_alone": alone}))
    del limits


def run(name, ranks, threads, limit=None):
    python = sys.executable
    argv = [python, __file__, "--worker", name, "--threads", str(threads)] + (["--limit", str(limit)] if limit else [])
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if mpiexec is None:
            sys.exit("bench: no mpiexec: pip install -e '.[distributed]'")
        argv = [mpiexec, "-n", str(ranks), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_table(compute_step: float, param_bytes: int, nodes=(4, 16, 64), gbits=(10, 100)) -> list[str]:
    rows = ["| nodes | compute/step | allreduce @10 Gbit/s | efficiency | allreduce @100 Gbit/s | efficiency |",
            "|---:|---:|---:|---:|---:|---:|"]
    for n in nodes:
        compute = compute_step / n
        cells = [f"{n}", f"{compute * 1e3:.2f} ms"]
        for g in gbits:
            comm = 2 * (n - 1) / n * param_bytes / (g * 1e9 / 8)
            cells += [f"{comm * 1e3:.2f} ms", f"{compute / (compute + comm):.0%}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="mlp,convnet")
    parser.add_argument("--limit", type=int, help="train on the first N samples only (a shorter 'epoch')")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.threads, args.limit)
    for name in args.models.split(","):
        best: dict = {}
        seen: dict = {}
        for _ in range(args.rounds):
            for ranks, threads in PEERS:
                r = run(name, ranks, threads, args.limit)
                seen.setdefault((ranks, threads), []).append(r["seconds"])
                if (ranks, threads) not in best or r["seconds"] < best[ranks, threads]["seconds"]:
                    best[ranks, threads] = r
        one, two = best[1, 2], best[2, 1]
        print(f"\n{name}: {one['params']:,} parameters ({two['buffer_bytes'] / 2**20:.2f} MiB exchanged per step), "
              f"batch {one['batch']}, {one['steps']} steps per epoch; best of {args.rounds} alternating rounds")
        for r in best.values():
            step = r["seconds"] / r["steps"]
            ar = r["allreduce_seconds"] / r["steps"]
            spread = ", ".join(f"{s:.1f}" for s in seen[r["ranks"], r["threads"]])
            print(f"  {r['ranks']} process{'es' if r['ranks'] > 1 else ''} x {r['threads']} thread"
                  f"{'s' if r['threads'] > 1 else ''}: {r['seconds']:6.1f} s/epoch  {r['samples'] / r['seconds']:7.0f} "
                  f"samples/s  {step * 1e3:6.2f} ms/step  allreduce {ar * 1e3:5.2f} ms/step  (rounds: {spread} s)")
        print(f"  speed-up 2 ranks x 1 thread vs 1 process x 2 threads: {one['seconds'] / two['seconds']:.2f}x, "
              f"vs 1 process x 1 thread: {best[1, 1]['seconds'] / two['seconds']:.2f}x; the allreduce alone "
              f"(ranks ready, shared memory): {two['allreduce_alone'] * 1e3:.2f} ms")
        print(f"  modelled, fixed global batch {one['batch']}, compute/step {one['seconds'] / one['steps'] * 1e3:.2f} ms "
              f"at 1 node (this machine), {4 * one['params'] / 1e6:.2f} MB of float32 gradients:")
        for line in model_table(one["seconds"] / one["steps"], 4 * one["params"]):
            print("  " + line)


if __name__ == "__main__":
    main()
