"""Stateful metrics: `reset()`, `update(y_true, y_pred, sample_weight=None)`, `result() -> float`.

Each metric turns a batch into one value per sample (the last-axis value averaged over any other non-batch axes,
as Keras' `reduce_to_samplewise_values`), and keeps a weighted sum and total weight, so an epoch's result is exact
over uneven batches: sum(value * weight) / sum(weight), not a mean of batch means. The confusion-matrix metrics
(AUC, precision, recall, true/false positives/negatives), F-scores and R2 keep Keras' sums instead (counts at each
threshold, per-class totals) and compute their result from them at the end, as Keras does. Every metric's epoch
state is `state()`, a fixed-length list of additive sums: checkpoints store it and data-parallel ranks add it up.
Formulas follow `keras.metrics` (binary threshold 0.5, top-k k=5 counting ties as hits like Keras' `in_top_k`).
"""
import inspect

import numpy as np

from dlcli import kernels, losses
from dlcli.errors import ConfigError, ShapeError
from dlcli.losses import EPSILON, dense_targets, sparse_labels
from dlcli.registry import Registry, did_you_mean

METRICS = Registry("metric")
ACCURACY_ALIASES = ("accuracy", "acc")  # resolved by `resolve` from the loss and output shape


# Parts of metric names where smaller is better (losses, errors, divergences); larger is better for accuracy-like ones.
_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "mape", "msle", "squared", "absolute", "hinge", "crossentropy",
                    "divergence", "poisson", "cosh", "false_", "perplexity")
_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "fbeta", "r2", "true_", "cosine_similarity", "io_u",
                     "correlation", "sensitivity", "specificity")


def metric_direction(metric: str) -> str | None:
    """'min' for a loss or error column, 'max' for accuracy, AUC, precision, recall (Keras' mode='auto'); None when
    the name does not say. EarlyStopping, ModelCheckpoint, sweeps and `dlcli runs` all ask here."""
    name = metric.removeprefix("val_")
    if any(part in name for part in _LOWER_IS_BETTER):
        return "min"
    if any(word in name for word in _HIGHER_IS_BETTER):
        return "max"
    return None


class Mean:
    """Weighted running mean of scalars: the loss tracker (update(batch_mean, batch_size))."""

    def __init__(self, name: str = "mean"):
        self.name = name
        self.reset()

    def reset(self):
        self.total, self.weight = 0.0, 0.0

    def update(self, value, weight=1.0):
        self.total += float(value) * float(weight)
        self.weight += float(weight)

    def result(self) -> float:
        return self.total / self.weight if self.weight else 0.0

    def build(self, output_shape):
        """Size the epoch state for outputs of this shape (no batch axis): metrics with per-class sums need it."""

    def state(self) -> list:
        """The epoch so far as additive sums (two for a mean)."""
        return [self.total, self.weight]

    def set_state(self, values):
        self.total, self.weight = (float(v) for v in values)


class Metric(Mean):
    default_name = ""

    def __init__(self, name: str | None = None):
        super().__init__(name or self.default_name)

    def values(self, y_true, y_pred) -> np.ndarray:
        """Per-element values with y_pred.shape[:-1] (one per sample for (batch, d) outputs)."""
        raise NotImplementedError

    def update(self, y_true, y_pred, sample_weight=None):
        y_pred = np.asarray(y_pred)
        batch = len(y_pred)
        values = np.asarray(self.values(y_true, y_pred))
        if sample_weight is None and values.dtype == bool and values.shape == (batch,):
            self.total += np.count_nonzero(values)  # hits per sample (accuracies): the sum below, in one call
            self.weight += batch
            return
        per_sample = values.reshape(batch, -1).mean(1, dtype=np.float64)
        if sample_weight is None:
            self.total += float(per_sample.sum())
            self.weight += batch
        else:
            w = np.asarray(sample_weight, np.float64).reshape(batch)
            self.total += float(per_sample @ w)
            self.weight += float(w.sum())

    def get_config(self) -> dict:
        """{type, name, every other constructor argument} (Keras' get_config): each is kept under its own name."""
        args = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "name")]
        return {"type": self.default_name, "name": self.name, **{a: getattr(self, a) for a in args}}


@METRICS.register("binary_accuracy", "BinaryAccuracy")
class BinaryAccuracy(Metric):
    default_name = "binary_accuracy"

    def __init__(self, name: str | None = None, threshold: float = 0.5):
        super().__init__(name)
        self.threshold = threshold

    def values(self, y_true, y_pred):
        t = dense_targets(y_true, y_pred, self.name)
        hits = t == (y_pred > self.threshold)  # Keras compares the targets to the thresholded 0/1 exactly
        return hits.mean(-1) if y_pred.ndim > 1 else hits


@METRICS.register("categorical_accuracy", "CategoricalAccuracy")
class CategoricalAccuracy(Metric):
    default_name = "categorical_accuracy"

    def values(self, y_true, y_pred):
        y_true = np.asarray(y_true)
        if y_true.shape != y_pred.shape and _looks_sparse(y_true, y_pred):
            return sparse_labels(y_true, y_pred, self.name) == y_pred.argmax(-1)  # as Keras 3 does from shapes
        return dense_targets(y_true, y_pred, self.name).argmax(-1) == y_pred.argmax(-1)


