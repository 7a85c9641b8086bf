"""The Dataset record every loader returns, the dataset registry, and `load_dataset(spec)`."""
import inspect
from dataclasses import dataclass, field

import numpy as np

from dlcli.errors import ConfigError
from dlcli.registry import Registry, did_you_mean

# name -> loader function; a loader's keyword arguments are the YAML keys of the config's `data:` section.
DATASETS = Registry("dataset")


@dataclass
class Dataset:
    """Arrays with batch on axis 0. x may be a dict of arrays (named model inputs).

    x_test / y_test are None when the data has no test split; x_val / y_val are None unless the loader owns the
    validation split (time series split by time), meaning "the trainer makes its own split"."""

    x_train: np.ndarray | dict
    y_train: np.ndarray | dict  # a dict of arrays for named model outputs
    x_test: np.ndarray | dict | None = None
    y_test: np.ndarray | dict | None = None
    classes: list[str] | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)
    x_val: np.ndarray | dict | None = None
    y_val: np.ndarray | None = None
    name: str = ""


@DATASETS.register("none")
def no_dataset() -> Dataset:
    """`data: {type: none}`: a model without data, as `dlcli import-keras` writes it; loading it says what to do."""
    raise ConfigError("this run's config has no dataset (data: {type: none}, as dlcli import-keras writes it); give "
                      "one when importing (--set data.type=mnist) or in a config for train --init-from")


def load_dataset(spec: dict) -> Dataset:
    """spec = {type: <registered name>, **loader keyword arguments} (the config's `data:` section)."""
    spec = dict(spec)
    if "type" not in spec:
        raise ConfigError(f"data: missing 'type'; known dataset types: {', '.join(DATASETS.names())}")
    name = spec.pop("type")
    loader = DATASETS.get(name)
    params = inspect.signature(loader).parameters
    unknown = [k for k in spec if k not in params]
    if unknown:
        raise ConfigError("; ".join(f"data: unknown key '{k}' for dataset type '{name}'{did_you_mean(k, params)}"
                                    for k in unknown) + f"; known: {', '.join(params)}")
    dataset = loader(**spec)
    dataset.name = dataset.name or name
    return dataset
