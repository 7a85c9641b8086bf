"""User data: NumPy .npz archives and CSV files of numeric features with a label column."""
import zipfile

import numpy as np

from dlcli.data.dataset import Dataset, DatasetType, register
from dlcli.data.mapped import MappedSource, map_npy, map_npz_member
from dlcli.data.paths import resolve_path
from dlcli.data.preprocess import check_samples, feature_dtype, to_features
from dlcli.data.split import check_limits, first_target, num_samples, split_indices, take
from dlcli.errors import ConfigError, DlcliError

X_DTYPES = ("auto", "float32", "float64", "int32", "int64")


def _targets(y):
    """Class indices as int64 (what sparse losses and the confusion matrix expect), regression targets float32."""
    if isinstance(y, dict):  # named model outputs
        return {k: _targets(v) for k, v in y.items()}
    return y.astype(np.int64) if y.dtype.kind in "biu" else y.astype(np.float32)


def _mapped(x: np.memmap, dtype: str, rescale: float) -> MappedSource:
    """A memory-mapped x, converted batch by batch as to_features converts a whole array."""
    return MappedSource(x, feature_dtype(x, dtype, rescale), rescale)


def _finish(source, x, y, x_test, y_test, test_split, stratify, seed, limit, classes=None,
            test_limit=None) -> Dataset:
    """Split off a seeded test set when the data has none, then cap train at `limit` and test at `test_limit`."""
    if test_split:
        if x_test is not None:
            raise ConfigError(f"data: both a test set and test_split={test_split} given for {source}; use one")
        kept, off = split_indices(first_target(y), float(test_split), np.random.default_rng(seed), stratify)
        x, y, x_test, y_test = take(x, kept), take(y, kept), take(x, off), take(y, off)
    return Dataset(x_train=x, y_train=y, x_test=x_test, y_test=y_test, classes=classes,
                   source=str(source)).limited(limit, test_limit)


def _check_common(test_split, limit, dtype=None, test_limit=None):
    check_limits(limit, test_limit)
    if not isinstance(test_split, (int, float)) or not 0.0 <= test_split < 1.0:
        raise ConfigError(f"data.test_split must be a fraction in [0, 1); got {test_split!r}")
    if dtype is not None and dtype not in X_DTYPES:
        raise ConfigError(f"data.dtype must be one of {', '.join(X_DTYPES)}; got {dtype!r}")


class StoredArrays(DatasetType):
    """npz / npy: each batch converted to `dtype` times `rescale` (integers kept unless scaled, "auto")."""

    def conversion(self):
        return str(self.spec.get("dtype", "auto")), float(self.spec.get("rescale", 1.0))


class CsvFeatures(DatasetType):
    def conversion(self):  # the CSV loader's features: float32 as written
        return "float32", 1.0


@register("npz", kind=StoredArrays)
def load_npz(path: str, x: str | dict[str, str] = "x", y: str | dict[str, str] = "y",
             x_test: str | dict[str, str] | None = None, y_test: str | dict[str, str] | None = None, test_split: float = 0.0, stratify: bool = False, seed: int = 0,
             limit: int | None = None, dtype: str = "auto", rescale: float = 1.0,
             classes: list[str] | None = None, mmap: bool = False, test_limit: int | None = None) -> Dataset:
    """Arrays from an .npz archive by key (x may map model input names to keys, y model output names). Without x_test/y_test,
    test_split holds out a seeded shuffled fraction (seed fixed per dataset, not per run, so runs with
    different seeds share one test set). limit caps train to its first N samples, test_limit the test split.
    mmap: true memory-maps x and x_test (members saved uncompressed, np.savez) and reads them batch by batch,
    for arrays larger than memory; targets are loaded."""
    _check_common(test_split, limit, dtype, test_limit)
    if mmap and (isinstance(x, dict) or isinstance(x_test, dict)):
        raise ConfigError("data.mmap: memory-mapping takes one x array (not named inputs)")
    if (x_test is None) != (y_test is None):
        raise ConfigError("data: give both x_test and y_test (or neither)")
    file = resolve_path(path)
    try:
        with np.load(file, allow_pickle=False) as archive:
            keys = set(archive.files)

            def get(key, mapped=False):
                if isinstance(key, dict):
                    return {name: get(k, mapped) for name, k in key.items()}
                if key not in keys:
                    raise DlcliError(f"{file}: no array '{key}'; the archive has: {', '.join(sorted(keys))}")
                # a mapped array is never read whole
                return check_samples(map_npz_member(file, key) if mapped else archive[key], f"{file}: array '{key}'")

            xs, ys = get(x, mmap), get(y)  # targets are always loaded
            xt, yt = (get(x_test, mmap), get(y_test)) if x_test is not None else (None, None)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        from dlcli.run_files import npz_problem

        raise DlcliError(f"{file}: cannot read as .npz of plain arrays ({npz_problem(file, e)})") from None

    def convert(a):
        if mmap:
            return _mapped(a, dtype, rescale)
        return {k: to_features(v, dtype, rescale) for k, v in a.items()} if isinstance(a, dict) \
            else to_features(a, dtype, rescale)

    for xa, ya, which in ((xs, ys, f"'{x}'/'{y}'"), (xt, yt, f"'{x_test}'/'{y_test}'")):
        if ya is not None and num_samples(xa) != num_samples(ya):
            raise DlcliError(f"{file}: {which} have {num_samples(xa)} samples but {num_samples(ya)} targets")
    return _finish(file, convert(xs), _targets(ys), None if xt is None else convert(xt),
                   None if yt is None else _targets(yt), test_split, stratify, seed, limit, classes, test_limit)