@METRICS.register("sparse_categorical_accuracy", "SparseCategoricalAccuracy")
class SparseCategoricalAccuracy(Metric):
    default_name = "sparse_categorical_accuracy"

    def values(self, y_true, y_pred):
        return sparse_labels(y_true, y_pred, self.name) == y_pred.argmax(-1)

    def update(self, y_true, y_pred, sample_weight=None):
        """One label per sample, unweighted (fit's every batch): the hits counted in one compiled pass
        (kernels/classification.sparse_hits), which also range-checks the labels where they are already (rows,)
        integers of the kernel's type (the loss has just checked the same labels: a second reduction over them,
        after the step, cost ~5 us); otherwise, and on the NumPy path, Metric's update of `values`."""
        y_pred = np.asarray(y_pred)
        compiled = kernels.compiled("classification") if sample_weight is None and y_pred.ndim == 2 else None
        if compiled is None or y_pred.dtype.kind != "f":
            return super().update(y_true, y_pred, sample_weight)
        labels = y_true
        if type(labels) is not np.ndarray or labels.dtype != np.intp or labels.shape != y_pred.shape[:1]:
            labels = sparse_labels(y_true, y_pred, self.name).astype(np.intp, copy=False)
        hits = compiled.sparse_hits(np.ascontiguousarray(y_pred), labels)
        if hits < 0:
            sparse_labels(y_true, y_pred, self.name)  # raises, naming the label
        self.total += hits
        self.weight += len(y_pred)


@METRICS.register("perplexity", "Perplexity")
class Perplexity(Metric):
    """KerasHub's Perplexity: exp of the epoch's mean per-token sparse categorical crossentropy (Keras' renormalised
    and clipped probabilities, or log-softmax with from_logits); tokens equal to mask_token_id are left out, a
    sample weight weighs each of its tokens."""

    default_name = "perplexity"

    def __init__(self, from_logits: bool = False, mask_token_id: int | None = None, name: str | None = None):
        super().__init__(name)
        self.from_logits, self.mask_token_id = bool(from_logits), mask_token_id

    def update(self, y_true, y_pred, sample_weight=None):
        y_pred = np.asarray(y_pred, np.float64)
        labels = sparse_labels(y_true, y_pred, self.name)
        if self.from_logits:
            shifted = y_pred - y_pred.max(-1, keepdims=True)
            picked = np.take_along_axis(shifted, labels[..., None], -1)[..., 0]
            crossentropy = np.log(np.exp(shifted).sum(-1)) - picked
        else:
            q = np.take_along_axis(y_pred, labels[..., None], -1)[..., 0] / y_pred.sum(-1)
            crossentropy = -np.log(np.clip(q, EPSILON, 1 - EPSILON))
        weight = np.ones_like(crossentropy)
        if sample_weight is not None:
            weight *= np.asarray(sample_weight, np.float64).reshape((len(weight),) + (1,) * (weight.ndim - 1))
        if self.mask_token_id is not None:
            weight *= labels != self.mask_token_id
        self.total += float((crossentropy * weight).sum())
        self.weight += float(weight.sum())

    def result(self) -> float:
        return float(np.exp(self.total / self.weight)) if self.weight else 0.0


@METRICS.register("top_k_categorical_accuracy", "TopKCategoricalAccuracy")
class TopKCategoricalAccuracy(Metric):
    default_name = "top_k_categorical_accuracy"

    def __init__(self, k: int = 5, name: str | None = None):
        super().__init__(name)
        self.k = int(k)

    def labels(self, y_true, y_pred):
        return dense_targets(y_true, y_pred, self.name).argmax(-1)

    def values(self, y_true, y_pred):
        labels = self.labels(y_true, y_pred)
        classes = y_pred.shape[-1]
        if self.k >= classes:
            return np.ones(labels.shape, bool)
        flat = y_pred.reshape(-1, classes)
        kth = np.partition(flat, classes - self.k, axis=-1)[:, classes - self.k]
        # Keras' in_top_k: the label's score reaches the k-th largest score (ties count as hits).
        return (flat[np.arange(len(flat)), labels.reshape(-1)] >= kth).reshape(labels.shape)


@METRICS.register("sparse_top_k_categorical_accuracy", "SparseTopKCategoricalAccuracy")
class SparseTopKCategoricalAccuracy(TopKCategoricalAccuracy):
    default_name = "sparse_top_k_categorical_accuracy"

    def labels(self, y_true, y_pred):
        return sparse_labels(y_true, y_pred, self.name)


@METRICS.register("mean_squared_error", "mse", "MeanSquaredError")
class MeanSquaredError(Metric):
    default_name = "mean_squared_error"

    def values(self, y_true, y_pred):
        error = y_pred - dense_targets(y_true, y_pred, self.name)
        return (error * error).mean(-1) if y_pred.ndim > 1 else error * error


@METRICS.register("mean_absolute_error", "mae", "MeanAbsoluteError")
class MeanAbsoluteError(Metric):
    default_name = "mean_absolute_error"

    def values(self, y_true, y_pred):
        error = np.abs(y_pred - dense_targets(y_true, y_pred, self.name))
        return error.mean(-1) if y_pred.ndim > 1 else error


@METRICS.register("root_mean_squared_error", "RootMeanSquaredError")
class RootMeanSquaredError(MeanSquaredError):
    default_name = "root_mean_squared_error"

    def result(self) -> float:
        return float(np.sqrt(super().result()))


class _LossMetric(Metric):
    """A loss's per-sample value as a metric (Keras' MeanMetricWrapper over the loss function)."""

    loss_type = None
    sign = 1.0

    def values(self, y_true, y_pred):
        return self.sign * self.loss_type(**self.loss_args()).compute(y_true, np.asarray(y_pred, np.float64))[0]

    def loss_args(self) -> dict:
        return {}


