"""The conversion of stored values every loader applies (IDX pixels / 255, an npz's `rescale`, word indices left as
integers), and the check of arrays given as samples.

Each dataset type says which conversion its loader applies (DatasetType.conversion, declared beside the loader), so
the rule for arrays given later (`dlcli predict x.npy`) is the loader's own: integer arrays are raw stored values
(uint8 pixels, word indices) and get that conversion; float arrays are taken as already preprocessed (what the model
was fed), so they pass through as float32 (DatasetType.preprocess).
"""
import numpy as np

from dlcli.errors import DlcliError


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
