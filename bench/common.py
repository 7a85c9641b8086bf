"""Shared bench helpers: interleaved best-of timing (both peers see the same machine load) and peak memory."""
import os
import subprocess
import sys
import tempfile
import time

import keras_peer


# A peer's idle threads spin before they sleep (OpenBLAS for about 2^28 cycles, ~0.1 s), holding a core the next
# peer needs: PyTorch's LSTM step took 13.0-13.6 ms right after a dlcli round and 7.9-8.1 ms after this pause
# (dlcli's 11.9-13.8 either way; two runs each, alternating). So every timed call starts on a quiet machine.
IDLE_SECONDS = 0.3


def interleaved_rounds(runs: dict, rounds: int, clock=time.perf_counter) -> dict:
    """Seconds of every call of each `runs[name]()` by `clock` (wall; time.process_time or time.thread_time on a
    busy machine), `rounds` calls each, alternating peers round by round so a busy moment on the machine does not
    land on one side only. A runner with a `lead_in` (one training step: train_steps_runner's) has it called untimed
    after the pause, so its round times the steady steps an epoch is made of, not the first one after an idle spell."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            time.sleep(IDLE_SECONDS)
            lead_in = getattr(fn, "lead_in", None)
            if lead_in is not None:
                lead_in()
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def compare(runs: dict, rounds: int, clock=time.perf_counter) -> tuple[dict, dict]:
    """One warm-up call of each peer, then `rounds` interleaved rounds: (every round's seconds, best of each)."""
    for fn in runs.values():
        fn()
    times = interleaved_rounds(runs, rounds, clock)
    return times, {name: min(t) for name, t in times.items()}


def peers(dlcli_runner, torch_runner, keras_runner=None) -> dict:
    """{"dlcli": dlcli_runner(), "pytorch": torch_runner(torch), "keras": keras_runner(keras)}, each peer only when
    installed (keras on JAX: bench/keras_peer.py)."""
    runs = {"dlcli": dlcli_runner()}
    torch = torch_or_none()
    if torch is not None:
        runs["pytorch"] = torch_runner(torch)
    keras = keras_peer.keras_or_none() if keras_runner is not None else None
    if keras is not None:
        runs["keras"] = keras_runner(keras)
    return runs


def config_model(config: str):
    from dlcli.builder import build_model
    from dlcli.config import load_config

    return build_model(load_config(config).to_dict())


def train_steps_runner(config: str, x, y, batch):
    """dlcli: `train_step` over x, y in order, batch by batch, for the model of a shipped config (its lead-in: the
    first batch's step)."""
    model = config_model(config)

    def run():
        for i in range(0, len(x), batch):
            model.train_step([x[i:i + batch]], [y[i:i + batch]])
    run.lead_in = lambda: model.train_step([x[:batch]], [y[:batch]])
    return run


def torch_train_steps_runner(torch, net, opt, x, y, batch):
    """PyTorch: the same steps with cross-entropy on a channels-first copy of the channels-last images x (its
    lead-in: the first batch's step)."""
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    ty = torch.from_numpy(y)

    def steps(stop):
        net.train()
        for i in range(0, stop, batch):
            opt.zero_grad(set_to_none=False)
            loss = torch.nn.functional.cross_entropy(net(tx[i:i + batch]), ty[i:i + batch])
            loss.backward()
            opt.step()

    def run():
        steps(len(tx))
    run.lead_in = lambda: steps(batch)
    return run


def keras_rmsprop(torch, params):
    return torch.optim.RMSprop(params, lr=1e-3, alpha=0.9, eps=1e-7)  # Keras' defaults (rho 0.9, eps 1e-7)


def fit_runner(model, x, y, batch):
    """dlcli: one `fit` epoch per call (shuffling gather, metrics and all), a new shuffling seed each time."""
    seeds = iter(range(10**6))
    return lambda: model.fit(x, y, epochs=1, batch_size=batch, verbose=0, seed=next(seeds))


def torch_epoch_runner(torch, forward, params, x, y, batch, loss_fn, correct):
    """PyTorch: the epoch `fit` runs: a fresh permutation, batches gathered by index, Keras' RMSprop, and the
    accuracy count (`correct(out, yb)`) dlcli keeps; `forward(xb)` gives what `loss_fn` takes."""
    opt = keras_rmsprop(torch, params)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    seeds = iter(range(10**6))

    def epoch():
        order = torch.randperm(len(tx), generator=torch.Generator().manual_seed(next(seeds)))
        hits = 0
        for i in range(0, len(tx), batch):
            idx = order[i:i + batch]
            xb, yb = tx[idx], ty[idx]
            opt.zero_grad(set_to_none=False)
            out = forward(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            opt.step()
            hits += correct(out, yb)
        return hits
    return epoch


def report_ratio(best: dict, target: str, times: dict | None = None):
    """Print dlcli's time over PyTorch's (best against best), and with `times` the spread of the per-round
    ratios (rounds ran back to back, so each pair saw about the same machine load)."""
    for peer in ("pytorch", "keras"):
        if peer not in best:
            continue
        line = f"ratio dlcli/{peer}: {best['dlcli'] / best[peer]:.2f}x" + (f"  (target {target})" if peer == "pytorch" else "")
        if times is not None and len(times["dlcli"]) > 1:
            per_round = sorted(a / b for a, b in zip(times["dlcli"], times[peer]))
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


def blas_kernels() -> str:
    """Which OpenBLAS kernels NumPy's GEMM runs (threadpoolctl's "architecture"), and whether OPENBLAS_CORETYPE chose
    them: on an AVX-512 CPU OpenBLAS picks its SkylakeX kernels itself, about twice the GEMM throughput of the
    Haswell ones (AVX2) a forced OPENBLAS_CORETYPE=Haswell runs."""
    from dlcli.engine import blas

    lib = blas.library()
    if lib is None or lib["internal_api"] != "openblas":
        return "no OpenBLAS"
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return (f"OpenBLAS {lib['version']}, {lib.get('architecture') or '?'} kernels"
            + (f", forced by OPENBLAS_CORETYPE={forced}" if forced else ""))
