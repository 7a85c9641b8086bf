"""The Dataset record every loader returns, the dataset registry, `load_dataset(spec)`, and `dataset_type(spec)`:
what a dataset type's data means beyond loading it."""
from dataclasses import dataclass, field, replace

import numpy as np

from dlcli.data.preprocess import to_features
from dlcli.data.source import as_source, fit_inputs
from dlcli.data.split import (are_class_labels, check_limits, class_labels, first_target, kfold_indices, num_samples,
                              split_indices, take)
from dlcli.errors import ConfigError, DlcliError
from dlcli.registry import Registry, did_you_mean, parameters

# name -> loader function; a loader's keyword arguments are the YAML keys of the config's `data:` section.
DATASETS = Registry("dataset")


class DatasetType:
    """A config's `data:` section (`spec`) and what its type knows beyond loading: how stored values become model
    inputs, and how a trained run reads new inputs. Training, evaluate, predict, serve and ONNX export ask this
    object instead of testing type names; a loader whose data needs more than these defaults declares a subclass
    beside itself and registers with it (`register`)."""

    pictures = False  # inputs are images: image files and uploads feed it, scaled by pixel_scale()
    dark_background = False  # light ink on a dark background (MNIST): a photo of dark writing reads as a negative
    rows = False  # inputs are table rows by column name, through the run's stored feature space
    empty = False  # no data at all (`data: {type: none}`)

    def __init__(self, spec: dict):
        self.spec = dict(spec)

    def conversion(self) -> tuple[str, float]:
        """(dtype, scale) the loader applies to raw integer inputs; dtype "auto" keeps integers unless scaled (word
        indices stay indices for embedding lookups)."""
        return "auto", 1.0

    def preprocess(self, x, scale: float | None = None):
        """Arrays given for prediction made model-ready as training made them: integers converted as the loader
        converts its stored values (`scale` overrides its scale), floats taken as already preprocessed. A dict
        (named inputs) is converted per array."""
        if isinstance(x, dict):
            return {k: self.preprocess(v, scale) for k, v in x.items()}
        if x.dtype.kind == "f":
            return x.astype(np.float32, copy=False)
        dtype, default = self.conversion()
        return to_features(x, dtype, default if scale is None else scale)

    def pixel_scale(self) -> float:
        """What an image file's 0-255 pixels are multiplied by: an image dataset's own scaling or the data's
        `rescale`, else Keras' usual 1/255."""
        return self.conversion()[1] if self.pictures or "rescale" in self.spec else 1 / 255

    def onnx_metadata(self) -> dict:
        """What an exported model's metadata says about preparing inputs beyond the data section itself."""
        return {"dlcli.pixel_scale": repr(self.conversion()[1])} if "rescale" in self.spec else {}

    def read_files(self, paths: list, run_dir, model):
        """(model inputs, one label per sample) for `dlcli predict`'s files when this type reads them its own way
        (as its training data was read), else None: arrays, CSV, text lines and images are read generically."""
        return None

    def read_instances(self, instances: list, run_dir, model):
        """Model inputs for `dlcli serve`'s JSON instances when this type reads them its own way, else None."""
        return None

    def cut_texts(self, texts: list[str]) -> list[str]:
        """Texts as the loader cuts them before tokenizing (text_folder's max_length)."""
        return texts

    def decides_input_shapes(self, functional: bool) -> bool:
        """Whether the data gives a Sequential model's input_shape (input_shape()) or a functional model's input
        shapes (input_shapes()), so a config may leave them out; known before anything is read."""
        return False

    def input_shape(self) -> list | None:
        """A Sequential model's input_shape when the data decides it (a table's adapted width), else None."""
        return None

    def input_shapes(self) -> dict | None:
        """A functional model's input shapes by name when the data decides them, else None."""
        return None


def register(*names: str, kind: type = DatasetType):
    """Register a loader under `names`, its data described by `kind` (a DatasetType)."""
    def add(loader):
        loader.dataset_type = kind
        return DATASETS.register(*names)(loader)

    return add


def dataset_type(spec: dict) -> DatasetType:
    """The DatasetType of a config's `data:` section (its loader's, or the defaults for no known type)."""
    loader = DATASETS.get(spec.get("type", "none")) if spec.get("type", "none") in DATASETS else None
    return getattr(loader, "dataset_type", DatasetType)(spec)