def _loss_metric(snake, keras_name, loss_type, sign=1.0, **arg_defaults):
    """Register the metric twin of a loss under Keras' two names, taking the loss's arguments (from_logits ...)."""

    def __init__(self, name=None, **args):
        Metric.__init__(self, name)
        unknown = set(args) - set(arg_defaults)
        if unknown:
            raise ConfigError(f"metric '{keras_name}' has no argument '{sorted(unknown)[0]}'; accepted: "
                              f"{', '.join(['name', *arg_defaults]) or 'name'}")
        self.args = {**arg_defaults, **args}

    def get_config(self):
        return {"type": self.default_name, "name": self.name, **self.args}

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
              inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None),
              *[inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in arg_defaults.items()]]
    __init__.__signature__ = inspect.Signature(params)
    cls = type(keras_name, (_LossMetric,), {
        "__init__": __init__, "get_config": get_config, "default_name": snake, "loss_type": loss_type,
        "sign": sign, "loss_args": lambda self: self.args, "__doc__": f"The {snake} loss as a metric (Keras)."})
    METRICS.register(snake, keras_name)(cls)
    return cls


for _snake, _keras, _loss, _sign, _args in [
        ("binary_crossentropy", "BinaryCrossentropy", losses.BinaryCrossentropy, 1.0,
         {"from_logits": False, "label_smoothing": 0.0}),
        ("categorical_crossentropy", "CategoricalCrossentropy", losses.CategoricalCrossentropy, 1.0,
         {"from_logits": False, "label_smoothing": 0.0}),
        ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy", losses.SparseCategoricalCrossentropy,
         1.0, {"from_logits": False}),
        ("kl_divergence", "KLDivergence", losses.KLDivergence, 1.0, {}),
        ("poisson", "Poisson", losses.Poisson, 1.0, {}),
        ("logcosh", "LogCoshError", losses.LogCosh, 1.0, {}),
        ("mean_absolute_percentage_error", "MeanAbsolutePercentageError", losses.MeanAbsolutePercentageError, 1.0,
         {}),
        ("mean_squared_logarithmic_error", "MeanSquaredLogarithmicError", losses.MeanSquaredLogarithmicError, 1.0,
         {}),
        ("hinge", "Hinge", losses.Hinge, 1.0, {}),
        ("squared_hinge", "SquaredHinge", losses.SquaredHinge, 1.0, {}),
        ("categorical_hinge", "CategoricalHinge", losses.CategoricalHinge, 1.0, {}),
        # Keras' metric is the similarity itself (higher is better), the loss its negative
        ("cosine_similarity", "CosineSimilarity", losses.CosineSimilarity, -1.0, {})]:
    _loss_metric(_snake, _keras, _loss, _sign, **_args)


class _Sums(Metric):
    """A metric whose epoch state is arrays of weighted sums (confusion counts, per-class totals) sized by the
    output, so `state()` is a fixed-length vector the trainer can checkpoint and add up over ranks."""

    def build(self, output_shape):
        self.sums = np.zeros(self.state_shape(tuple(output_shape)), np.float64)

    def state_shape(self, output_shape) -> tuple:
        raise NotImplementedError

    def reset(self):
        if hasattr(self, "sums"):
            self.sums[...] = 0

    def state(self) -> list:
        return self.sums.reshape(-1).tolist()

    def set_state(self, values):
        self.sums[...] = np.asarray(values, np.float64).reshape(self.sums.shape)

    def _ensure_built(self, y_pred):
        if not hasattr(self, "sums"):
            self.build(np.shape(y_pred)[1:])


def _single_threshold(thresholds, default, what):
    if thresholds is None:
        return default
    values = thresholds if isinstance(thresholds, (list, tuple)) else [thresholds]
    if len(values) != 1:
        raise ConfigError(f"{what} takes one threshold here (a history column holds one number per epoch); got "
                          f"{thresholds}: add one {what} per threshold")
    if not isinstance(values[0], (int, float)) or isinstance(values[0], bool):
        raise ConfigError(f"{what} threshold must be a number in [0, 1]; got {values[0]!r}")
    value = float(values[0])
    if not 0 <= value <= 1:
        raise ConfigError(f"{what} threshold must be in [0, 1]; got {value}")
    return value


class _Confusion(_Sums):
    """Weighted true/false positive/negative counts at each threshold, summed over the epoch as Keras'
    update_confusion_matrix_variables does: a prediction is positive when it is above the threshold, a target when
    it is non-zero; every element counts (flattened) unless multi_label keeps one column per label. sums has shape
    (4, thresholds, labels): tp, fp, tn, fn."""

    multi_label, top_k, class_id = False, None, None

    def state_shape(self, output_shape):
        labels = output_shape[-1] if self.multi_label and output_shape else 1
        return (4, len(self.cutoffs), labels)

    def update(self, y_true, y_pred, sample_weight=None):
        y_pred = np.asarray(y_pred, np.float64)
        self._ensure_built(y_pred)
        y_true = np.asarray(y_true)
        if y_true.shape != y_pred.shape and y_pred.shape[-1] > 1 and _looks_sparse(y_true, y_pred):
            # class indices against class probabilities (a table's labels): one-hot first. Keras needs one-hot
            # targets here; dlcli reads them from the shapes, as its accuracy does
            y_true = sparse_labels(y_true, y_pred, self.name)[..., None] == np.arange(y_pred.shape[-1])
        t = dense_targets(y_true, y_pred, self.name) != 0
        if getattr(self, "from_logits", False):
            y_pred = 1 / (1 + np.exp(-y_pred))
        weights = np.ones(y_pred.shape) if sample_weight is None else np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape((-1,) + (1,) * (y_pred.ndim - 1)), y_pred.shape)
        if self.top_k is not None:  # Keras' _filter_top_k: everything but the k largest becomes -inf
            kth = -np.sort(-y_pred, -1)[..., self.top_k - 1:self.top_k]
            y_pred = np.where(y_pred >= kth, y_pred, -np.inf)
        if self.class_id is not None:
            y_pred, t, weights = y_pred[..., self.class_id], t[..., self.class_id], weights[..., self.class_id]
        labels = self.sums.shape[2]
        y_pred, t, weights = (a.reshape(-1, labels) for a in (y_pred, t, weights))
        count = len(self.cutoffs)
        # above[i, l] thresholds lie strictly below prediction i: it is positive at thresholds 0 .. above - 1
        above = np.searchsorted(self.cutoffs, y_pred, side="left") + np.arange(labels) * (count + 1)
        size = labels * (count + 1)

        def positives(w):  # (thresholds, labels): the weight of predictions above each threshold
            hist = np.bincount(above.reshape(-1), w.reshape(-1), size).reshape(labels, count + 1)
            return np.cumsum(hist[:, ::-1], 1)[:, ::-1][:, 1:].T

        for w, positive_row, negative_row in ((weights * t, 0, 3), (weights * ~t, 1, 2)):  # tp/fn, then fp/tn
            positive = positives(w)
            self.sums[positive_row] += positive
            self.sums[negative_row] += w.sum(0) - positive

    @property
    def tp(self):
        return self.sums[0]

    @property
    def fp(self):
        return self.sums[1]

    @property
    def tn(self):
        return self.sums[2]

    @property
    def fn(self):
        return self.sums[3]


