"""The inputs' preprocessing, one home for training, evaluate, predict and export: what a dataset does to the raw
values it stores (IDX pixels / 255, an npz's `rescale`, word indices left as integers).

The rule for arrays given later (`dlcli predict x.npy`): integer arrays are raw stored values (uint8 pixels, word
indices) and get the dataset's conversion, exactly as its loader converts them; float arrays are taken as already
preprocessed (what the model was fed), so they pass through as float32.
"""
import numpy as np

from dlcli.errors import DlcliError

# Datasets whose inputs are float32 images whatever the file stored; integer-input datasets (imdb, text_folder)
# keep integers so embedding lookups see indices.
_IMAGE_TYPES = ("mnist", "fashion_mnist", "image_folder")


def check_samples(a, where: str):
    """`a` (or each array of a dict) as a dataset or predict takes it: real numbers (bool, integer or float) with
    samples along a first axis. A 0-d array has no samples (len() would raise TypeError), and a complex one would
    lose its imaginary part in the float32 conversion with only NumPy's ComplexWarning."""
    if isinstance(a, dict):
        return {k: check_samples(v, f"{where} '{k}'") for k, v in a.items()}
    if a.dtype.kind not in "biuf":
        raise DlcliError(f"{where}: the array is {a.dtype}; expected real numbers (bool, integer or float)")
    if a.ndim == 0:
        raise DlcliError(f"{where}: the array is a single value (shape ()); expected samples along the first axis, "
                         f"shape (N, ...)")
    return a


def input_conversion(data: dict) -> tuple[str, float]:
    """(dtype, scale) the dataset of a config's `data:` section applies to raw integer inputs. dtype "auto" keeps
    integers unless scaled (npz/npy/csv's default)."""
    kind = data.get("type")
    if kind in ("mnist", "fashion_mnist"):  # the IDX loaders: Keras' book recipe, float32 pixels / 255
        return "float32", (1 / 255 if data.get("normalize", True) else 1.0)
    if kind == "image_folder":  # float32 pixels in 0..255, as Keras' image_dataset_from_directory
        return "float32", 1.0
    if kind in ("npz", "npy"):
        return str(data.get("dtype", "auto")), float(data.get("rescale", 1.0))
    if kind == "csv":  # the CSV loader's features: float32 as written
        return "float32", 1.0
    return "auto", 1.0


def feature_dtype(x: np.ndarray, dtype: str = "auto", scale: float = 1.0) -> np.dtype:
    """"auto": floats to float32, integers (word indices, raw pixels) stay integers unless scaled."""
    if dtype == "auto":
        return np.dtype("float32") if x.dtype.kind == "f" or scale != 1.0 else x.dtype
    return np.dtype(dtype)


def to_features(x: np.ndarray, dtype: str = "auto", scale: float = 1.0) -> np.ndarray:
    """A loader's conversion of stored values: to `feature_dtype`, times `scale`. A scale 1/k with a whole k (the
    IDX images' 1/255, an npz's `rescale: 1/255`) divides by k instead, as Keras' book recipe
    `x.astype("float32") / 255` does: x * (1/255) rounds differently for about half the pixel values."""
    x = x.astype(feature_dtype(x, dtype, scale), copy=False)  # a batch already of that dtype is not copied
    if scale == 1.0:
        return x
    divisor = 1 / scale
    return x / x.dtype.type(divisor) if divisor == round(divisor) else x * x.dtype.type(scale)


def preprocess(x, data: dict, scale: float | None = None):
    """Arrays given for prediction made model-ready as training made them: integers converted as the dataset
    converts its stored values (`scale` overrides the dataset's), floats taken as already preprocessed. A dict
    (named inputs) is converted per array."""
    if isinstance(x, dict):
        return {k: preprocess(v, data, scale) for k, v in x.items()}
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    dtype, default = input_conversion(data)
    return to_features(x, dtype, default if scale is None else scale)