@register("npy", kind=StoredArrays)
def load_npy(x: str, y: str, x_test: str | None = None, y_test: str | None = None, test_split: float = 0.0,
             stratify: bool = False, seed: int = 0, limit: int | None = None, dtype: str = "auto",
             rescale: float = 1.0, classes: list[str] | None = None, test_limit: int | None = None) -> Dataset:
    """.npy files: x (and x_test) memory-mapped and read batch by batch, so an array larger than memory trains;
    y (and y_test) loaded. dtype / rescale convert each batch as npz converts whole arrays. test_split, stratify,
    seed, limit, test_limit as npz."""
    _check_common(test_split, limit, dtype, test_limit)
    if (x_test is None) != (y_test is None):
        raise ConfigError("data: give both x_test and y_test (or neither)")
    parts = {}
    for key, value in (("x", x), ("y", y), ("x_test", x_test), ("y_test", y_test)):
        if value is not None:
            file = resolve_path(value, f"data.{key}")
            array = check_samples(map_npy(file), f"data.{key}: {file}")
            parts[key] = array if key.startswith("x") else np.asarray(array)
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        if xk in parts and len(parts[xk]) != len(parts[yk]):
            raise DlcliError(f"data.{xk} ({parts[xk].filename}) has {len(parts[xk])} samples but data.{yk} has "
                             f"{len(parts[yk])} targets")
    xt = parts.get("x_test")
    return _finish(parts["x"].filename, _mapped(parts["x"], dtype, rescale), _targets(parts["y"]),
                   None if xt is None else _mapped(xt, dtype, rescale),
                   None if xt is None else _targets(parts["y_test"]), test_split, stratify, seed, limit, classes,
                   test_limit)


def _read_csv(file, delimiter: str):
    """(header, cells as a 2-D str array) of a CSV, read by the one CSV reader (dlcli.data.table_file.read_csv: UTF-8,
    widths and delimiters checked, errors naming the line)."""
    from dlcli.data.table_file import read_csv

    table = read_csv(file, delimiter)
    return table.header, np.stack([table.cells[h] for h in table.header], axis=1)


def _numeric(file, cells: np.ndarray, names: list[str]) -> np.ndarray:
    try:
        return cells.astype(np.float64)
    except ValueError:
        for j, name in enumerate(names):  # find the first bad cell for the message
            for i, v in enumerate(cells[:, j]):
                try:
                    float(v)
                except ValueError:
                    raise DlcliError(f"{file}: row {i + 2}, column '{name}': {str(v)!r} is not a number (features "
                                     f"must be numeric; choose columns with data.columns)") from None
        raise


def _csv_part(file, label, columns, delimiter, classes):
    header, cells = _read_csv(file, delimiter)
    wanted = [label] + (columns if columns is not None else [h for h in header if h != label])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DlcliError(f"{file}: no column(s) {', '.join(map(repr, missing))}; it has: {', '.join(header)}")
    features = wanted[1:]
    x = _numeric(file, cells[:, [header.index(c) for c in features]], features).astype(np.float32)
    raw = np.char.strip(cells[:, header.index(label)])
    try:
        values = raw.astype(np.float64)
        if classes is None and np.all(values == np.round(values)):
            return x, values.astype(np.int64), None
        return x, values.astype(np.float32), None
    except ValueError:  # text labels: class names, indexed in sorted order
        names = classes or sorted(set(raw.tolist()))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(raw.tolist()) - set(index))
        if unknown:
            raise DlcliError(f"{file}: label(s) {unknown[:5]} not among the training classes {names}") from None
        return x, np.array([index[v] for v in raw.tolist()], dtype=np.int64), names


@register("csv", kind=CsvFeatures)
def load_csv(path: str, label: str = "label", columns: list[str] | None = None, test_path: str | None = None,
             test_split: float = 0.0, stratify: bool = False, seed: int = 0, limit: int | None = None,
             delimiter: str = ",", test_limit: int | None = None) -> Dataset:
    """A CSV with a header: numeric feature columns (default: all but `label`) -> x float32 (N, features);
    `label` -> int64 class indices (integers, or text class names in sorted order) or float32 regression targets.
    The test set comes from test_path or a seeded test_split; limit caps train to its first N rows, test_limit
    the test split."""
    _check_common(test_split, limit, test_limit=test_limit)
    if test_path is not None and test_split:
        raise ConfigError("data: give test_path or test_split, not both")
    file = resolve_path(path)
    x, y, classes = _csv_part(file, label, columns, delimiter, None)
    xt = yt = None
    if test_path is not None:
        xt, yt, _ = _csv_part(resolve_path(test_path, "data.test_path"), label, columns, delimiter, classes)
    return _finish(file, x, y, xt, yt, test_split, stratify, seed, limit, classes, test_limit)