@dataclass
class Dataset:
    """The data of a run, asked rather than taken apart. As a loader returns it: arrays with batch on axis 0 (x a
    dict of arrays for named model inputs, y a dict for named outputs); `fitted` to a model: inputs as a Source
    (dlcli.data.source), targets as a list of arrays aligned with the model's outputs.

    x_test / y_test are None when the data has no test split; x_val / y_val are None unless the loader owns the
    validation split (time series split by time) or one was carved (`split`, `fold`)."""

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

    def fitted(self, model) -> "Dataset":
        """Each split's inputs fitted to the model's (fit_inputs: (N, 28, 28) feeds (28, 28, 1)) as a Source, its
        targets listed per model output."""
        def inputs(x):
            return None if x is None else as_source(fit_inputs(x, model))

        def targets(y):
            return None if y is None else model._targets_list(y)

        return replace(self, x_train=inputs(self.x_train), y_train=targets(self.y_train), x_val=inputs(self.x_val),
                       y_val=targets(self.y_val), x_test=inputs(self.x_test), y_test=targets(self.y_test),
                       extra=self.extra or {})

    def sizes(self) -> dict:
        return {name: (0 if xs is None else num_samples(xs))
                for name, xs in (("train", self.x_train), ("validation", self.x_val), ("test", self.x_test))}

    def labels(self, split: str = "train") -> np.ndarray:
        """One class label per sample of a split ("train", "validation", "test"), from its first targets
        (class_labels): what stratified splits and folds, balanced class weights and the classification report
        count."""
        return class_labels(first_target({"train": self.y_train, "validation": self.y_val, "test": self.y_test}[split]))

    def subset(self, train, val=None) -> "Dataset":
        """Training on the training samples at `train` (indices or a slice); with `val`, validation on the
        training samples at `val` (a split or a fold carved from training), else as it was."""
        carved = {} if val is None else {"x_val": take(self.x_train, val), "y_val": take(self.y_train, val)}
        return replace(self, x_train=take(self.x_train, train), y_train=take(self.y_train, train), **carved)

    def limited(self, limit: int | None, test_limit: int | None = None) -> "Dataset":
        """The first `limit` training and validation samples, the first `test_limit` test samples (None: all):
        every loader's `data.limit` and `data.test_limit`."""
        limit, test_limit = check_limits(limit, test_limit)

        def head(a, n):
            return a if a is None or n is None else take(a, slice(0, n))

        return replace(self, x_train=head(self.x_train, limit), y_train=head(self.y_train, limit),
                       x_val=head(self.x_val, limit), y_val=head(self.y_val, limit),
                       x_test=head(self.x_test, test_limit), y_test=head(self.y_test, test_limit))

    def split(self, fraction: float, rng: np.random.Generator, stratify: bool = False) -> "Dataset":
        """Validation carved from training: a seeded shuffled `fraction` of it (split_indices; stratified by
        class label when asked)."""
        return self.subset(*split_indices(first_target(self.y_train), fraction, rng, stratify))

    def folds(self, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        """K validation folds of the training split (kfold_indices), stratified when the targets are class labels."""
        if self.x_val is not None:
            raise DlcliError("train.kfold validates on each fold in turn: the dataset's own validation split would "
                             "go unused; use a dataset without one", exit_code=2)
        targets = first_target(self.y_train)
        return kfold_indices(targets, k, rng, stratify=are_class_labels(targets))

    def fold(self, val) -> "Dataset":
        """The fold validating on training samples `val` (one of `folds`), training on the rest. A table
        (dlcli.data.table) adapts its preprocessing on the fold's training part only and applies it to the fold's
        validation part and to the test split."""
        train, data = np.setdiff1d(np.arange(num_samples(self.x_train)), val), self
        if hasattr(self.x_train, "adapted_on"):
            x = self.x_train.adapted_on(train)
            data = replace(self, x_train=x, x_test=None if self.x_test is None else self.x_test.with_state(x.state),
                           extra={**self.extra, "feature_space": x.state})
        return data.subset(train, val)


def load_fitted(config, model) -> Dataset:
    """The dataset a Config names, fitted to the model, with the seeded validation split (train.validation_split)
    carved unless the loader has its own."""
    data = load_dataset(config.data).fitted(model)
    if data.x_val is None and config.train.validation_split:
        data = data.split(config.train.validation_split, np.random.default_rng([config.seed, 1]),
                          config.train.stratify)
    return data


class NoData(DatasetType):
    empty = True


@register("none", kind=NoData)
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
    params, _ = parameters(loader)
    unknown = [k for k in spec if k not in params]
    if unknown:
        raise ConfigError("; ".join(f"data: unknown key '{k}' for dataset type '{name}'{did_you_mean(k, params)}"
                                    for k in unknown) + f"; known: {', '.join(params)}")
    dataset = loader(**spec)
    dataset.name = dataset.name or name
    return dataset