def _ratio(a, b):
    """a / b, 0 where b is 0 (Keras' divide_no_nan)."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


class _Count(_Confusion):
    row = 0

    def __init__(self, thresholds=None, name: str | None = None):
        super().__init__(name)
        self.thresholds = thresholds
        self.cutoffs = np.array([_single_threshold(thresholds, 0.5, self.default_name)])

    def result(self) -> float:
        return float(self.sums[self.row].sum()) if hasattr(self, "sums") else 0.0


@METRICS.register("true_positives", "TruePositives")
class TruePositives(_Count):
    default_name, row = "true_positives", 0


@METRICS.register("false_positives", "FalsePositives")
class FalsePositives(_Count):
    default_name, row = "false_positives", 1


@METRICS.register("true_negatives", "TrueNegatives")
class TrueNegatives(_Count):
    default_name, row = "true_negatives", 2


@METRICS.register("false_negatives", "FalseNegatives")
class FalseNegatives(_Count):
    default_name, row = "false_negatives", 3


class _PrecisionRecall(_Confusion):
    def __init__(self, thresholds=None, top_k: int | None = None, class_id: int | None = None,
                 name: str | None = None):
        super().__init__(name)
        for key, value, least in (("top_k", top_k, 1), ("class_id", class_id, 0)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ConfigError(f"{self.default_name}: {key} must be an integer >= {least}; got {value!r}")
        self.thresholds, self.top_k, self.class_id = thresholds, top_k, class_id
        # with top_k, every kept prediction counts as positive (Keras' default threshold -inf)
        self.cutoffs = np.array([_single_threshold(thresholds, 0.5 if top_k is None else -np.inf,
                                                      self.default_name)])


@METRICS.register("precision", "Precision")
class Precision(_PrecisionRecall):
    """tp / (tp + fp) over the epoch."""

    default_name = "precision"

    def result(self) -> float:
        return float(_ratio(self.tp, self.tp + self.fp).reshape(-1)[0]) if hasattr(self, "sums") else 0.0


@METRICS.register("recall", "Recall")
class Recall(_PrecisionRecall):
    """tp / (tp + fn) over the epoch."""

    default_name = "recall"

    def result(self) -> float:
        return float(_ratio(self.tp, self.tp + self.fn).reshape(-1)[0]) if hasattr(self, "sums") else 0.0


class _AtConstraint(_Confusion):
    """The best of one rate among the thresholds where another reaches `value` (Keras' SensitivitySpecificityBase):
    counts at num_thresholds thresholds 0, 1/(n-1), ..., 1 (0.5 alone for one) over the epoch, predictions clipped
    to [0, 1] as Keras' bucketed update does; the result is max(dependent where constrained >= value), 0 if none."""

    constraint = ""  # the argument naming `value`: recall, precision, specificity or sensitivity

    def __init__(self, value: float, num_thresholds: int = 200, class_id: int | None = None,
                 name: str | None = None):
        super().__init__(name)
        if not 0 <= value <= 1:
            raise ConfigError(f"{self.default_name} {self.constraint} must be in [0, 1]; got {value}")
        if num_thresholds <= 0:
            raise ConfigError(f"{self.default_name} num_thresholds must be an integer > 0; got {num_thresholds}")
        self.value, self.num_thresholds, self.class_id = float(value), int(num_thresholds), class_id
        inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
        setattr(self, self.constraint, self.value)  # under its own name (recall ...), as Keras keeps it
        self.cutoffs = np.array([0.5] if num_thresholds == 1 else [0.0, *inner, 1.0])

    def update(self, y_true, y_pred, sample_weight=None):
        y_pred = np.asarray(y_pred, np.float64)
        super().update(y_true, np.clip(y_pred, 0, 1) if self.num_thresholds > 1 else y_pred, sample_weight)

    def rates(self) -> tuple[np.ndarray, np.ndarray]:
        """(constrained, dependent) at each threshold."""
        raise NotImplementedError

    def result(self) -> float:
        if not hasattr(self, "sums"):
            return 0.0
        constrained, dependent = (r.reshape(-1) for r in self.rates())
        return float(np.where(constrained >= self.value, dependent, 0).max(initial=0))


def _recall(m):
    return _ratio(m.tp, m.tp + m.fn)


def _precision(m):
    return _ratio(m.tp, m.tp + m.fp)


def _specificity(m):
    return _ratio(m.tn, m.tn + m.fp)


@METRICS.register("precision_at_recall", "PrecisionAtRecall")
class PrecisionAtRecall(_AtConstraint):
    """The best precision where recall >= `recall`."""

    default_name, constraint = "precision_at_recall", "recall"

    def __init__(self, recall: float, num_thresholds: int = 200, class_id: int | None = None,
                 name: str | None = None):
        super().__init__(recall, num_thresholds, class_id, name)

    def rates(self):
        return _recall(self), _precision(self)


@METRICS.register("recall_at_precision", "RecallAtPrecision")
class RecallAtPrecision(_AtConstraint):
    """The best recall where precision >= `precision`."""

    default_name, constraint = "recall_at_precision", "precision"

    def __init__(self, precision: float, num_thresholds: int = 200, class_id: int | None = None,
                 name: str | None = None):
        super().__init__(precision, num_thresholds, class_id, name)

    def rates(self):
        return _precision(self), _recall(self)


@METRICS.register("sensitivity_at_specificity", "SensitivityAtSpecificity")
class SensitivityAtSpecificity(_AtConstraint):
    """The best sensitivity (recall) where specificity >= `specificity`."""

    default_name, constraint = "sensitivity_at_specificity", "specificity"

    def __init__(self, specificity: float, num_thresholds: int = 200, class_id: int | None = None,
                 name: str | None = None):
        super().__init__(specificity, num_thresholds, class_id, name)

    def rates(self):
        return _specificity(self), _recall(self)


@METRICS.register("specificity_at_sensitivity", "SpecificityAtSensitivity")
class SpecificityAtSensitivity(_AtConstraint):
    """The best specificity where sensitivity (recall) >= `sensitivity`."""

    default_name, constraint = "specificity_at_sensitivity", "sensitivity"

    def __init__(self, sensitivity: float, num_thresholds: int = 200, class_id: int | None = None,
                 name: str | None = None):
        super().__init__(sensitivity, num_thresholds, class_id, name)

    def rates(self):
        return _recall(self), _specificity(self)


@METRICS.register("auc", "AUC")
class AUC(_Confusion):
    """Area under the ROC or PR curve from confusion counts at num_thresholds thresholds accumulated over the
    epoch (Keras' AUC: thresholds -1e-7, 1/(n-1), ..., (n-2)/(n-1), 1 + 1e-7; ROC and PR by the trapezoid rule
    ('interpolation'), PR by Davis & Goadrich's interpolation; 'minoring'/'majoring' Riemann sums; multi_label
    averages per-label areas, weighted by label_weights)."""

    default_name = "auc"

    def __init__(self, num_thresholds: int = 200, curve: str = "ROC", summation_method: str = "interpolation",
                 thresholds: list[float] | None = None, multi_label: bool = False,
                 label_weights: list[float] | None = None, from_logits: bool = False, name: str | None = None):
        super().__init__(name)
        if curve.upper() not in ("ROC", "PR"):
            raise ConfigError(f"AUC curve must be 'ROC' or 'PR'; got {curve!r}")
        if summation_method not in ("interpolation", "minoring", "majoring"):
            raise ConfigError(f"AUC summation_method must be interpolation, minoring or majoring; got "
                              f"{summation_method!r}")
        if thresholds is not None:
            inner = sorted(float(t) for t in thresholds)
            num_thresholds = len(inner) + 2
        elif num_thresholds <= 1:
            raise ConfigError(f"AUC num_thresholds must be an integer > 1; got {num_thresholds}")
        else:
            inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
        self.num_thresholds, self.curve, self.summation_method = int(num_thresholds), curve.upper(), summation_method
        self.thresholds, self.multi_label, self.from_logits = thresholds, bool(multi_label), bool(from_logits)
        self.label_weights = None if label_weights is None else [float(w) for w in label_weights]
        self.cutoffs = np.array([-EPSILON, *inner, 1 + EPSILON])

    def update(self, y_true, y_pred, sample_weight=None):
        y_pred = np.asarray(y_pred, np.float64)
        if not self.multi_label:
            y_pred = np.clip(y_pred, 0, 1) if not self.from_logits else y_pred
        super().update(y_true, y_pred, sample_weight)

    def result(self) -> float:
        if not hasattr(self, "sums"):
            return 0.0
        tp, fp, tn, fn = self.tp, self.fp, self.tn, self.fn
        if self.curve == "PR" and self.summation_method == "interpolation":
            areas = self._interpolated_pr(tp, fp, fn)
        else:
            recall = _ratio(tp, tp + fn)
            x, y = (_ratio(fp, fp + tn), recall) if self.curve == "ROC" else (recall, _ratio(tp, tp + fp))
            heights = {"interpolation": (y[:-1] + y[1:]) / 2, "minoring": np.minimum(y[:-1], y[1:]),
                       "majoring": np.maximum(y[:-1], y[1:])}[self.summation_method]
            areas = ((x[:-1] - x[1:]) * heights).sum(0)
        if self.label_weights is not None and self.multi_label:
            w = np.asarray(self.label_weights)
            return float(_ratio((areas * w).sum(), w.sum()))
        return float(areas.mean())

    @staticmethod
    def _interpolated_pr(tp, fp, fn):
        """Davis & Goadrich (2006): precision interpolated between thresholds, as Keras' interpolate_pr_auc."""
        dtp = tp[:-1] - tp[1:]
        p = tp + fp
        dp = p[:-1] - p[1:]
        slope = _ratio(dtp, np.maximum(dp, 0))
        intercept = tp[1:] - slope * p[1:]
        both = (p[:-1] > 0) & (p[1:] > 0)
        ratio = np.where(both, _ratio(p[:-1], np.maximum(p[1:], 0)), 1)
        return _ratio(slope * (dtp + intercept * np.log(ratio)), np.maximum(tp[1:] + fn[1:], 0)).sum(0)


@METRICS.register("fbeta_score", "FBetaScore")
class FBetaScore(_Sums):
    """(1 + beta^2) p r / (beta^2 p + r) from per-class tp, fp, fn summed over the epoch (Keras' FBetaScore: with
    threshold None the row's largest output is the prediction; average micro sums the classes first, macro averages
    the per-class scores, weighted weighs them by the targets' weight). Keras' average None gives one score per
    class; a history column holds one number, so it is accepted for a single-unit output only."""

    default_name = "fbeta_score"

    def __init__(self, average: str | None = None, beta: float = 1.0, threshold: float | None = None,
                 name: str | None = None):
        super().__init__(name)
        if average not in (None, "micro", "macro", "weighted"):
            raise ConfigError(f"{self.default_name} average must be None, micro, macro or weighted; got {average!r}")
        if beta <= 0:
            raise ConfigError(f"{self.default_name} beta must be > 0; got {beta}")
        if threshold is not None and not 0 < threshold <= 1:
            raise ConfigError(f"{self.default_name} threshold must be in (0, 1]; got {threshold}")
        self.average, self.beta, self.threshold = average, float(beta), threshold

    def state_shape(self, output_shape):
        if len(output_shape) != 1:
            raise ConfigError(f"{self.name} needs (batch, classes) outputs (as Keras); the output has shape "
                              f"(None, {', '.join(map(str, output_shape))})")
        if self.average is None and output_shape[-1] != 1:
            raise ConfigError(f"{self.name} with average None gives one score per class ({output_shape[-1]}); "
                              f"give average: macro, micro or weighted for one number per epoch")
        return (4, output_shape[-1])  # tp, fp, fn, target weight per class

    def update(self, y_true, y_pred, sample_weight=None):
        y_pred = np.asarray(y_pred, np.float64)
        self._ensure_built(y_pred)
        t = dense_targets(y_true, y_pred, self.name).astype(np.float64)
        if self.threshold is None:
            predicted = (y_pred >= y_pred.max(-1, keepdims=True)) & (np.abs(y_pred) > 1e-9)
        else:
            predicted = y_pred > self.threshold
        predicted = predicted.astype(np.float64)
        w = 1.0 if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1, 1)
        self.sums += (np.stack([predicted * t, predicted * (1 - t), (1 - predicted) * t, t]) * w).sum(1)

    def result(self) -> float:
        if not hasattr(self, "sums"):
            return 0.0
        tp, fp, fn, weight = self.sums.sum(1, keepdims=True) if self.average == "micro" else self.sums
        precision = tp / (tp + fp + EPSILON)
        recall = tp / (tp + fn + EPSILON)
        score = (1 + self.beta ** 2) * precision * recall / (self.beta ** 2 * precision + recall + EPSILON)
        if self.average == "weighted":
            return float((score * weight / (weight.sum() + EPSILON)).sum())
        return float(score.mean())


