import numpy as np
import pytest

from dlcli.data import DATASETS, Dataset, load_dataset
from dlcli.errors import ConfigError, ShapeError


def test_registry_names():
    assert {"mnist", "fashion_mnist", "npz", "csv", "imdb", "timeseries_csv"} <= set(DATASETS.names())


def test_load_dataset_rejects_unknown_names_and_keys():
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnsit' \(did you mean 'mnist'\?\)"):
        load_dataset({"type": "mnsit"})
    with pytest.raises(ConfigError, match=r"unknown key 'limt' for dataset type 'mnist' \(did you mean 'limit'\?\)"):
        load_dataset({"type": "mnist", "limt": 5})
    with pytest.raises(ConfigError, match="missing 'type'"):
        load_dataset({})


def test_reshape_to():
    d = Dataset(x_train=np.zeros((4, 28, 28), np.float32), y_train=np.zeros(4), x_test=np.zeros((2, 28, 28)),
                y_test=np.zeros(2), name="mnist")
    r = d.reshape_to([28, 28, 1])
    assert r.x_train.shape == (4, 28, 28, 1) and r.x_test.shape == (2, 28, 28, 1) and r.x_val is None
    assert d.x_train.shape == (4, 28, 28)  # the original is untouched
    assert d.reshape_to((784,)).x_train.shape == (4, 784)
    assert d.reshape_to((None, 28)).x_train.shape == (4, 28, 28)
    with pytest.raises(ShapeError, match=r"train samples have shape \[28, 28\] but the model's input_shape is "
                                         r"\[32, 32, 3\]"):
        d.reshape_to((32, 32, 3))
