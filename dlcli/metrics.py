"""Stateful metrics: `reset()`, `update(y_true, y_pred, sample_weight=None)`, `result() -> float`.

Each metric turns a batch into one value per sample (the last-axis value averaged over any other non-batch axes,
as Keras' `reduce_to_samplewise_values`), and keeps a weighted sum and total weight, so an epoch's result is exact
over uneven batches: sum(value * weight) / sum(weight), not a mean of batch means. Formulas follow
`keras.metrics` (binary threshold 0.5, top-k k=5 counting ties as hits like Keras' `in_top_k`).
"""
import numpy as np

from dlcli.errors import ConfigError
from dlcli.losses import dense_targets, sparse_labels
from dlcli.registry import Registry, did_you_mean

METRICS = Registry("metric")
ACCURACY_ALIASES = ("accuracy", "acc")  # resolved by `resolve` from the loss and output shape


# Parts of metric names where smaller is better (losses, errors, divergences); larger is better for accuracy-like ones.
_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "mape", "msle", "squared", "absolute", "hinge", "crossentropy",
                    "divergence", "poisson", "cosh")


def metric_direction(metric: str) -> str | None:
    """'min' for a loss or error column, 'max' for accuracy, AUC, precision, recall (Keras' mode='auto'); None when
    the name does not say. EarlyStopping, ModelCheckpoint, sweeps and `dlcli runs` all ask here."""
    name = metric.removeprefix("val_")
    if any(part in name for part in _LOWER_IS_BETTER):
        return "min"
    if any(word in name for word in ("acc", "auc", "precision", "recall")):
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
        per_sample = np.asarray(self.values(y_true, y_pred)).reshape(batch, -1).mean(1, dtype=np.float64)
        if sample_weight is None:
            self.total += float(per_sample.sum())
            self.weight += batch
        else:
            w = np.asarray(sample_weight, np.float64).reshape(batch)
            self.total += float(per_sample @ w)
            self.weight += float(w.sum())

    def get_config(self) -> dict:
        return {"type": self.default_name, "name": self.name}


@METRICS.register("binary_accuracy")
class BinaryAccuracy(Metric):
    default_name = "binary_accuracy"

    def __init__(self, name: str | None = None, threshold: float = 0.5):
        super().__init__(name)
        self.threshold = threshold

    def values(self, y_true, y_pred):
        t = dense_targets(y_true, y_pred, self.name)
        hits = t == (y_pred > self.threshold)  # Keras compares the targets to the thresholded 0/1 exactly
        return hits.mean(-1) if y_pred.ndim > 1 else hits

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


@METRICS.register("categorical_accuracy")
class CategoricalAccuracy(Metric):
    default_name = "categorical_accuracy"

    def values(self, y_true, y_pred):
        y_true = np.asarray(y_true)
        if y_true.shape != y_pred.shape and _looks_sparse(y_true, y_pred):
            return sparse_labels(y_true, y_pred, self.name) == y_pred.argmax(-1)  # as Keras 3 does from shapes
        return dense_targets(y_true, y_pred, self.name).argmax(-1) == y_pred.argmax(-1)


@METRICS.register("sparse_categorical_accuracy")
class SparseCategoricalAccuracy(Metric):
    default_name = "sparse_categorical_accuracy"

    def values(self, y_true, y_pred):
        return sparse_labels(y_true, y_pred, self.name) == y_pred.argmax(-1)


@METRICS.register("top_k_categorical_accuracy")
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

    def get_config(self):
        return {**super().get_config(), "k": self.k}


@METRICS.register("sparse_top_k_categorical_accuracy")
class SparseTopKCategoricalAccuracy(TopKCategoricalAccuracy):
    default_name = "sparse_top_k_categorical_accuracy"

    def labels(self, y_true, y_pred):
        return sparse_labels(y_true, y_pred, self.name)


@METRICS.register("mean_squared_error", "mse")
class MeanSquaredError(Metric):
    default_name = "mean_squared_error"

    def values(self, y_true, y_pred):
        error = y_pred - dense_targets(y_true, y_pred, self.name)
        return (error * error).mean(-1) if y_pred.ndim > 1 else error * error


@METRICS.register("mean_absolute_error", "mae")
class MeanAbsoluteError(Metric):
    default_name = "mean_absolute_error"

    def values(self, y_true, y_pred):
        error = np.abs(y_pred - dense_targets(y_true, y_pred, self.name))
        return error.mean(-1) if y_pred.ndim > 1 else error


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
        self.trackers = self.means + [m for ms in model.metrics for m in ms]
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
        """[total, weight] of every tracker: what a mid-epoch checkpoint stores to continue the averages."""
        return [[t.total, t.weight] for t in self.trackers]

    def set_sums(self, sums):
        self.reset()
        for t, (total, weight) in zip(self.trackers, sums):
            t.total, t.weight = total, weight