@METRICS.register("f1_score", "F1Score")
class F1Score(FBetaScore):
    default_name = "f1_score"

    def __init__(self, average: str | None = None, threshold: float | None = None, name: str | None = None):
        super().__init__(average, 1.0, threshold, name)


@METRICS.register("r2_score", "R2Score")
class R2Score(_Sums):
    """1 - residual sum of squares / total sum of squares per output column, from sums over the epoch (Keras'
    R2Score: uniform_average or variance_weighted_average over columns; num_regressors > 0 adjusts it)."""

    default_name = "r2_score"

    def __init__(self, class_aggregation: str = "uniform_average", num_regressors: int = 0,
                 name: str | None = None):
        super().__init__(name)
        if class_aggregation not in ("uniform_average", "variance_weighted_average"):
            raise ConfigError(f"r2_score class_aggregation must be uniform_average or variance_weighted_average "
                              f"(one number per epoch); got {class_aggregation!r}")
        if num_regressors < 0:
            raise ConfigError(f"r2_score num_regressors must be >= 0; got {num_regressors}")
        self.class_aggregation, self.num_regressors = class_aggregation, int(num_regressors)

    def state_shape(self, output_shape):
        if len(output_shape) != 1:
            raise ConfigError(f"{self.name} needs (batch, outputs) outputs (as Keras); the output has shape "
                              f"(None, {', '.join(map(str, output_shape))})")
        return (5, output_shape[-1])  # sum, squared sum, residual, weight per column; element count (column 0)

    def update(self, y_true, y_pred, sample_weight=None):
        y_pred = np.asarray(y_pred, np.float64)
        self._ensure_built(y_pred)
        t = dense_targets(y_true, y_pred, self.name).astype(np.float64)
        w = np.ones_like(t) if sample_weight is None else np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape(-1, 1), t.shape)
        self.sums[:4] += np.stack([t * w, t * t * w, (t - y_pred) ** 2 * w, w]).sum(1)
        self.sums[4, 0] += t.size

    def result(self) -> float:
        if not hasattr(self, "sums") or not self.sums[3].any():
            return 0.0
        total_sum, squared, residual, count = self.sums[:4]
        with np.errstate(divide="ignore", invalid="ignore"):
            total = squared - total_sum * (total_sum / count)
            raw = 1 - residual / total
        raw = np.where(np.isinf(raw), 0.0, raw)
        score = raw.mean() if self.class_aggregation == "uniform_average" else (total * raw).sum() / total.sum()
        n, p = self.sums[4, 0], self.num_regressors
        if p and p < n - 1:  # Keras falls back to the plain score when there are too few samples
            score = 1 - (1 - score) * (n - 1) / (n - p - 1)
        return float(score)


