"""Losses as small objects: `compute(y_true, y_pred, logits=None) -> (per_sample, grad)`.

Formulas, defaults and the 1e-7 probability clip follow `keras.losses` (numpy backend). `per_sample` (float64,
shape (batch,)) is the per-element loss (after the last-axis reduction) averaged over the remaining non-batch
axes, so its mean is Keras' "sum_over_batch_size" value. `grad` is d(per_sample[i])/d(y_pred), NOT divided by
the batch size (the model does that). With `logits` (the output layer's softmax/sigmoid fused into the loss),
the value comes from log-softmax / log-sigmoid and `grad` is w.r.t. the logits.
"""
import inspect

import numpy as np

from dlcli.engine.activations import sigmoid
from dlcli.errors import DlcliError, ShapeError
from dlcli.registry import Registry

LOSSES = Registry("loss")
EPSILON = 1e-7  # keras.backend.epsilon()


class Loss:
    name = ""
    fused_activation = None  # the output activation whose Jacobian this loss folds in ("softmax"/"sigmoid")

    def compute(self, y_true, y_pred, logits=None):
        raise NotImplementedError

    def fuses_with(self, activation_name) -> bool:
        return (self.fused_activation is not None and activation_name == self.fused_activation
                and not getattr(self, "from_logits", False))

    def __call__(self, y_true, y_pred) -> float:
        """The batch loss as Keras reports it (mean of per-sample losses)."""
        return float(self.compute(y_true, y_pred)[0].mean())

    def get_config(self) -> dict:
        """Constructor arguments (each stored under its own name), so config in = config out."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def __repr__(self):
        return f"<{type(self).__name__} {self.get_config()}>"


def _per_sample(elements, batch):
    """Mean over every non-batch axis (float64), and the factor d(per_sample)/d(element)."""
    flat = elements.reshape(batch, -1)
    return flat.mean(1, dtype=np.float64), 1.0 / max(flat.shape[1], 1)


def _reduce_last(values, y_pred):
    """Keras' mean over the last axis of (batch, ..., d) outputs; 1-D outputs are one value per sample."""
    return values.mean(-1) if y_pred.ndim > 1 else values


def dense_targets(y_true, y_pred, loss_name):
    """Targets as float arrays of y_pred's shape; (batch,) targets of a (batch, 1) output are reshaped."""
    y_true = np.asarray(y_true)
    if y_true.shape != y_pred.shape:
        if y_true.size == y_pred.size and y_true.shape[:1] == y_pred.shape[:1]:
            y_true = y_true.reshape(y_pred.shape)
        else:
            hint = ""
            if loss_name == "categorical_crossentropy" and y_true.shape == y_pred.shape[:-1]:
                hint = (" The targets look like integer class labels: use loss 'sparse_categorical_crossentropy' "
                        "or one-hot encode them.")
            raise ShapeError(f"loss '{loss_name}' needs targets of the output's shape (None, "
                             f"{', '.join(map(str, y_pred.shape[1:]))}); got targets of shape "
                             f"(None, {', '.join(map(str, y_true.shape[1:]))}).{hint}")
    return y_true.astype(y_pred.dtype, copy=False)


@LOSSES.register("categorical_crossentropy", "CategoricalCrossentropy")
class CategoricalCrossentropy(Loss):
    """-sum(y_true * log(p)) over the last axis; label smoothing y*(1-s) + s/classes (Keras)."""

    name = "categorical_crossentropy"
    fused_activation = "softmax"

    def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0):
        self.from_logits, self.label_smoothing = bool(from_logits), float(label_smoothing)

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        t = dense_targets(y_true, y_pred, self.name)
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + self.label_smoothing / y_pred.shape[-1]
        z = logits if logits is not None else (y_pred if self.from_logits else None)
        if z is not None:
            log_p, grad = _log_softmax_and_softmax(z)
            elements = -(t * log_p).sum(-1)
            per_sample, scale = _per_sample(elements, len(z))
            grad *= t.sum(-1, keepdims=True)
            grad -= t
        else:
            per_sample, scale, grad = _probability_crossentropy(t, y_pred)
        grad *= scale
        return per_sample, grad


