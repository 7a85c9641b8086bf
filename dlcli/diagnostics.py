"""Checks of a configured model, the first things to run when a model does not learn (and cheap enough for CI):

- `trace_batch`: one real batch forward and backward; per layer activation mean/std, dead ReLUs, gradient norms.
- `gradient_check`: the whole model in float64 against central differences, per parameter.
- `overfit_batch`: drive one batch to near-zero loss.
- `determinism`: two short runs with the same seed must end with identical weights.
Each returns plain rows (dicts); the CLI (dlcli.commands.check) turns them into tables and exit codes.
"""
import hashlib
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from dlcli import run_files
from dlcli.errors import DlcliError


def first_batch(config, model, size: int) -> tuple[list, list]:
    """The first `size` training samples (inputs and targets fitted to the model), as the trainer would see them."""
    from dlcli.data.dataset import load_fitted

    data = load_fitted(config, model)
    if len(data.x_train) == 0:
        raise DlcliError("the training split is empty")
    return data.x_train.take(slice(0, size)), [a[:size] for a in data.y_train]


# --- trace --------------------------------------------------------------------------------------------------
class _Recorder:
    """Graph observer: every layer call's output and the gradient flowing into its backward, in call order."""

    def __init__(self):
        self.calls, self._by_node = [], {}  # calls: dicts of layer, call, output, grad

    def forward(self, node, output):
        layer = node.layer
        entry = {"layer": layer, "call": sum(c["layer"] is layer for c in self.calls), "output": output, "grad": None}
        self.calls.append(entry)
        self._by_node[id(node)] = entry

    def backward(self, node, output_grad, input_grad):
        self._by_node[id(node)]["grad"] = output_grad


