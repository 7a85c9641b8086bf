import numpy as np
import pytest

from dlcli.data.split import kfold_indices, split_indices
from dlcli.errors import ConfigError


def test_shuffled_seeded_split():
    y = np.arange(100) % 3
    a = split_indices(y, 0.2, np.random.default_rng(0))
    b = split_indices(y, 0.2, np.random.default_rng(0))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    train, val = a
    assert len(val) == 20 and len(train) == 80 and sorted(np.r_[train, val].tolist()) == list(range(100))
    assert not np.array_equal(np.sort(val), np.arange(80, 100))  # not Keras' unshuffled tail


def test_stratified_proportions():
    y = np.repeat([0, 1, 2], [700, 200, 100])
    train, val = split_indices(y, 0.1, np.random.default_rng(1), stratify=True)
    assert np.bincount(y[val]).tolist() == [70, 20, 10] and len(train) == 900
    # Uneven shares round by largest remainder, so the total is exact.
    y = np.repeat([0, 1, 2], [5, 5, 5])
    _, val = split_indices(y, 0.2, np.random.default_rng(0), stratify=True)
    assert len(val) == 3 and np.bincount(y[val], minlength=3).tolist() == [1, 1, 1]
    # One-hot targets stratify by class.
    onehot = np.eye(2)[np.repeat([0, 1], [80, 20])]
    _, val = split_indices(onehot, 0.5, np.random.default_rng(0), stratify=True)
    assert onehot[val].sum(0).tolist() == [40, 10]


def test_bad_fractions():
    with pytest.raises(ConfigError, match="between 0 and 1"):
        split_indices(np.arange(10), 1.0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="leaves no training samples"):
        split_indices(np.arange(1), 0.5, np.random.default_rng(0))


def _fold_class_counts(labels, folds):
    return [np.bincount(labels[f], minlength=labels.max() + 1).tolist() for f in folds]


def test_kfold_partition_of_shuffled_labels_is_stratified_by_sample_index():
    """Labels in random order: a fold's indices must be sample indices (not positions in the shuffled order), so
    every fold holds each class in proportion."""
    y = np.random.default_rng(3).permutation(np.repeat([0, 1, 2], [50, 30, 20]))
    folds = kfold_indices(y, 5, np.random.default_rng(0), stratify=True)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    assert _fold_class_counts(y, folds) == [[10, 6, 4]] * 5


def test_kfold_of_one_hot_targets_stratifies_by_class():
    labels = np.random.default_rng(4).permutation(np.repeat([0, 1, 2], [60, 24, 12]))
    folds = kfold_indices(np.eye(3, dtype=np.float32)[labels], 4, np.random.default_rng(1), stratify=True)
    assert sorted(np.concatenate(folds).tolist()) == list(range(96))
    assert _fold_class_counts(labels, folds) == [[15, 6, 3]] * 4
