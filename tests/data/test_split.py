import numpy as np
import pytest

from dlcli.data import validation_split
from dlcli.errors import ConfigError


def test_shuffled_seeded_split():
    x, y = np.arange(100), np.arange(100) % 3
    a = validation_split(x, y, 0.2, np.random.default_rng(0))
    b = validation_split(x, y, 0.2, np.random.default_rng(0))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    x_tr, y_tr, x_val, y_val = a
    assert len(x_val) == 20 and len(x_tr) == 80 and sorted(np.r_[x_tr, x_val].tolist()) == list(range(100))
    assert not np.array_equal(np.sort(x_val), np.arange(80, 100))  # not Keras' unshuffled tail
    assert np.array_equal(y_tr, x_tr % 3)


def test_stratified_proportions():
    y = np.repeat([0, 1, 2], [700, 200, 100])
    x = {"a": np.arange(1000), "b": np.arange(1000) * 2}  # named inputs
    x_tr, y_tr, x_val, y_val = validation_split(x, y, 0.1, np.random.default_rng(1), stratify=True)
    assert np.bincount(y_val).tolist() == [70, 20, 10] and len(y_tr) == 900
    assert np.array_equal(x_val["b"], x_val["a"] * 2) and np.array_equal(y[x_val["a"]], y_val)
    # Uneven shares round by largest remainder, so the total is exact.
    y = np.repeat([0, 1, 2], [5, 5, 5])
    _, _, _, y_val = validation_split(np.arange(15), y, 0.2, np.random.default_rng(0), stratify=True)
    assert len(y_val) == 3 and np.bincount(y_val, minlength=3).tolist() == [1, 1, 1]
    # One-hot targets stratify by class.
    onehot = np.eye(2)[np.repeat([0, 1], [80, 20])]
    _, _, _, v = validation_split(np.arange(100), onehot, 0.5, np.random.default_rng(0), stratify=True)
    assert v.sum(0).tolist() == [40, 10]


def test_bad_fractions():
    with pytest.raises(ConfigError, match="between 0 and 1"):
        validation_split(np.arange(10), np.arange(10), 1.0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="leaves no training samples"):
        validation_split(np.arange(1), np.arange(1), 0.5, np.random.default_rng(0))