def is_relu(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return type(layer).__name__ == "ReLU" or getattr(activation, "name", None) == "relu"


def dead_fraction(out: np.ndarray) -> float:
    """Fraction of units (last axis: features or channels) that are zero for every sample and position."""
    alive = (out.reshape(-1, out.shape[-1]) > 0).any(axis=0)
    return int((~alive).sum()) / alive.size


def _norm(a) -> float:
    return float(np.sqrt(np.sum(np.square(a, dtype=np.float64))))


def trace_batch(model, xs: list, ys: list, training: bool = True) -> dict:
    """One forward and backward pass of a real batch; per layer call: activation statistics and gradient norms (None
    for a frozen weight's)."""
    for p in model.weights_to_train():
        p.zero_grad()
    recorder = _Recorder()
    outs = model.graph.forward(xs, training=training, observer=recorder)
    loss, _, grads = model.compute_loss(ys, outs)
    model.graph.backward(grads, observer=recorder)
    rows = []
    for c in recorder.calls:
        layer, out = c["layer"], c["output"]
        first = out[0] if isinstance(out, list) else out
        first = np.asarray(first)
        numeric = first.dtype.kind == "f"
        grad = c["grad"][0] if isinstance(c["grad"], list) else c["grad"]
        params = [{"name": p.name, "norm": _norm(p.value), "grad_norm": None if p.grad is None else _norm(p.grad)}
                  for p in layer.weights] if c["call"] == 0 else []
        rows.append({
            "name": layer.name + (f" (call {c['call']})" if len(layer.nodes) > 1 else ""),
            "type": type(layer).__name__, "shape": tuple(first.shape[1:]),
            "mean": float(first.mean()) if numeric else None, "std": float(first.std()) if numeric else None,
            "finite": bool(np.isfinite(first).all()) if numeric else True,
            "dead": dead_fraction(first) if is_relu(layer) and numeric and first.ndim > 1 else None,
            "grad_norm": None if grad is None else _norm(grad), "params": params,
        })
    for p in model.trainable_weights:
        p.zero_grad()
    return {"loss": float(loss), "batch": len(xs[0]), "rows": rows, "hints": trace_hints(rows, loss)}


def trace_hints(rows: list[dict], loss: float) -> list[str]:
    hints = []
    if not np.isfinite(loss):
        hints.append("the loss is not finite: check the data for NaN/inf and lower the learning rate")
    for r in rows:
        if not r["finite"]:
            hints.append(f"{r['name']}: non-finite activations (overflow upstream, or NaN in the data)")
        if r["dead"] is not None and r["dead"] >= 0.5:
            hints.append(f"{r['name']}: {r['dead']:.0%} of ReLU units are dead on this batch (lower the learning "
                         f"rate, normalise the inputs, or try he_normal initialisation / leaky_relu)")
        for p in r["params"]:
            g = p["grad_norm"]
            if g is not None and np.isfinite(g) and g < 1e-8 * max(p["norm"], 1.0):
                hints.append(f"{r['name']}/{p['name']}: gradient norm {g:.1e} (vanishing; is the layer cut off "
                             f"from the loss, or saturated?)")
            if g is not None and not np.isfinite(g):
                hints.append(f"{r['name']}/{p['name']}: non-finite gradient")
    return hints


# --- gradient check -----------------------------------------------------------------------------------------
def to_float64(model):
    """Run the same layer code in float64: every layer's dtype, weights and gradient buffers."""
    for layer in model.layers:
        layer.dtype = "float64"
        for p in layer.params.values():
            p.value = np.ascontiguousarray(p.value, dtype=np.float64)
            if p.grad is not None:
                p.grad = np.zeros_like(p.value)


def gradient_check(model, xs: list, ys: list, entries: int = 6, eps: float = 1e-6, tolerance: float = 1e-4,
                   atol: float = 1e-9, seed: int = 0, training: bool = True) -> list[dict]:
    """Central differences of the model's loss (+ regularisation) against backprop, at up to `entries` random
    positions of every trainable weight and of each float input (entries on a ReLU/max-pool kink are counted
    and skipped). Layer RNGs are re-seeded before every forward
    pass so dropout draws the same mask each time. One row per weight: checked count, max relative and absolute
    error, ok. An entry passes when |a - n| <= atol or |a - n| / max(|a|, |n|) <= tolerance."""
    to_float64(model)
    # A little noise breaks exact ties (blank image borders give equal values in a max-pool window), which
    # would put the finite differences on a kink; the check is of the backward code, not of these exact pixels.
    noise = np.random.default_rng([seed, 7])
    xs = [a.astype(np.float64) + noise.normal(0, 0.01 * (a.std() or 1.0), a.shape) if a.dtype.kind == "f" else a
          for a in xs]
    layers = model.layers

    def forward():
        for i, layer in enumerate(layers):
            layer.rng = np.random.default_rng([seed, i])
        return model.graph.forward(xs, training=training)

    def loss() -> float:
        total, _, _ = model.compute_loss(ys, forward(), with_grads=False)
        return total + model.regularization_loss()

    params = model.weights_to_train()
    for p in params:
        p.zero_grad()
    _, _, grads = model.compute_loss(ys, forward())
    input_grads = model.graph.backward(grads, need_input_grads=True)
    for layer in layers:
        layer.add_regularization_grads()
    targets = [(p.layer.name, p.name, p.value, p.grad.copy()) for p in params]
    targets += [("input", name, x, g) for name, x, g in zip(model.input_names, xs, input_grads)
                if x.dtype.kind == "f" and g is not None]
    rng = np.random.default_rng(seed)
    center = loss()
    rows = []
    for layer_name, name, value, analytic in targets:
        # `.flat` writes into the array whatever its memory order (reshape(-1) of a Fortran-ordered array is a
        # copy: perturbing it would never reach the weight and the numeric gradient would be 0).
        flat, grad = value.flat, analytic.reshape(-1)
        idx = rng.choice(value.size, min(entries, value.size), replace=False)
        rel_max = abs_max = 0.0
        ok, kinks = True, 0
        for i in idx:
            old = flat[i]
            flat[i] = old + eps
            up = loss()
            flat[i] = old - eps
            down = loss()
            flat[i] = old
            numeric, a = (up - down) / (2 * eps), float(grad[i])
            diff = abs(a - numeric)
            rel = diff / max(abs(a), abs(numeric)) if diff > 0 else 0.0
            if diff > atol and rel > tolerance:
                # Straddling a ReLU/max-pool kink: backprop gives one side's slope, the central difference their
                # mean, so the mismatch is half the jump between the one-sided slopes. A wrong backward pass shows
                # a mismatch with equal one-sided slopes.
                jump = abs((up - center) - (center - down)) / eps
                if jump >= diff:
                    kinks += 1
                    continue
                ok = False
            rel_max, abs_max = max(rel_max, rel), max(abs_max, diff)
        rows.append({"layer": layer_name, "weight": name, "shape": tuple(value.shape), "checked": len(idx) - kinks,
                     "kinks": kinks, "max_rel_error": rel_max, "max_abs_error": abs_max, "ok": ok})
    return rows


# --- overfit one batch --------------------------------------------------------------------------------------
def data_loss(model, parts) -> float:
    return float(sum(w * p for w, p in zip(model.loss_weights, parts)))


def overfit_batch(model, xs: list, ys: list, steps: int = 200, threshold: float = 0.05) -> dict:
    """Train on one batch until its (training-mode, regularisation-free) loss falls below `threshold` or `steps`
    run out. A model that cannot memorise a handful of samples has a bug or a broken setup, not a data problem."""
    losses = []
    for _ in range(steps):  # a non-finite or exploding loss stops it with train_step's DivergenceError
        _, parts, _ = model.train_step(xs, ys)
        losses.append(data_loss(model, parts))
        if losses[-1] <= threshold:
            break
    final = losses[-1]
    inference = model.evaluate(xs, ys, batch_size=len(xs[0]), return_dict=True)
    reached = next((i + 1 for i, v in enumerate(losses) if v <= threshold), None)
    return {"batch": len(xs[0]), "steps": len(losses), "initial_loss": losses[0], "final_loss": final,
            "best_loss": min(losses), "reached_at": reached, "threshold": threshold,
            "inference": inference, "ok": reached is not None, "losses": losses}


# --- determinism --------------------------------------------------------------------------------------------
def weight_hashes(model) -> dict:
    return {p.path: hashlib.sha256(np.ascontiguousarray(p.value).tobytes()).hexdigest()[:16] for p in model.weights}


def short_run(config, samples: int, epochs: int) -> tuple[dict, list]:
    """Build and train from scratch on the first `samples` training samples, as `dlcli train` does (same seeds,
    same code path), in a throwaway run directory. Returns (weight hashes, per-epoch losses)."""
    from dlcli.builder import build_model
    from dlcli.data.dataset import load_fitted
    from dlcli.trainer import Run

    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": epochs})})
    model = build_model(config)
    data = replace(load_fitted(config, model).limited(samples), x_test=None, y_test=None)
    with tempfile.TemporaryDirectory(prefix="dlcli-determinism-") as tmp:
        run_dir = Path(tmp) / "run"
        files = run_files.RunDir(run_dir)
        files.weights.mkdir(parents=True)
        result = Run.in_dir(files, config, model, data, verbose=0).train()
    return weight_hashes(model), [row["loss"] for row in result.history]


def determinism(config, samples: int = 256, epochs: int = 1) -> dict:
    """Two short runs with the same Config and seed: every weight's hash and every epoch's loss must match."""
    hashes_a, losses_a = short_run(config, samples, epochs)
    hashes_b, losses_b = short_run(config, samples, epochs)
    rows = [{"weight": k, "first": hashes_a[k], "second": hashes_b.get(k), "ok": hashes_a[k] == hashes_b.get(k)}
            for k in hashes_a]
    return {"rows": rows, "losses": (losses_a, losses_b), "ok": all(r["ok"] for r in rows) and losses_a == losses_b}
