"""The index arithmetic behind Dataset's split, folds, subsets and limits: subsets of inputs and targets by index,
seeded shuffled (optionally stratified) splits, k folds, class labels of targets, and the `limit` check."""
import numpy as np

from dlcli.data.source import Source
from dlcli.errors import ConfigError


def take(x, index):
    """x[index] for an array, a list (one array per model input or output) or a dict of arrays (named ones); a
    Source's subset."""
    if isinstance(x, Source):
        return x.subset(index)
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return [a[index] for a in x] if isinstance(x, list) else x[index]


def first_target(y):
    """The first of a list (one array per model output) or dict (named outputs) of targets; an array as it is."""
    return y[0] if isinstance(y, list) else next(iter(y.values())) if isinstance(y, dict) else y


def class_labels(y) -> np.ndarray:
    """One label per sample: one-hot rows by their largest entry, other targets as they are (flattened)."""
    y = np.asarray(y)
    return y.reshape(len(y), -1).argmax(1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(len(y))


def are_class_labels(y) -> bool:
    """Targets that are class labels (integers, or one-hot rows), not regression values."""
    y = np.asarray(y)
    if y.ndim > 1 and y.shape[-1] > 1:
        return bool(np.all((y == 0) | (y == 1)) and np.all(y.sum(-1) == 1))
    return y.dtype.kind in "iub"


def num_samples(x) -> int:
    if isinstance(x, Source):
        return len(x)
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def split_indices(y, fraction: float, rng: np.random.Generator, stratify: bool = False):
    """(train_idx, val_idx): a shuffled split with N - int(N * (1 - fraction)) validation samples (Keras' count).
    Stratified: each class keeps its proportion (largest-remainder rounding so the total is exact)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"a split fraction must be between 0 and 1 (exclusive); got {fraction}")
    y = np.asarray(y)
    n = len(y)
    n_val = n - int(n * (1.0 - fraction))
    if n_val == 0 or n_val == n:
        raise ConfigError(f"a split of {fraction} of {n} samples leaves "
                          f"{'no validation' if n_val == 0 else 'no training'} samples; change the fraction")
    if not stratify:
        order = rng.permutation(n)
        return order[n_val:], order[:n_val]
    labels = class_labels(y)  # one-hot targets stratify by class
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    share = counts * (n_val / n)
    per_class = np.floor(share).astype(int)
    per_class[np.argsort(per_class - share)[: n_val - per_class.sum()]] += 1  # largest remainders first
    # Shuffle, then stable-sort by class: each class's members in random order, then take its first per_class[c].
    order = rng.permutation(n)
    order = order[np.argsort(inverse[order], kind="stable")]
    rank = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    is_val = rank < per_class[inverse[order]]
    val, train = order[is_val], order[~is_val]
    return rng.permutation(train), rng.permutation(val)


def kfold_indices(y, k: int, rng: np.random.Generator, stratify: bool = False) -> list[np.ndarray]:
    """K disjoint validation folds (sorted index arrays) covering every sample once, sizes differing by at most one.
    Stratified: samples are shuffled, grouped by class, then dealt to the folds in turn, so every fold keeps each
    class's proportion (scikit-learn's StratifiedKFold idea)."""
    y = np.asarray(y)
    n = len(y)
    if not 2 <= k <= n:
        raise ConfigError(f"train.kfold must be between 2 and the number of training samples ({n}); got {k}")
    order = rng.permutation(n)
    if stratify:
        order = order[np.argsort(class_labels(y)[order], kind="stable")]
    fold_of = np.empty(n, np.int64)
    fold_of[order] = np.arange(n) % k
    return [np.flatnonzero(fold_of == i) for i in range(k)]


def check_limit(limit, key: str = "data.limit") -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ConfigError(f"{key} must be a positive integer (number of samples) or null; got {limit!r}")
    return int(limit)


def check_limits(limit, test_limit) -> tuple[int | None, int | None]:
    """`data.limit` caps the training (and a loader's own validation) split; `data.test_limit` the test split, so
    a smoke run still reports a figure on the whole test set unless asked not to."""
    return check_limit(limit), check_limit(test_limit, "data.test_limit")
