"""Data fitted to a model's inputs: a dataset's splits, and new inputs for a trained run (`dlcli predict`: .npy/.npz
arrays, CSV rows, text lines, images or folders) preprocessed as the run's training data was (dlcli.data.preprocess)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from dlcli import run_files
from dlcli.data.dataset import dataset_type
from dlcli.data.image_folder import IMAGE_SUFFIXES, decode_image
from dlcli.data.preprocess import check_samples, to_features
from dlcli.data.source import fit_inputs
from dlcli.errors import DlcliError, ShapeError
from dlcli.registry import parameters


def check_data_fits(data: dict, model) -> None:
    """ShapeError naming both shapes when the dataset of a config's `data:` section cannot feed `model` (e.g.
    `dlcli import-keras --set data.type=mnist` on a model of 8 inputs); loads one sample of each split."""
    from dlcli.data import DATASETS, load_dataset

    if dataset_type(data).empty:
        return
    params, _ = parameters(DATASETS.get(data["type"]))
    one = {k: 1 for k in ("limit", "test_limit") if k in params}
    ds = load_dataset({**data, **one})
    try:
        for x in (ds.x_train, ds.x_test):
            if x is not None:
                fit_inputs(x, model)
    except ShapeError as e:
        raise ShapeError(f"data.type {data['type']} does not fit model '{model.name}': {e.message}") from None


def read_inputs(paths: list[Path], run_dir, data: dict, model, key: str | None = None, invert: bool = False,
                pixel_scale: float | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Model-ready inputs (a list of arrays, or a Source streaming a folder's images) and one label per sample
    (file name, or file:row). A dataset type that reads files its own way (an image_folder's or text_folder's
    folders, a table's rows) reads them as its training data was read. Integer arrays get the dataset's
    preprocessing; float arrays are taken as already preprocessed. `data` is the run's data spec (`Config.data`)."""
    dataset = dataset_type(data)
    own = dataset.read_files(paths, run_dir, model)
    if own is not None:
        return own
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif not p.exists():
            raise DlcliError(f"input {p} does not exist")
        else:
            files.append(p)
    if not files:
        raise DlcliError(f"no input files in {', '.join(map(str, paths))} (image folders are read for "
                         f"{', '.join(IMAGE_SUFFIXES)} files)")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1 or (len(files) > 1 and kinds != {"image"}):
        raise DlcliError("give one array/CSV/text file, or any number of image files (not a mix)", exit_code=2)
    kind = kinds.pop()
    if kind == "image":
        pixels = np.stack([read_image(f, model, data) for f in files])
        return image_inputs(pixels, [f.name for f in files], data, model, invert, pixel_scale), [f.name for f in files]
    file = files[0]
    if kind == "text":
        x = read_text(file, run_dir)
    elif kind == "csv":
        x = dataset.preprocess(read_csv(file, data))
    else:
        x = dataset.preprocess(read_array(file, model, data, key))
    xs = _fit(x, model)
    return xs, [f"{file.name}:{i}" for i in range(len(xs[0]))]


def image_inputs(pixels: np.ndarray, names: list[str] | None, data: dict, model, invert: bool = False,
                 pixel_scale: float | None = None) -> list[np.ndarray]:
    """Decoded uint8 images (N, *input shape) made model-ready as the run's training images were: inverted on
    request, scaled by the dataset's pixel scale (or `pixel_scale`). With file `names`, a light background on a
    model of dark ones gets the --invert hint (a warning)."""
    dataset = dataset_type(data)
    if invert:  # MNIST-style data is light ink on black; photos of writing are dark on light
        pixels = 255 - pixels
    elif dataset.dark_background and names is not None:
        _hint_invert(names, pixels)
    scale = dataset.pixel_scale() if pixel_scale is None else pixel_scale
    return _fit(to_features(pixels, "float32", scale), model)


