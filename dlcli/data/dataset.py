"""The Dataset record every loader returns, the dataset registry, `load_dataset(spec)`, and `dataset_type(spec)`:
what a dataset type's data means beyond loading it."""
from dataclasses import dataclass, field

import numpy as np

from dlcli.data.preprocess import to_features
from dlcli.errors import ConfigError
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