@LOSSES.register("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy")
class SparseCategoricalCrossentropy(Loss):
    """Categorical crossentropy with integer labels: (batch,) or (batch, 1); (batch, T) for (batch, T, C)."""

    name = "sparse_categorical_crossentropy"
    fused_activation = "softmax"

    def __init__(self, from_logits: bool = False):
        self.from_logits = bool(from_logits)

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        labels = sparse_labels(y_true, y_pred, self.name)
        classes = y_pred.shape[-1]
        rows = np.arange(labels.size)
        flat_labels = labels.reshape(-1)
        z = logits if logits is not None else (y_pred if self.from_logits else None)
        if z is not None:
            log_p, grad = _log_softmax_and_softmax(z.reshape(-1, classes))
            elements = -log_p[rows, flat_labels].reshape(labels.shape)
            per_sample, scale = _per_sample(elements, len(z))
            grad[rows, flat_labels] -= 1
        else:
            # Keras renormalises the probabilities, then clips: p_c = clip(y_c / sum(y)).
            flat_y = y_pred.reshape(-1, classes)
            total = flat_y.sum(-1)
            q = flat_y[rows, flat_labels] / total
            inside = (q > EPSILON) & (q < 1 - EPSILON)
            elements = -np.log(np.clip(q, EPSILON, 1 - EPSILON)).reshape(labels.shape)
            per_sample, scale = _per_sample(elements, len(y_pred))
            # d(-log(y_l / S))/dy_j = 1/S - [j == l]/y_l, zero where the clip is active.
            grad = np.broadcast_to((inside / total)[:, None], flat_y.shape).astype(y_pred.dtype)
            grad[rows, flat_labels] -= inside / np.where(inside, flat_y[rows, flat_labels], 1)
        grad = grad.reshape(y_pred.shape)
        grad *= scale
        return per_sample, grad


def _log_softmax_and_softmax(z):
    """log-softmax over the last axis and its exp, sharing one exp pass (the fused paths' hot spot)."""
    shifted = z - z.max(-1, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(-1, keepdims=True)
    shifted -= np.log(total)
    e /= total
    return shifted, e


def sparse_labels(y_true, y_pred, what="sparse_categorical_crossentropy"):
    """Integer labels of shape y_pred.shape[:-1] (a trailing axis of 1 is squeezed), range-checked."""
    labels = np.asarray(y_true)
    if labels.ndim == y_pred.ndim and labels.shape[-1] == 1:
        labels = labels.reshape(labels.shape[:-1])
    if labels.shape != y_pred.shape[:-1]:
        raise ShapeError(f"'{what}' needs integer labels of shape (None, "
                         f"{', '.join(map(str, y_pred.shape[1:-1]))}) for outputs of shape (None, "
                         f"{', '.join(map(str, y_pred.shape[1:]))}); got labels of shape (None, "
                         f"{', '.join(map(str, labels.shape[1:]))}). One-hot targets need "
                         f"'categorical_crossentropy' / 'categorical_accuracy'.")
    if labels.dtype.kind == "f":
        if labels.size and not np.array_equal(labels, np.round(labels)):
            raise DlcliError(f"'{what}' needs integer class labels; the targets contain non-integer values "
                             f"(one-hot or probability targets need 'categorical_crossentropy')")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iub":
        raise DlcliError(f"'{what}' needs integer class labels; got targets of dtype {labels.dtype}")
    classes = y_pred.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DlcliError(f"'{what}' got class label {bad}, but the output has {classes} units (labels must be in "
                         f"0..{classes - 1}); give the last layer as many units as there are classes")
    return labels


def _probability_crossentropy(t, y):
    """Keras' non-logit categorical crossentropy: p = clip(y / sum(y)); elements -sum(t log p); grad w.r.t. y."""
    total = y.sum(-1, keepdims=True)
    q = y / total
    inside = (q > EPSILON) & (q < 1 - EPSILON)
    elements = -(t * np.log(np.clip(q, EPSILON, 1 - EPSILON))).sum(-1)
    per_sample, scale = _per_sample(elements, len(y))
    g_q = np.where(inside, -t / np.where(inside, q, 1), 0).astype(y.dtype, copy=False)  # dL/dq
    grad = (g_q - (g_q * q).sum(-1, keepdims=True)) / total  # through q = y / sum(y)
    return per_sample, scale, grad


@LOSSES.register("binary_crossentropy", "BinaryCrossentropy", "bce")
class BinaryCrossentropy(Loss):
    """Element-wise -(y log p + (1-y) log(1-p)), mean over the last axis; smoothing y*(1-s) + s/2 (Keras)."""

    name = "binary_crossentropy"
    fused_activation = "sigmoid"

    def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0):
        self.from_logits, self.label_smoothing = bool(from_logits), float(label_smoothing)

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        t = dense_targets(y_true, y_pred, self.name)
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        z = logits if logits is not None else (y_pred if self.from_logits else None)
        if z is not None:
            # max(z, 0) - z*y + log(1 + exp(-|z|)): the stable form of -log-sigmoid terms.
            values = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
            grad = sigmoid(z) - t
            ref = z
        else:
            p = np.clip(y_pred, EPSILON, 1 - EPSILON)
            values = -(t * np.log(p) + (1 - t) * np.log(1 - p))
            inside = (y_pred > EPSILON) & (y_pred < 1 - EPSILON)
            grad = np.where(inside, (p - t) / (p * (1 - p)), 0).astype(y_pred.dtype, copy=False)
            ref = y_pred
        per_sample, scale = _per_sample(_reduce_last(values, ref), len(ref))
        grad *= scale / (ref.shape[-1] if ref.ndim > 1 else 1)
        return per_sample, grad


