"""Losses as small objects: `compute(y_true, y_pred, logits=None) -> (per_sample, grad)`.

Formulas, defaults and the 1e-7 probability clip follow `keras.losses` (numpy backend). `per_sample` (float64,
shape (batch,)) is the per-element loss (after the last-axis reduction) averaged over the remaining non-batch
axes, so its mean is Keras' "sum_over_batch_size" value. `grad` is d(per_sample[i])/d(y_pred), NOT divided by
the batch size (the model does that). With `logits` (the output layer's softmax/sigmoid fused into the loss),
the value comes from log-softmax / log-sigmoid and `grad` is w.r.t. the logits.
"""
import inspect

import numpy as np

from dlcli import kernels
from dlcli.engine.activations import log_softmax, sigmoid, softmax
from dlcli.errors import ConfigError, DlcliError, ShapeError
from dlcli.registry import Registry

LOSSES = Registry("loss", name_attribute="name")
EPSILON = 1e-7  # keras.backend.epsilon()


REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight", "none")


class Loss:
    name = ""  # the first name the class is registered under (set by LOSSES.register)
    fused_activation = None  # the output activation whose Jacobian this loss folds in ("softmax"/"sigmoid")
    reduction = "sum_over_batch_size"
    batch_value = False  # one value for the whole batch (Dice/Tversky with axis None): no reduction applies

    def __init__(self, reduction: str = "sum_over_batch_size"):
        """Keras' `reduction` argument, checked. None (Keras' 'none') is kept as 'none'."""
        reduction = "none" if reduction is None else reduction
        if reduction not in REDUCTIONS:
            raise ConfigError(f"loss '{self.name}' reduction must be one of {', '.join(REDUCTIONS)} (or null); got "
                              f"{reduction!r}")
        self.reduction = reduction

    def values_per_sample(self, y_pred) -> int:
        """How many values Keras' loss function gives per sample (the last axis reduced), which `per_sample`
        averages: what reduction 'sum' adds up."""
        return int(np.prod(np.shape(y_pred)[1:-1], dtype=np.int64))

    def mean_count(self, per_sample) -> int:
        """The number of samples the batch mean divides by (a loss that masks samples out divides by fewer)."""
        return len(per_sample)

    def reduce(self, per_sample, y_pred, sample_weight=None) -> tuple[float, np.ndarray | np.float64]:
        """The batch loss under Keras' `reduction` and each sample's factor in it: (value, factor) with value =
        sum(per_sample * factor), factor one float64 for every sample when unweighted. sum_over_batch_size/mean: the
        mean of every value; sum: their sum; mean_with_sample_weight: the weighted sum over the weights' sum; 'none'
        trains on the mean of the values, as Keras' compile loss reduces what a loss leaves unreduced."""
        weight = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        if self.batch_value:
            factor = 1.0 / len(per_sample)
        elif self.reduction == "sum":
            factor = float(self.values_per_sample(y_pred))
        elif self.reduction == "mean_with_sample_weight" and weight is not None:
            factor = 1.0 / weight.sum() if weight.sum() else 0.0
        else:
            count = self.mean_count(per_sample)
            factor = 1.0 / count if count else 0.0
        # unweighted, every sample's factor is the same float64: the products (float64 whatever per_sample's type,
        # as against the float64 array) and their sum are a factor array's
        factor = np.float64(factor) if weight is None else weight * factor
        return float(np.multiply(per_sample, factor, dtype=np.float64).sum()), factor

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
        config = {n: getattr(self, n) for n in names}
        if config.get("reduction") == Loss.reduction:
            del config["reduction"]  # only when given: configs and fingerprints from before it stay as they were
        return config

    def __repr__(self):
        return f"<{type(self).__name__} {self.get_config()}>"