class IoU(_Sums):
    """Intersection over union tp / (tp + fp + fn) per class from a (true class, predicted class) confusion matrix
    summed over the epoch, averaged over target_class_ids whose denominator is non-zero (Keras' IoU). Labels and
    predictions are class ids (sparse_y_true/sparse_y_pred) or, when not sparse, the argmax over `axis`; pairs
    outside [0, num_classes) and targets equal to ignore_class count nothing. Keras' default dtype is int, which
    truncates fractional sample weights (it warns); dlcli sums weights as Keras with dtype='float64' does. A
    per-sample weight counts for every element of that sample (Keras needs one weight per element there)."""

    default_name = "io_u"

    def __init__(self, num_classes: int, target_class_ids: list[int], name: str | None = None,
                 ignore_class: int | None = None, sparse_y_true: bool = True, sparse_y_pred: bool = True,
                 axis: int = -1):
        super().__init__(name)
        if int(num_classes) < 1:
            raise ConfigError(f"{self.default_name} num_classes must be an integer >= 1; got {num_classes}")
        ids = [int(i) for i in (target_class_ids if isinstance(target_class_ids, (list, tuple))
                                else [target_class_ids])]
        if not ids or min(ids) < 0 or max(ids) >= num_classes:
            raise ConfigError(f"{self.default_name} target_class_ids must be class ids in [0, {num_classes}); got "
                              f"{target_class_ids}")
        self.num_classes, self.target_class_ids, self.ignore_class = int(num_classes), ids, ignore_class
        self.sparse_y_true, self.sparse_y_pred, self.axis = bool(sparse_y_true), bool(sparse_y_pred), int(axis)

    def state_shape(self, output_shape):
        return (self.num_classes, self.num_classes)  # rows: true class, columns: predicted class

    def classes(self, y_true, y_pred):
        """(true ids, predicted ids), both of one shape."""
        y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
        if not self.sparse_y_true:
            y_true = y_true.argmax(self.axis)
        if not self.sparse_y_pred:
            y_pred = y_pred.argmax(self.axis)
        if y_true.size != y_pred.size:
            raise ShapeError(f"{self.name} needs one class id per prediction: got targets of shape "
                             f"{y_true.shape} for class ids of shape {y_pred.shape} (sparse_y_true/sparse_y_pred "
                             f"say which of them hold class ids rather than scores)")
        return y_true.reshape(y_pred.shape), y_pred

    def update(self, y_true, y_pred, sample_weight=None):
        self._ensure_built(np.asarray(y_pred))
        y_true, y_pred = self.classes(y_true, y_pred)
        weight = np.ones(y_pred.shape) if sample_weight is None else np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape((len(y_pred),) + (1,) * (y_pred.ndim - 1)), y_pred.shape)
        n = self.num_classes
        keep = (y_true >= 0) & (y_true < n) & (y_pred >= 0) & (y_pred < n)
        if self.ignore_class is not None:
            keep &= y_true != self.ignore_class
        # Keras casts the float ids to int64 (truncation) after the bounds check
        cell = y_true[keep].astype(np.int64) * n + y_pred[keep].astype(np.int64)
        self.sums += np.bincount(cell, weight[keep], n * n).reshape(n, n)

    def result(self) -> float:
        if not hasattr(self, "sums"):
            return 0.0
        tp = np.diag(self.sums)
        denominator = (self.sums.sum(0) + self.sums.sum(1) - tp)[self.target_class_ids]
        valid = denominator > 1e-9
        iou = np.where(valid, tp[self.target_class_ids] / (denominator + EPSILON), 0.0)
        return float(iou.sum() / (valid.sum() + EPSILON))