def instance_inputs(instances: list, run_dir, data: dict, model, invert: bool = False,
                    pixel_scale: float | None = None, vocabulary: dict | None = None) -> list[np.ndarray]:
    """`dlcli serve`'s JSON instances made model-ready by the steps `dlcli predict` takes on files: table rows
    by column name (a table run), texts (a run with a vocabulary), images as base64 PNG/JPEG strings (or
    {"b64": ...}; bytes for uploaded files), or numbers (nested lists; for several model inputs, objects by input name). As for files,
    integer arrays are raw values and get the dataset's preprocessing; floats are taken as preprocessed. A text
    run's `vocabulary` (its word -> index) is read once by the caller; images get no --invert hint (the request
    says `invert`, and a server has no terminal to hint on)."""
    import base64
    import binascii
    import io

    if not isinstance(instances, list) or not instances:
        raise DlcliError("'instances' must be a non-empty list")
    dataset = dataset_type(data)
    own = dataset.read_instances(instances, run_dir, model)
    if own is not None:
        return own
    if vocabulary is not None:
        from dlcli.data.text import encode_texts

        bad = next((i for i, t in enumerate(instances) if not isinstance(t, str)), None)
        if bad is not None:
            raise DlcliError(f"instance {bad}: expected a text (a JSON string) for this text model; found "
                             f"{type(instances[bad]).__name__}")
        return _fit(encode_texts(dataset.cut_texts(instances), vocabulary), model)
    images = [t.get("b64") if isinstance(t, dict) and set(t) == {"b64"} else t for t in instances]
    if all(isinstance(t, (str, bytes)) for t in images):  # bytes: an uploaded file's
        decoded = []
        for i, text in enumerate(images):
            try:
                raw = text if isinstance(text, bytes) else base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise DlcliError(f"instance {i}: not base64 (an image is sent as base64 PNG/JPEG bytes)") from None
            decoded.append(read_image(io.BytesIO(raw), model, data, name=f"instance {i}"))
        return image_inputs(np.stack(decoded), None, data, model, invert, pixel_scale)
    if all(isinstance(t, dict) for t in instances) and len(model.inputs) > 1:
        x = {n: _numbers([t.get(n) for t in instances], f"input '{n}'") for n in model.input_names}
    else:
        x = _numbers(instances, "instances")
    return _fit(dataset.preprocess(x), model)  # a wrong shape: the model's ShapeError naming both


def _numbers(values: list, where: str) -> np.ndarray:
    """Nested JSON lists as one array of real, finite numbers with a sample axis."""
    try:
        a = np.asarray(values)
    except ValueError as e:  # ragged nesting
        raise DlcliError(f"{where}: not a rectangular array of numbers ({e})") from None
    a = check_samples(a, where)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DlcliError(f"{where}: NaN or infinity at instance {int(np.argwhere(~np.isfinite(a))[0][0])}")
    return a


def _kind(f: Path) -> str:
    suffix = f.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    kinds = {".npy": "array", ".npz": "array", ".csv": "csv", ".txt": "text"}
    if suffix not in kinds:
        raise DlcliError(f"{f}: unsupported input type '{suffix}'; use .npy, .npz, .csv, .txt (one text per "
                         f"line) or an image ({', '.join(IMAGE_SUFFIXES)})", exit_code=2)
    return kinds[suffix]


def read_array(file: Path, model, data: dict, key: str | None):
    """The array (or named arrays) to predict on from an .npy/.npz, never unpickling; real numbers with a sample
    axis (check_samples), or one line naming the file."""
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return check_samples(loaded, str(file))
        with loaded as arrays:
            return check_samples(_chosen(arrays, file, model, data, key), str(file))
    except DlcliError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise DlcliError(f"{file}: cannot read as a NumPy array file without pickled objects ({e})") from None


def _chosen(arrays, file: Path, model, data: dict, key: str | None):
    """The array of an .npz to predict on: --key, the model's input names, the run's data.x, x, x_test, or the
    only one."""
    names = arrays.files
    if key is not None:
        if key not in names:
            raise DlcliError(f"{file}: no array '{key}'; it has: {', '.join(names)}")
        return arrays[key]
    if len(model.input_names) > 1 and all(n in names for n in model.input_names):
        return {n: arrays[n] for n in model.input_names}
    configured = data.get("x")
    for candidate in ([configured] if isinstance(configured, str) else []) + ["x", "x_test"]:
        if candidate in names:
            return arrays[candidate]
    if len(names) == 1:
        return arrays[names[0]]
    raise DlcliError(f"{file} holds several arrays ({', '.join(names)}); choose one with --key")


