"""When the loss goes NaN/inf: re-run the offending batch with every layer's values checked, and say why.

The trainer checks the loss (and the global gradient norm) before the optimizer step, so the weights that produced
the bad batch are still intact when `diagnose` re-runs it.
"""
import math

import numpy as np

from dlcli.errors import DlcliError


class DivergenceError(DlcliError):
    """Training stopped on a non-finite loss or gradient; `report` is what divergence.json holds."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def diagnose(model, xs, ys, sample_weight=None) -> dict:
    """First layer (in execution order) whose forward output, and first (from the loss back) whose input gradient,
    holds NaN/inf, plus non-finite inputs and weights. Gradients are zeroed afterwards."""
    first = _FirstNonFinite()
    try:
        with np.errstate(all="ignore"):
            outs = model.graph.forward(xs, training=True, observer=first)
            _, _, grads = model.compute_loss(ys, outs, sample_weight)
            loss_grads_finite = all(_finite(g) for g in grads)
            model.graph.backward(grads, observer=first)
    finally:
        for p in model.trainable_weights:
            p.zero_grad()
    return {
        "nonfinite_inputs": [n for n, x in zip(model.input_names, xs) if not _finite(x)],
        "nonfinite_weights": [p.path for p in model.weights if not _finite(p.value)],
        "first_nonfinite_forward": first.forward_layer,
        "loss_gradient_finite": loss_grads_finite,
        "first_nonfinite_backward": first.backward_layer,
        "input_max_abs": max(float(np.max(np.abs(x))) if x.size and x.dtype.kind == "f" else 0.0 for x in xs),
    }


class _FirstNonFinite:
    """Graph observer: the first layer whose output, and the first (from the loss back) whose input gradient or
    weight gradients, hold NaN/inf."""

    def __init__(self):
        self.forward_layer = self.backward_layer = None

    def forward(self, node, output):
        if self.forward_layer is None and not _finite(output):
            self.forward_layer = node.layer.name

    def backward(self, node, output_grad, input_grad):
        layer = node.layer
        if self.backward_layer is None and not (_finite(input_grad) and all(
                p.grad is None or _finite(p.grad) for p in layer.params.values())):
            self.backward_layer = layer.name


def _finite(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    a = np.asarray(value)
    return a.dtype.kind not in "fc" or bool(np.isfinite(a).all())


def hint(report: dict) -> str:
    """The likely cause, in one sentence a user can act on."""
    diag = report.get("diagnosis", {})
    lr = report.get("learning_rate")
    if diag.get("nonfinite_inputs"):
        return f"the input data holds NaN/inf ({', '.join(diag['nonfinite_inputs'])}): clean or impute it"
    if diag.get("input_max_abs", 0) > 50:
        return (f"inputs are not normalised (max |x| = {diag['input_max_abs']:.4g}): scale them to about [0, 1] or "
                f"unit variance (data.normalize / data.rescale), or add a normalization layer")
    lr_text = f"{lr:.3g}" if isinstance(lr, (int, float)) and math.isfinite(lr) else "the learning rate"
    return (f"the learning rate ({lr_text}) is probably too high: try {lr / 10:.3g}" if isinstance(lr, (int, float))
            else f"{lr_text} is probably too high") + ", or clip gradients (compile.optimizer.clipnorm: 1.0)"