class _ElementwiseLoss(Loss):
    """Losses of the error y_pred - y_true, averaged over the last axis (Keras' regression losses)."""

    def values_and_grad(self, error):
        raise NotImplementedError

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        error = y_pred - dense_targets(y_true, y_pred, self.name)
        values, grad = self.values_and_grad(error)
        per_sample, scale = _per_sample(_reduce_last(values, y_pred), len(y_pred))
        grad *= scale / (y_pred.shape[-1] if y_pred.ndim > 1 else 1)
        return per_sample, grad


@LOSSES.register("mean_squared_error", "MeanSquaredError", "mse")
class MeanSquaredError(_ElementwiseLoss):
    name = "mean_squared_error"

    def __init__(self):
        pass

    def values_and_grad(self, error):
        return error * error, 2 * error


@LOSSES.register("mean_absolute_error", "MeanAbsoluteError", "mae")
class MeanAbsoluteError(_ElementwiseLoss):
    name = "mean_absolute_error"

    def __init__(self):
        pass

    def values_and_grad(self, error):
        return np.abs(error), np.sign(error)


@LOSSES.register("huber", "Huber", "huber_loss")
class Huber(_ElementwiseLoss):
    """0.5 e^2 where |e| <= delta, else delta * (|e| - 0.5 delta) (Keras' Huber, delta=1.0)."""

    name = "huber"

    def __init__(self, delta: float = 1.0):
        self.delta = float(delta)

    def values_and_grad(self, error):
        small = np.abs(error) <= self.delta
        values = np.where(small, 0.5 * error * error, self.delta * np.abs(error) - 0.5 * self.delta ** 2)
        grad = np.where(small, error, self.delta * np.sign(error)).astype(error.dtype, copy=False)
        return values, grad


def get(identifier) -> Loss:
    """A loss from a name ('mse'), a {type: name, **args} mapping, or a Loss instance (returned as is)."""
    return identifier if isinstance(identifier, Loss) else LOSSES.create(identifier)


def serialize(loss: Loss):
    """The canonical name when every argument is at its default, else {type: name, **args} (YAML-safe)."""
    config = loss.get_config()
    defaults = {n: p.default for n, p in inspect.signature(type(loss).__init__).parameters.items() if n != "self"}
    return loss.name if config == defaults else {"type": loss.name, **config}