METRICS.register("IoU")(IoU)


@METRICS.register("MeanIoU")
class MeanIoU(IoU):
    """IoU averaged over every class (Keras)."""

    default_name = "mean_io_u"

    def __init__(self, num_classes: int, name: str | None = None, ignore_class: int | None = None,
                 sparse_y_true: bool = True, sparse_y_pred: bool = True, axis: int = -1):
        super().__init__(num_classes, list(range(int(num_classes))), name, ignore_class, sparse_y_true,
                         sparse_y_pred, axis)


@METRICS.register("BinaryIoU")
class BinaryIoU(IoU):
    """IoU of a binary output: a prediction >= threshold is class 1, else 0 (Keras)."""

    default_name = "binary_io_u"

    def __init__(self, target_class_ids: list[int] = (0, 1), threshold: float = 0.5, name: str | None = None):
        super().__init__(2, list(target_class_ids), name)
        self.threshold = float(threshold)

    def classes(self, y_true, y_pred):
        y_pred = np.asarray(y_pred)
        return super().classes(np.asarray(y_true, np.float64).reshape(y_pred.shape),
                               (y_pred.astype(np.float32) >= self.threshold).astype(np.float64))


@METRICS.register("OneHotIoU")
class OneHotIoU(IoU):
    """IoU of one-hot targets and scores: both argmax over `axis` (Keras)."""

    default_name = "one_hot_io_u"

    def __init__(self, num_classes: int, target_class_ids: list[int], name: str | None = None,
                 ignore_class: int | None = None, sparse_y_pred: bool = False, axis: int = -1):
        super().__init__(num_classes, target_class_ids, name, ignore_class, False, sparse_y_pred, axis)


@METRICS.register("OneHotMeanIoU")
class OneHotMeanIoU(MeanIoU):
    """MeanIoU of one-hot targets and scores (Keras)."""

    default_name = "one_hot_mean_io_u"

    def __init__(self, num_classes: int, name: str | None = None, ignore_class: int | None = None,
                 sparse_y_pred: bool = False, axis: int = -1):
        super().__init__(num_classes, name, ignore_class, False, sparse_y_pred, axis)


@METRICS.register("Accuracy")
class Accuracy(Metric):
    """How often the output equals the target exactly (Keras' Accuracy: for outputs that are already labels; the
    'accuracy' string picks binary, categorical or sparse accuracy from the loss instead)."""

    default_name = "accuracy"

    def values(self, y_true, y_pred):
        return dense_targets(y_true, y_pred, self.name) == y_pred