def read_csv(file: Path, data: dict) -> np.ndarray:
    """Feature columns (by the run's data.columns, or every column but the label) of a CSV, as float32; a first row
    of numbers is data, not a header. Read by the one CSV reader (dlcli.data.table_file.read_csv)."""
    from dlcli.data.table_file import read_csv as read_table_csv

    table = read_table_csv(file, data.get("delimiter", ","), header=None)
    columns = table.header
    if table.lines[0] != 1:  # the first row was a header (else the data starts on line 1): columns by name
        columns = data.get("columns") or [h for h in table.header if h != data.get("label", "label")]
        missing = [c for c in columns if c not in table.header]
        if missing:
            raise DlcliError(f"{file}: no column(s) {', '.join(map(repr, missing))}; it has: "
                             f"{', '.join(table.header)}")
    try:
        values = np.stack([table.cells[c].astype(np.float64) for c in columns], axis=1)
    except ValueError as e:
        raise DlcliError(f"{file}: every feature cell must be a number ({e})") from None
    # CSV has no dtype: whole numbers are raw stored values (a Kaggle MNIST CSV holds 0-255 pixels) and get the
    # dataset's conversion; anything else is taken as already preprocessed
    return values.astype(np.int64) if np.array_equal(values, np.round(values)) else values.astype(np.float32)


def read_text(file: Path, run_dir) -> np.ndarray:
    """One text per line, encoded with the run's vocabulary.json as its training texts were."""
    from dlcli.data.text import encode_texts

    vocabulary_file = run_files.RunDir(run_dir).vocabulary
    if not vocabulary_file.is_file():
        raise DlcliError(f"{run_dir} has no vocabulary.json, so raw text cannot be encoded; text input works for "
                         f"runs trained on a text dataset (e.g. data.type imdb)")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DlcliError(f"{file}: cannot read as UTF-8 text ({e})") from None
    if not lines:
        raise DlcliError(f"{file} has no text lines")
    return encode_texts(lines, run_files.read_json(vocabulary_file))


def image_geometry(shape) -> tuple[int, int, int]:
    """(height, width, channels) an image must become to feed an input of `shape` (no batch axis)."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[2] in (1, 3):
        return shape
    if len(shape) == 2:
        return (*shape, 1)
    if len(shape) == 1:
        for channels in (1, 3):
            side = int(round((shape[0] / channels) ** 0.5))
            if side * side * channels == shape[0]:
                return side, side, channels
    raise DlcliError(f"the model's input shape {list(shape)} is not an image (height, width[, 1 or 3 channels]); "
                     f"give arrays (.npy/.npz) instead")


def read_image(file, model, data: dict, name: str | None = None) -> np.ndarray:
    """uint8 pixels of an image file (or file object: `name` says which in messages), grayscaled or RGB and
    resized to the model's input as the run's training images were (an image_folder run's interpolation and
    crop_to_aspect_ratio; bilinear otherwise)."""
    height, width, channels = image_geometry(model.inputs[0].shape)
    pixels = decode_image(file, (height, width), "grayscale" if channels == 1 else "rgb",
                          data.get("interpolation", "bilinear"), data.get("crop_to_aspect_ratio", False), name=name)
    return pixels.reshape(model.inputs[0].shape)


def _hint_invert(names: list[str], pixels: np.ndarray):
    """A light background (the median border pixel above mid-grey) on a model trained on light-on-dark images is
    almost surely dark writing on paper: the model would answer confidently wrong."""
    images = pixels.reshape(len(pixels), *image_geometry(pixels.shape[1:])[:2], -1)
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    light = [n for n, b in zip(names, border) if np.median(b) > 127]
    if light:
        warnings.warn(f"{', '.join(light[:3])}{' ...' if len(light) > 3 else ''}: a light background, but the "
                      f"model was trained on light ink on a dark background; pass --invert for dark writing on "
                      f"white paper", stacklevel=3)


def _fit(x, model) -> list[np.ndarray]:
    """Add the batch axis to a single sample; reshape flat rows (CSV, flattened arrays) of the right size."""
    def fit_one(a, t):
        if a.shape == t.shape:
            return a[None]
        size = int(np.prod(t.shape))
        if a.ndim >= 1 and a.shape[1:] != t.shape and a.ndim > 1 and int(np.prod(a.shape[1:])) == size:
            return a.reshape((len(a), *t.shape))
        return a

    if isinstance(x, dict):
        x = {k: fit_one(v, t) for (k, v), t in zip(x.items(), model.inputs)}
    else:
        x = fit_one(x, model.inputs[0])
    return fit_inputs(x, model)