def _per_sample(elements, batch):
    """Mean over every non-batch axis (float64), and the factor d(per_sample)/d(element)."""
    flat = elements.reshape(batch, -1)
    if flat.shape[1] == 1:  # one value a sample (fit's usual case): its float64 is its mean, without mean's ~3 us
        return flat[:, 0].astype(np.float64), 1.0
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

    fused_activation = "softmax"

    def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
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

    fused_activation = "softmax"

    def __init__(self, from_logits: bool = False, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
        self.from_logits = bool(from_logits)

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        classes = y_pred.shape[-1]
        z = logits if logits is not None else (y_pred if self.from_logits else None)
        if z is not None:
            labels = sparse_label_array(y_true, y_pred, self.name)  # their values: checked in the loss' pass
            probabilities = y_pred.reshape(-1, classes) if logits is not None else None  # softmax(z): fused
            elements, grad = _sparse_softmax_crossentropy(z.reshape(-1, classes), labels.reshape(-1), probabilities,
                                                          self.name)
            per_sample, scale = _per_sample(elements.reshape(labels.shape), len(z))
        else:
            labels = sparse_labels(y_true, y_pred, self.name)
            flat_labels = labels.reshape(-1)
            # Keras renormalises the probabilities, then clips: p_c = clip(y_c / sum(y)).
            rows = np.arange(labels.size)
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
        if scale != 1:  # (batch, T) labels: the mean over T
            grad *= scale
        return per_sample, grad


def _sparse_softmax_crossentropy(z, labels, probabilities=None, what="sparse_categorical_crossentropy"):
    """(-log softmax(z)[label], softmax(z) - onehot(label)) of logits z (rows, classes) and labels (rows,) not yet
    checked (sparse_label_array's), in one compiled pass (kernels/classification.py) that also checks the labels, or
    its NumPy twin here after sparse_label_values. `probabilities`: softmax(z) as the forward pass computed it (a
    fused output layer), which the kernel takes as the gradient's softmax (the twin's bits)."""
    compiled = kernels.compiled("classification")
    if compiled is None or z.dtype.kind != "f" or (probabilities is not None and probabilities.dtype != z.dtype):
        labels = sparse_label_values(labels, z.shape[-1], what)  # the NumPy twin
        log_p, grad = _log_softmax_and_softmax(z)
        rows = np.arange(len(labels))
        grad[rows, labels] -= 1
        return -log_p[rows, labels], grad
    elements, grad = np.empty(len(z), z.dtype), np.empty(z.shape, z.dtype)
    given = np.empty((0, 0), z.dtype) if probabilities is None else np.ascontiguousarray(probabilities)
    # the kernel's two label types: integers as intp (no copy for int64), floats as float64 (their values exactly)
    typed = labels.astype(np.float64 if labels.dtype.kind == "f" else np.intp, copy=False)
    if compiled.sparse_softmax_crossentropy(np.ascontiguousarray(z), typed, given, elements, grad) < 0:
        sparse_label_values(labels, z.shape[-1], what)  # raises, naming the label
    return elements, grad


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
    return sparse_label_values(sparse_label_array(y_true, y_pred, what), y_pred.shape[-1], what)


def sparse_label_array(y_true, y_pred, what="sparse_categorical_crossentropy"):
    """The labels y_true as an array of shape y_pred.shape[:-1] (a trailing axis of 1 is squeezed) and a numeric
    type, their values unchecked (sparse_label_values)."""
    labels = np.asarray(y_true)
    if labels.ndim == y_pred.ndim and labels.shape[-1] == 1:
        labels = labels.reshape(labels.shape[:-1])
    if labels.shape != y_pred.shape[:-1]:
        raise ShapeError(f"'{what}' needs integer labels of shape (None, "
                         f"{', '.join(map(str, y_pred.shape[1:-1]))}) for outputs of shape (None, "
                         f"{', '.join(map(str, y_pred.shape[1:]))}); got labels of shape (None, "
                         f"{', '.join(map(str, labels.shape[1:]))}). One-hot targets need "
                         f"'categorical_crossentropy' / 'categorical_accuracy'.")
    if labels.dtype.kind not in "iubf":
        raise DlcliError(f"'{what}' needs integer class labels; got targets of dtype {labels.dtype}")
    return labels


def sparse_label_values(labels, classes: int, what="sparse_categorical_crossentropy"):
    """sparse_label_array's labels as integers, each a class (0..classes - 1), or the error naming a label that is
    not one."""
    if labels.dtype.kind == "f":
        if labels.size and not np.array_equal(labels, np.round(labels)):
            raise DlcliError(f"'{what}' needs integer class labels; the targets contain non-integer values "
                             f"(one-hot or probability targets need 'categorical_crossentropy')")
        labels = labels.astype(np.int64)
    # one reduction per batch (fit checks each batch): read as unsigned, a negative label is above every class
    unsigned = labels if labels.dtype.kind in "ub" else labels.view(f"u{labels.dtype.itemsize}")
    if labels.size and unsigned.max() >= classes:
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

    fused_activation = "sigmoid"

    def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
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
    def values_and_grad(self, error):
        return error * error, 2 * error


@LOSSES.register("mean_absolute_error", "MeanAbsoluteError", "mae")
class MeanAbsoluteError(_ElementwiseLoss):
    def values_and_grad(self, error):
        return np.abs(error), np.sign(error)


@LOSSES.register("huber", "Huber", "huber_loss")
class Huber(_ElementwiseLoss):
    """0.5 e^2 where |e| <= delta, else delta * (|e| - 0.5 delta) (Keras' Huber, delta=1.0)."""

    def __init__(self, delta: float = 1.0, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
        self.delta = float(delta)

    def values_and_grad(self, error):
        small = np.abs(error) <= self.delta
        values = np.where(small, 0.5 * error * error, self.delta * np.abs(error) - 0.5 * self.delta ** 2)
        grad = np.where(small, error, self.delta * np.sign(error)).astype(error.dtype, copy=False)
        return values, grad


# --- the rest of keras.losses (Keras 3.15): formulas as keras/src/losses/losses.py -------------------------------
class _LastAxisLoss(Loss):
    """A loss whose value is a reduction of element values over the last axis: `elements(t, y)` returns those values
    (or the reduced ones, one per row) and the derivatives of the reduced value w.r.t. y; `last_axis` is "mean"
    (regression-like losses) or "sum" (distribution losses)."""

    last_axis = "mean"

    def elements(self, t, y):
        raise NotImplementedError

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        t = dense_targets(y_true, y_pred, self.name)
        values, grad = self.elements(t, y_pred)
        if values.ndim < y_pred.ndim:
            pass  # already one value per row
        elif self.last_axis == "sum" and y_pred.ndim > 1:
            values = values.sum(-1)
        elif y_pred.ndim > 1:
            values = values.mean(-1)
            grad /= y_pred.shape[-1]
        per_sample, scale = _per_sample(values, len(y_pred))
        grad *= scale
        return per_sample, grad.astype(y_pred.dtype, copy=False)


def _hinge_targets(t):
    """Keras' convert_binary_labels_to_hinge: 0/1 targets become -1/1 when every one of them is 0 or 1."""
    return 2 * t - 1 if np.isin(t, (0, 1)).all() else t


@LOSSES.register("hinge", "Hinge")
class Hinge(_LastAxisLoss):
    """mean(max(1 - t * y, 0)) with targets -1/1 (0/1 converted)."""

    def elements(self, t, y):
        t = _hinge_targets(t)
        margin = 1 - t * y
        return np.maximum(margin, 0), np.where(margin > 0, -t, 0)


@LOSSES.register("squared_hinge", "SquaredHinge")
class SquaredHinge(_LastAxisLoss):
    """mean(max(1 - t * y, 0)^2) with targets -1/1 (0/1 converted)."""

    def elements(self, t, y):
        t = _hinge_targets(t)
        margin = np.maximum(1 - t * y, 0)
        return margin * margin, -2 * t * margin


@LOSSES.register("categorical_hinge", "CategoricalHinge")
class CategoricalHinge(_LastAxisLoss):
    """max(max((1 - t) * y) - sum(t * y) + 1, 0) over the last axis."""

    last_axis = "sum"

    def elements(self, t, y):
        others = (1 - t) * y
        top = others.argmax(-1)[..., None]
        neg = np.take_along_axis(others, top, -1)
        value = np.maximum(neg - (t * y).sum(-1, keepdims=True) + 1, 0)
        grad = -t
        np.put_along_axis(grad, top, np.take_along_axis(grad + (1 - t), top, -1), -1)
        grad *= value > 0
        return value[..., 0], grad


@LOSSES.register("cosine_similarity", "CosineSimilarity")
class CosineSimilarity(_LastAxisLoss):
    """-sum(t / |t| * y / |y|) over the last axis; an all-zero vector counts as orthogonal (Keras' normalize:
    x * min(1 / |x|, 1 / epsilon))."""

    last_axis = "sum"

    def __init__(self, axis: int = -1, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
        if axis != -1:
            raise ConfigError("cosine_similarity supports axis=-1 (the last axis) only")
        self.axis = axis

    def elements(self, t, y):
        tn = t * np.minimum(1 / np.sqrt((t * t).sum(-1, keepdims=True)), 1 / EPSILON)
        y_inv = 1 / np.sqrt((y * y).sum(-1, keepdims=True))
        clipped = y_inv > 1 / EPSILON
        y_inv = np.minimum(y_inv, 1 / EPSILON)
        yn = y * y_inv
        along = (tn * yn).sum(-1, keepdims=True)
        grad = -(tn - np.where(clipped, 0, along * yn)) * y_inv
        return -tn * yn, grad


@LOSSES.register("kl_divergence", "KLDivergence", "kld", "kullback_leibler_divergence")
class KLDivergence(_LastAxisLoss):
    """sum(t * log(t / y)) over the last axis, t and y clipped to [1e-7, 1]."""

    last_axis = "sum"

    def elements(self, t, y):
        tc, yc = np.clip(t, EPSILON, 1), np.clip(y, EPSILON, 1)
        return tc * np.log(tc / yc), np.where((y >= EPSILON) & (y <= 1), -tc / yc, 0)


@LOSSES.register("log_cosh", "LogCosh", "logcosh")
class LogCosh(_LastAxisLoss):
    """mean(log(cosh(y - t))), computed as e + softplus(-2e) - log 2 (no overflow)."""

    def elements(self, t, y):
        e = y - t
        return e + np.logaddexp(0, -2 * e) - np.log(2.0), np.tanh(e)


@LOSSES.register("mean_absolute_percentage_error", "MeanAbsolutePercentageError", "mape")
class MeanAbsolutePercentageError(_LastAxisLoss):
    """100 * mean(|t - y| / max(|t|, 1e-7))."""

    def elements(self, t, y):
        scale = 100 / np.maximum(np.abs(t), EPSILON)
        return np.abs(t - y) * scale, np.sign(y - t) * scale


@LOSSES.register("mean_squared_logarithmic_error", "MeanSquaredLogarithmicError", "msle")
class MeanSquaredLogarithmicError(_LastAxisLoss):
    """mean((log(max(y, 1e-7) + 1) - log(max(t, 1e-7) + 1))^2)."""

    def elements(self, t, y):
        shifted = np.maximum(y, EPSILON) + 1
        d = np.log(shifted) - np.log(np.maximum(t, EPSILON) + 1)
        return d * d, np.where(y > EPSILON, 2 * d / shifted, 0)


@LOSSES.register("poisson", "Poisson")
class Poisson(_LastAxisLoss):
    """mean(y - t * log(y + 1e-7))."""

    def elements(self, t, y):
        return y - t * np.log(y + EPSILON), 1 - t / (y + EPSILON)


@LOSSES.register("binary_focal_crossentropy", "BinaryFocalCrossentropy")
class BinaryFocalCrossentropy(_LastAxisLoss):
    """(1 - p_t)^gamma * bce, p_t = t p + (1 - t)(1 - p); with apply_class_balancing weighted alpha for 1s and
    1 - alpha for 0s (Lin et al. 2017, as Keras)."""

    def __init__(self, apply_class_balancing: bool = False, alpha: float = 0.25, gamma: float = 2.0,
                 from_logits: bool = False, label_smoothing: float = 0.0, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
        self.apply_class_balancing, self.alpha, self.gamma = bool(apply_class_balancing), float(alpha), float(gamma)
        self.from_logits, self.label_smoothing = bool(from_logits), float(label_smoothing)

    def elements(self, t, y):
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        p = sigmoid(y) if self.from_logits else y
        pc = np.clip(p, EPSILON, 1 - EPSILON)
        bce = -(t * np.log(pc) + (1 - t) * np.log(1 - pc))
        d_bce = np.where((p >= EPSILON) & (p <= 1 - EPSILON), (pc - t) / (pc * (1 - pc)), 0)
        miss = 1 - (t * p + (1 - t) * (1 - p))  # 1 - p_t
        focal = miss ** self.gamma
        d_focal = self.gamma * miss ** (self.gamma - 1) * (1 - 2 * t) if self.gamma else 0
        values, grad = focal * bce, d_focal * bce + focal * d_bce
        if self.apply_class_balancing:
            weight = t * self.alpha + (1 - t) * (1 - self.alpha)
            values, grad = weight * values, weight * grad
        if self.from_logits:
            grad = grad * p * (1 - p)
        return values, grad


@LOSSES.register("categorical_focal_crossentropy", "CategoricalFocalCrossentropy")
class CategoricalFocalCrossentropy(_LastAxisLoss):
    """sum(-alpha * (1 - o)^gamma * t * log o) over the last axis, o = clip(y / sum(y)) (Keras' renormalisation)."""

    last_axis = "sum"

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, from_logits: bool = False,
                 label_smoothing: float = 0.0, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.from_logits, self.label_smoothing = bool(from_logits), float(label_smoothing)

    def elements(self, t, y):
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + self.label_smoothing / y.shape[-1]
        p = softmax(y) if self.from_logits else y
        total = p.sum(-1, keepdims=True)
        q = p / total
        o = np.clip(q, EPSILON, 1 - EPSILON)
        log_o, miss = np.log(o), 1 - o
        values = -self.alpha * miss ** self.gamma * t * log_o
        d_o = self.alpha * t * (self.gamma * miss ** (self.gamma - 1) * log_o - miss ** self.gamma / o)
        d_q = np.where((q >= EPSILON) & (q <= 1 - EPSILON), d_o, 0)
        grad = (d_q - (d_q * q).sum(-1, keepdims=True)) / total  # through q = p / sum(p)
        if self.from_logits:
            grad = p * (grad - (grad * p).sum(-1, keepdims=True))  # through p = softmax(y)
        return values, grad


class _OverlapLoss(Loss):
    """Dice and Tversky: 1 - overlap / size, the sums taken over `axis` (Keras' default None: every axis, batch
    included, so the batch is one set and every sample reports the batch's value). `overlap(t, y, sums)` gives the
    ratio's numerator and denominator and their derivatives w.r.t. y."""

    def __init__(self, axis=None, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
        if axis is not None:
            axes = [axis] if isinstance(axis, int) else list(axis)
            if 0 in axes or any(not isinstance(a, int) for a in axes):
                raise ConfigError(f"{self.name} axis must be None or non-batch axes (1, 2, ... or -1); got {axis}")
        self.axis = axis
        self.batch_value = axis is None

    def values_per_sample(self, y_pred) -> int:
        """Keras' values keep the axes not summed over (one value per group)."""
        shape = np.shape(y_pred)
        summed = {a % len(shape) for a in ([self.axis] if isinstance(self.axis, int) else self.axis)}
        return int(np.prod([d for i, d in enumerate(shape) if i and i not in summed], dtype=np.int64))

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        t = dense_targets(y_true, y_pred, self.name)
        axes = None if self.axis is None else tuple([self.axis] if isinstance(self.axis, int) else self.axis)
        num, den, d_num, d_den = self.ratio(t, y_pred, lambda v: v.sum(axes, keepdims=True))
        values = 1 - num / den
        grad = -(d_num * den - num * d_den) / (den * den)
        batch = len(y_pred)
        if axes is None:
            # one value for the whole batch: each sample reports it, and the model's 1/batch gives its gradient back
            return np.full(batch, float(values.reshape(-1)[0])), (grad * batch).astype(y_pred.dtype, copy=False)
        per_sample, scale = _per_sample(np.broadcast_to(values, y_pred.shape), batch)
        # every element of a reduced group reports the group's value: the mean over them counts it once per element
        # of the group, so the gradient is the group's, once
        group = y_pred.size // values.size
        return per_sample, (grad * group * scale).astype(y_pred.dtype, copy=False)


@LOSSES.register("dice", "Dice")
class Dice(_OverlapLoss):
    """1 - 2 sum(t y) / (sum(t) + sum(y) + 1e-7)."""

    def ratio(self, t, y, total):
        return 2 * total(t * y), total(t) + total(y) + EPSILON, 2 * t, np.ones_like(y)


@LOSSES.register("tversky", "Tversky")
class Tversky(_OverlapLoss):
    """1 - sum(t y) / (sum(t y) + alpha sum((1 - y) t) + beta sum(y (1 - t)) + 1e-7), Keras' terms as written."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, axis=None, reduction: str = "sum_over_batch_size"):
        super().__init__(axis, reduction)
        self.alpha, self.beta = float(alpha), float(beta)

    def ratio(self, t, y, total):
        inter = total(t * y)
        den = inter + self.alpha * total((1 - y) * t) + self.beta * total(y * (1 - t)) + EPSILON
        return inter, den, t, t - self.alpha * t + self.beta * (1 - t)


@LOSSES.register("categorical_generalized_cross_entropy", "CategoricalGeneralizedCrossEntropy")
class CategoricalGeneralizedCrossEntropy(Loss):
    """(1 - p^q) / q with p the probability of the true class (integer labels), Zhang & Sabuncu's noise-robust
    loss between cross-entropy (q -> 0) and MAE (q = 1), as keras.losses.CategoricalGeneralizedCrossEntropy."""

    def __init__(self, q: float = 0.5, reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
        if not 0 < q < 1:
            raise ConfigError(f"{self.name} q must be in (0, 1); got {q}")
        self.q = float(q)

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        labels = sparse_labels(y_true, y_pred, self.name)
        p = np.take_along_axis(y_pred, labels[..., None], -1)[..., 0].astype(np.float64)
        per_sample, scale = _per_sample((1 - p ** self.q) / self.q, len(y_pred))
        grad = np.zeros_like(y_pred)
        np.put_along_axis(grad, labels[..., None], (-p ** (self.q - 1) * scale)[..., None].astype(y_pred.dtype), -1)
        return per_sample, grad


def _logsumexp(a, mask):
    """log sum(exp(a)) over the last axis where mask, -inf where it holds nothing, and softmax weights over it."""
    a = np.where(mask, a, -np.inf)
    top = a.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(a - top)
    total = e.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.log(total) + top)[..., 0], np.where(total > 0, e / total, 0.0)


@LOSSES.register("circle", "Circle")
class Circle(Loss):
    """Sun et al.'s circle loss on L2-normalised embeddings with integer labels (keras.losses.Circle): each sample
    against the batch, cosine distances d = max(1 - y_i . y_j, 0), softplus(logsumexp over positives of
    -gamma max(margin + d, 0)(margin - d) + logsumexp over negatives of gamma max(1 + margin - d, 0)(1 - margin - d)).
    Samples without a positive pair score 0 and are left out of the mean, as Keras masks them. The batch is the
    reference set, so every sample's loss depends on every other: per-sample weights are refused."""

    def __init__(self, gamma: float = 80.0, margin: float = 0.4, remove_diagonal: bool = True,
                 reduction: str = "sum_over_batch_size"):
        super().__init__(reduction)
        self.gamma, self.margin, self.remove_diagonal = float(gamma), float(margin), bool(remove_diagonal)

    def compute(self, y_true, y_pred, logits=None):
        y = np.asarray(y_pred, np.float64)
        if y.ndim != 2:
            raise ShapeError(f"loss 'circle' needs (batch, dim) embeddings; got outputs of shape "
                             f"(None, {', '.join(map(str, y.shape[1:]))})")
        labels = np.asarray(y_true).reshape(len(y), -1)[:, 0].astype(np.int64)
        same = labels[:, None] == labels[None, :]
        positive = same & ~np.eye(len(y), dtype=bool) if self.remove_diagonal else same
        negative = ~same
        similarity = y @ y.T
        d = np.maximum(1 - similarity, 0)
        m, g = self.margin, self.gamma
        pos_w, neg_w = np.maximum((m + d) * positive, 0), np.maximum((1 + m - d) * negative, 0)
        p_loss, p_soft = _logsumexp(-g * pos_w * (m - d), positive)
        n_loss, n_soft = _logsumexp(g * neg_w * (1 - m - d), negative)
        z = p_loss + n_loss
        per_sample = np.logaddexp(0, z)  # softplus; -inf (no positive or no negative) gives 0
        s = np.where(np.isfinite(z), 1 / (1 + np.exp(-np.where(np.isfinite(z), z, 0))), 0.0)[:, None]
        # d(row loss)/d(d_ij) through both weighted distances, then d/d(similarity) where 1 - similarity > 0
        d_pos = -g * (((m + d > 0) & positive) * (m - d) - pos_w)
        d_neg = -g * (((1 + m - d > 0) & negative) * (1 - m - d) + neg_w)
        grad_d = s * (p_soft * d_pos + n_soft * d_neg)
        grad_s = -grad_d * (1 - similarity > 0)
        return per_sample, ((grad_s + grad_s.T) @ y).astype(np.asarray(y_pred).dtype)

    def mean_count(self, per_sample) -> int:
        return int((per_sample > 0).sum())

    def reduce(self, per_sample, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise DlcliError("loss 'circle' compares every sample with the rest of its batch, so a sample's weight "
                             "has no single loss to scale: train it without sample or class weights")
        return super().reduce(per_sample, y_pred)


@LOSSES.register("ctc", "CTC")
class CTC(Loss):
    """Connectionist temporal classification (keras.losses.CTC): y_true (batch, max_label_length) integer labels
    padded with 0, which is also the blank; y_pred (batch, time, classes) logits (log-softmax taken here); every
    sample uses all time steps. The loss is -log p(labels | inputs) by the forward-backward recursion in log space
    (Graves et al. 2006), one pass over time for the whole batch; impossible alignments give inf as Keras does."""

    def values_per_sample(self, y_pred) -> int:
        return 1  # one value per sequence

    def compute(self, y_true, y_pred, logits=None):
        y_pred = np.asarray(y_pred)
        if y_pred.ndim != 3:
            raise ShapeError(f"loss 'ctc' needs (batch, time, classes) outputs; got (None, "
                             f"{', '.join(map(str, y_pred.shape[1:]))})")
        batch, steps, classes = y_pred.shape
        labels = np.asarray(y_true).reshape(batch, -1)
        if labels.dtype.kind == "f":
            labels = labels.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise DlcliError(f"loss 'ctc' got label {int(labels.max() if labels.max() >= classes else labels.min())}"
                             f"; labels are 1..{classes - 1} with 0 as padding and blank")
        lengths = (labels != 0).sum(1)
        # as torch's ctc_loss, which Keras calls: a row's first `length` entries are its labels
        width = 2 * labels.shape[1] + 1
        extended = np.zeros((batch, width), np.int64)  # blank, l1, blank, l2, ..., blank
        extended[:, 1::2] = labels
        states = np.arange(width)
        inside = states[None, :] < (2 * lengths + 1)[:, None]
        skip = np.zeros((batch, width), bool)  # s-2 -> s allowed: a label unlike the one two states back
        skip[:, 2:] = (extended[:, 2:] != 0) & (extended[:, 2:] != extended[:, :-2])
        log_p = log_softmax(np.asarray(y_pred, np.float64))
        emit = np.take_along_axis(log_p, np.broadcast_to(extended[:, None, :], (batch, steps, width)), 2)
        emit = np.where(inside[:, None, :], emit, -np.inf)
        alpha = np.full((steps, batch, width), -np.inf)
        alpha[0, :, :2] = emit[:, 0, :2]
        for t in range(1, steps):
            prev = alpha[t - 1]
            shift1 = np.pad(prev, ((0, 0), (1, 0)), constant_values=-np.inf)[:, :-1]
            shift2 = np.where(skip, np.pad(prev, ((0, 0), (2, 0)), constant_values=-np.inf)[:, :-2], -np.inf)
            alpha[t] = _logaddexp3(prev, shift1, shift2) + emit[:, t]
        last = 2 * lengths
        rows = np.arange(batch)
        end = np.where(lengths > 0, np.logaddexp(alpha[-1, rows, last], alpha[-1, rows, np.maximum(last - 1, 0)]),
                       alpha[-1, rows, 0])
        beta = np.full((steps, batch, width), -np.inf)
        beta[-1, rows, last] = emit[rows, -1, last]
        beta[-1, rows, np.maximum(last - 1, 0)] = np.where(lengths > 0, emit[rows, -1, np.maximum(last - 1, 0)],
                                                          beta[-1, rows, 0])
        skip_next = np.pad(skip, ((0, 0), (0, 2)))[:, 2:]  # s -> s+2 allowed
        for t in range(steps - 2, -1, -1):
            nxt = beta[t + 1]
            shift1 = np.pad(nxt, ((0, 0), (0, 1)), constant_values=-np.inf)[:, 1:]
            shift2 = np.where(skip_next, np.pad(nxt, ((0, 0), (0, 2)), constant_values=-np.inf)[:, 2:], -np.inf)
            beta[t] = _logaddexp3(nxt, shift1, shift2) + emit[:, t]
        per_sample = -end
        with np.errstate(invalid="ignore"):
            occupancy = np.exp(alpha.transpose(1, 0, 2) + beta.transpose(1, 0, 2) - emit - end[:, None, None])
        occupancy = np.nan_to_num(occupancy)  # -inf - -inf where a state is unreachable
        grad = np.exp(log_p)
        index = np.broadcast_to(extended[:, None, :], occupancy.shape).reshape(batch * steps, width)
        flat = grad.reshape(batch * steps, classes)
        np.add.at(flat, (np.arange(batch * steps)[:, None], index), -occupancy.reshape(batch * steps, width))
        return per_sample, flat.reshape(y_pred.shape).astype(y_pred.dtype)


def _logaddexp3(a, b, c):
    top = np.maximum(np.maximum(a, b), c)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(top), np.log(np.exp(a - safe) + np.exp(b - safe) + np.exp(c - safe)) + safe,
                        -np.inf)


def ctc_greedy_decode(y_pred, merge_repeated: bool = True) -> np.ndarray:
    """Best path decoding of (batch, time, classes) CTC outputs, as keras.ops.ctc_decode(strategy='greedy',
    mask_index=0): the argmax at each step, repeats merged, blanks (0) dropped, the labels left-aligned and padded
    with -1 to (batch, time)."""
    best = np.asarray(y_pred).argmax(-1)
    keep = best != 0
    if merge_repeated:
        keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept labels first, in time order
    return np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(best, order, 1), -1)


def get(identifier) -> Loss:
    """A loss from a name ('mse'), a {type: name, **args} mapping, or a Loss instance (returned as is)."""
    return identifier if isinstance(identifier, Loss) else LOSSES.create(identifier)


def serialize(loss: Loss):
    """The canonical name when every argument is at its default, else {type: name, **args} (YAML-safe)."""
    config = loss.get_config()
    defaults = {n: p.default for n, p in inspect.signature(type(loss).__init__).parameters.items()
                if n not in ("self", "reduction")}
    return loss.name if config == defaults else {"type": loss.name, **config}
