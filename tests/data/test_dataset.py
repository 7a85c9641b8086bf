import numpy as np
import pytest

from dlcli.data import DATASETS, Dataset, load_dataset
from dlcli.errors import ConfigError


def test_registry_names():
    assert {"mnist", "fashion_mnist", "npz", "csv", "imdb", "timeseries_csv"} <= set(DATASETS.names())


def test_load_dataset_rejects_unknown_names_and_keys():
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnsit' \(did you mean 'mnist'\?\)"):
        load_dataset({"type": "mnsit"})
    with pytest.raises(ConfigError, match=r"unknown key 'limt' for dataset type 'mnist' \(did you mean 'limit'\?\)"):
        load_dataset({"type": "mnist", "limt": 5})
    with pytest.raises(ConfigError, match="missing 'type'"):
        load_dataset({})