class _Correlation(Metric):
    """A per-sample correlation over `axis` (a non-batch axis), averaged over samples (Keras' MeanMetricWrapper
    over keras.metrics.pearson_correlation / concordance_correlation: one value per sample, so a one-unit output
    has none to speak of and gives NaN, as in Keras)."""

    def __init__(self, name: str | None = None, axis: int = -1):
        super().__init__(name)
        if axis == 0:
            raise ConfigError(f"{self.default_name} axis must be a non-batch axis (-1, 1, ...); got 0")
        self.axis = int(axis)

    def values(self, y_true, y_pred):
        t = dense_targets(y_true, y_pred, self.name).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.correlation(t, np.asarray(y_pred, np.float64), self.axis)


@METRICS.register("pearson_correlation", "PearsonCorrelation")
class PearsonCorrelation(_Correlation):
    default_name = "pearson_correlation"

    @staticmethod
    def correlation(t, p, axis):
        t = t - t.mean(axis, keepdims=True)
        p = p - p.mean(axis, keepdims=True)
        return (t / t.std(axis, keepdims=True) * p / p.std(axis, keepdims=True)).mean(axis)


@METRICS.register("concordance_correlation", "ConcordanceCorrelation")
class ConcordanceCorrelation(_Correlation):
    default_name = "concordance_correlation"

    @staticmethod
    def correlation(t, p, axis):
        t_mean, p_mean = t.mean(axis, keepdims=True), p.mean(axis, keepdims=True)
        norm = t.var(axis, keepdims=True) + p.var(axis, keepdims=True) + (t_mean - p_mean) ** 2
        # Keras 3.15 centres y_true on y_pred's mean in the covariance (not on its own); matched, not corrected
        return (2 * (t - p_mean) * (p - p_mean) / (norm + EPSILON)).mean(axis)


def _looks_sparse(y_true, y_pred) -> bool:
    return y_true.ndim == y_pred.ndim - 1 or (y_true.ndim == y_pred.ndim and y_true.shape[-1] == 1
                                              and y_pred.shape[-1] > 1)


def get(identifier) -> Metric:
    """A fresh metric from a name, a {type: name, **args} mapping, or a Metric instance (returned as is).

    Keras shows a metric under the string it was given ('mse' stays 'mse')."""
    if isinstance(identifier, Mean):
        return identifier
    if isinstance(identifier, dict):
        return METRICS.create(identifier)
    if not isinstance(identifier, str):
        raise ConfigError(f"a metric must be a name, a {{type: ...}} mapping or a Metric; got {identifier!r}")
    if identifier.lower() in ACCURACY_ALIASES:
        return resolve(identifier)  # no loss or shape known here: categorical
    if identifier not in METRICS:
        known = [*METRICS.names(), *ACCURACY_ALIASES]
        raise ConfigError(f"unknown metric '{identifier}'{did_you_mean(identifier, known)}; known: {', '.join(known)}")
    return METRICS.get(identifier)(name=identifier)


def resolve(identifier, loss=None, output_shape=None) -> Metric:
    """`get`, with 'accuracy'/'acc' picking the variant that fits the loss and output (Keras' compile_utils):
    binary for one output unit or binary_crossentropy, sparse for sparse_categorical_crossentropy, else
    categorical. The metric keeps the name it was asked by ('accuracy')."""
    if isinstance(identifier, str) and identifier.lower() in ACCURACY_ALIASES:
        loss_name = getattr(loss, "name", loss)
        if (output_shape is not None and tuple(output_shape)[-1:] == (1,)) or loss_name == "binary_crossentropy":
            return BinaryAccuracy(name=identifier)
        if loss_name == "sparse_categorical_crossentropy":
            return SparseCategoricalAccuracy(name=identifier)
        return CategoricalAccuracy(name=identifier)
    return get(identifier)


class RunningLogs:
    """The loss, each output's loss (with several outputs) and every metric, accumulated batch by batch as exact
    weighted means; `results()` maps them to Keras' names ('loss', 'out_loss', 'accuracy' ...)."""

    def __init__(self, model):
        self.names = model._metric_names()
        self.means = [Mean() for _ in range(1 + (len(model.outputs) if len(model.outputs) > 1 else 0))]
        self.metrics = model.metrics
        for output, ms in zip(model.outputs, model.metrics):
            for m in ms:
                m.build(output.shape)
        self.trackers = self.means + [m for ms in model.metrics for m in ms]
        self.sizes = [len(t.state()) for t in self.trackers]
        self.reset()

    def reset(self):
        for t in self.trackers:
            t.reset()

    def update(self, total, parts, ys, outs, sample_weight=None):
        size = len(ys[0])
        self.means[0].update(total, size)
        for mean, value in zip(self.means[1:], parts):
            mean.update(value, size)
        for y, out, ms in zip(ys, outs, self.metrics):
            for m in ms:
                m.update(y, out, sample_weight)

    def results(self, extra_loss: float = 0.0) -> dict:
        values = [t.result() for t in self.trackers]
        values[0] += extra_loss
        return {k: float(v) for k, v in zip(self.names, values)}

    def sums(self) -> list:
        """Every tracker's state, one flat list (the loss means' [total, weight] pairs first): what a mid-epoch
        checkpoint stores to continue the epoch, and what data-parallel ranks add up."""
        return [v for t in self.trackers for v in t.state()]

    def set_sums(self, sums):
        flat = np.asarray(sums, np.float64).reshape(-1)  # checkpoints before 2026-12-06 held [total, weight] pairs
        self.reset()
        start = 0
        for t, size in zip(self.trackers, self.sizes):
            t.set_state(flat[start:start + size])
            start += size

    def batch_losses(self, moved) -> np.ndarray:
        """The loss (and each output's loss) of the batch whose sums are `moved` (sums() after minus before)."""
        pairs = np.asarray(moved, np.float64).reshape(-1)[:2 * len(self.means)].reshape(-1, 2)
        return pairs[:, 0] / np.maximum(pairs[:, 1], 1e-300)
