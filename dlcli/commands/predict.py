"""`dlcli predict RUN_DIR INPUT...`: a trained run's predictions on new data (arrays, images, CSV, raw text).

NumPy is imported inside functions so `dlcli --help` stays fast.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dlcli.commands.base import AllowConfigChangeOption, app, console, handles_errors
from dlcli.errors import DlcliError

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PRINT_LIMIT = 50


def class_names(run_dir, config: dict, count: int) -> list[str]:
    """Class names from the run's meta.json (what the dataset reported), else data.classes, else indices."""
    import json

    try:
        names = json.loads((Path(run_dir) / "meta.json").read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        names = None
    names = names or config.get("data", {}).get("classes")
    return [str(n) for n in names] if names and len(names) == count else [str(i) for i in range(count)]


# --- reading inputs -------------------------------------------------------------------------------------------
def read_inputs(paths: list[Path], run_dir, config: dict, model, key: str | None = None, invert: bool = False,
                pixel_scale: float | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Model-ready inputs (a list of arrays, or a Source streaming a folder's images) and one label per sample
    (file name, or file:row). A run trained on an image_folder / text_folder reads folders (recursively) as its
    training data was read."""
    import numpy as np

    data = config.get("data", {})
    if data.get("type") == "image_folder" and all(p.is_dir() or _kind(p) == "image" for p in paths):
        from dlcli.data.image_folder import prediction_source
        from dlcli.experiment import fit_inputs

        source, labels = prediction_source(paths, data)
        return fit_inputs(source, model), labels
    if data.get("type") == "text_folder" and any(p.is_dir() for p in paths):
        from dlcli import runs
        from dlcli.data.text import prediction_texts

        x, labels = prediction_texts(paths, runs.read_json(Path(run_dir) / "vocabulary.json"), data.get("max_length"))
        return [x], labels
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
                         f"{', '.join(sorted(IMAGE_SUFFIXES))} files)")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1 or (len(files) > 1 and kinds != {"image"}):
        raise DlcliError("give one array/CSV/text file, or any number of image files (not a mix)", exit_code=2)
    kind = kinds.pop()
    if kind == "image":
        x = np.stack([_read_image(f, model, invert, _pixel_scale(config, pixel_scale)) for f in files])
        return _fit(x, model), [f.name for f in files]
    file = files[0]
    if kind == "text":
        x = _read_text(file, run_dir)
    elif kind == "csv":
        x = _scaled(_read_csv(file, config), config)
    else:
        x = _read_array(file, model, config, key)
        x = {k: _scaled(v, config) for k, v in x.items()} if isinstance(x, dict) else _scaled(x, config)
    xs = _fit(x, model)
    return xs, [f"{file.name}:{i}" for i in range(len(xs[0]))]


def _kind(f: Path) -> str:
    suffix = f.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    kinds = {".npy": "array", ".npz": "array", ".csv": "csv", ".txt": "text"}
    if suffix not in kinds:
        raise DlcliError(f"{f}: unsupported input type '{suffix}'; use .npy, .npz, .csv, .txt (one text per "
                         f"line) or an image ({', '.join(sorted(IMAGE_SUFFIXES))})", exit_code=2)
    return kinds[suffix]


def _read_array(file: Path, model, config: dict, key: str | None):
    import numpy as np

    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded as data:
            names = data.files
            if key is not None:
                if key not in names:
                    raise DlcliError(f"{file}: no array '{key}'; it has: {', '.join(names)}")
                return data[key]
            if len(model.input_names) > 1 and all(n in names for n in model.input_names):
                return {n: data[n] for n in model.input_names}
            configured = config.get("data", {}).get("x")
            for candidate in ([configured] if isinstance(configured, str) else []) + ["x", "x_test"]:
                if candidate in names:
                    return data[candidate]
            if len(names) == 1:
                return data[names[0]]
            raise DlcliError(f"{file} holds several arrays ({', '.join(names)}); choose one with --key")
    except DlcliError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise DlcliError(f"{file}: cannot read as a NumPy array file without pickled objects ({e})") from None


def _scaled(x, config: dict):
    """Arrays and CSV rows are taken as the training file stored them, so the dataset's rescale applies."""
    import numpy as np

    data = config.get("data", {})
    rescale = data.get("rescale", 1.0) if data.get("type") in ("npz", "csv") else 1.0
    if x.dtype.kind in "iu" and rescale == 1.0:
        return x
    return x.astype(np.float32) * np.float32(rescale)


def _read_csv(file: Path, config: dict) -> np.ndarray:
    import csv

    import numpy as np

    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DlcliError(f"{file}: cannot read as CSV ({e})") from None
    if not rows:
        raise DlcliError(f"{file} is empty")
    header = None
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        header, rows = [h.strip() for h in rows[0]], rows[1:]
    data = config.get("data", {})
    columns = list(range(len(rows[0]) if rows else 0))
    if header is not None:
        wanted = data.get("columns") or [h for h in header if h != data.get("label", "label")]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DlcliError(f"{file}: no column(s) {', '.join(map(repr, missing))}; it has: {', '.join(header)}")
        columns = [header.index(c) for c in wanted]
    try:
        return np.array([[float(r[j]) for j in columns] for r in rows], dtype=np.float32)
    except (ValueError, IndexError) as e:
        raise DlcliError(f"{file}: every feature cell must be a number and every row complete ({e})") from None


def _read_text(file: Path, run_dir) -> np.ndarray:
    from dlcli import runs
    from dlcli.data.text import encode_texts

    vocabulary_file = Path(run_dir) / "vocabulary.json"
    if not vocabulary_file.is_file():
        raise DlcliError(f"{run_dir} has no vocabulary.json, so raw text cannot be encoded; text input works for "
                         f"runs trained on a text dataset (e.g. data.type imdb)")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DlcliError(f"{file}: cannot read as UTF-8 text ({e})") from None
    if not lines:
        raise DlcliError(f"{file} has no text lines")
    return encode_texts(lines, runs.read_json(vocabulary_file))


def _pixel_scale(config: dict, given: float | None) -> float:
    if given is not None:
        return given
    data = config.get("data", {})
    if "rescale" in data:
        return float(data["rescale"])
    return 1.0 if data.get("normalize") is False else 1 / 255  # the image datasets' default: pixels / 255


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


def _read_image(file: Path, model, invert: bool, scale: float) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DlcliError("reading images needs Pillow: pip install pillow") from None
    import numpy as np

    height, width, channels = image_geometry(model.inputs[0].shape)
    try:
        with Image.open(file) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise DlcliError(f"{file}: cannot read as an image ({e})") from None
    if invert:  # MNIST-style data is light ink on black; photos of writing are dark on light
        pixels = 255 - pixels
    return (pixels * np.float32(scale)).reshape(model.inputs[0].shape)


def _fit(x, model) -> list[np.ndarray]:
    """Add the batch axis to a single sample; reshape flat rows (CSV, flattened arrays) of the right size."""
    import numpy as np

    from dlcli.experiment import fit_inputs

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


# --- output ---------------------------------------------------------------------------------------------------
def probabilities(model, preds: np.ndarray) -> np.ndarray | None:
    """Per-class probabilities (N, k) when the model ends in softmax, or sigmoid with one unit; else None."""
    activation = getattr(getattr(model.outputs[0].node.layer, "activation", None), "name", None)
    if preds.ndim == 2 and activation == "softmax" and preds.shape[1] > 1:
        return preds
    if activation == "sigmoid" and preds.shape[1:] == (1,):
        import numpy as np

        return np.concatenate([1 - preds, preds], axis=1)
    return None


def _write(path: Path, labels, names, preds, probs):
    import numpy as np

    from dlcli import runs

    suffix = path.suffix.lower()
    if suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, probs if probs is not None else preds, allow_pickle=False)
        runs.atomic_write_bytes(path, buffer.getvalue())
    elif suffix == ".csv":
        import csv

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if probs is not None:
            writer.writerow(["input", "predicted", *[f"p_{n}" for n in names]])
            for label, row in zip(labels, probs):
                writer.writerow([label, names[int(row.argmax())], *[f"{v:.6g}" for v in row]])
        else:
            flat = preds.reshape(len(preds), -1)
            writer.writerow(["input", *[f"output_{j}" for j in range(flat.shape[1])]])
            for label, row in zip(labels, flat):
                writer.writerow([label, *[f"{v:.6g}" for v in row]])
        runs.atomic_write_text(path, out.getvalue())
    else:
        raise DlcliError(f"--output must end in .csv or .npy; got {path}", exit_code=2)


@app.command()
@handles_errors
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/mnist-mlp-20261124-101500.")],
    inputs: Annotated[list[Path], typer.Argument(help=".npy/.npz arrays, a .csv of numeric columns, a .txt "
                                                      "(one text per line, text runs), or images / a folder of "
                                                      "images (resized and grayscaled to the model's input).")],
    weights: Annotated[str, typer.Option(help="best or last.")] = "best",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes to print per sample.")] = 3,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write every prediction to a .csv "
                                                   "(class and probabilities) or .npy file.")] = None,
    key: Annotated[Optional[str], typer.Option(help="Array to read from an .npz (default: x).")] = None,
    invert: Annotated[bool, typer.Option("--invert", help="Invert image brightness (dark ink on white paper "
                                                          "for a model trained on MNIST-style light-on-dark).")]
    = False,
    pixel_scale: Annotated[Optional[float], typer.Option(help="Multiply image pixels (0-255) by this (default: "
                                                              "the dataset's, 1/255 for image datasets).")] = None,
    allow_config_change: AllowConfigChangeOption = False,
):
    """Predict with a trained run: top-k classes with probabilities, or every output to a file.

    Example: dlcli predict runs/mnist-mlp-20261124-101500 digit.png --invert --top-k 3
    """
    import numpy as np
    from rich.table import Table

    if output is not None and output.suffix.lower() not in (".csv", ".npy"):
        raise DlcliError(f"--output must end in .csv or .npy; got {output}", exit_code=2)
    from dlcli.experiment import load_run_model

    config, model = load_run_model(run_dir, weights, allow_config_change)
    xs, labels = read_inputs(list(inputs), run_dir, config, model, key, invert, pixel_scale)
    preds = model.predict(xs, batch_size=int(config.get("train", {}).get("batch_size", 32)))
    preds = preds[0] if isinstance(preds, list) else preds  # the first output for multi-output models
    probs = probabilities(model, preds)
    names = class_names(run_dir, config, probs.shape[1]) if probs is not None else []
    out = console()
    if output is not None:
        _write(output, labels, names, preds, probs)
        out.print(f"wrote {len(labels):,} predictions to {output}")
        return
    shown = min(len(labels), PRINT_LIMIT)
    table = Table(title=f"{Path(run_dir).name} ({weights} weights)")
    table.add_column("input", no_wrap=True)
    if probs is not None:
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs[:shown], axis=1, kind="stable")[:, :k]
        for j in range(k):
            table.add_column(f"#{j + 1}", justify="right")
        for label, row, idx in zip(labels, probs, order):
            table.add_row(label, *[f"{names[i]} ({row[i]:.3f})" for i in idx])
    else:
        flat = preds.reshape(len(preds), -1)
        table.add_column("output", justify="right")
        for label, row in zip(labels[:shown], flat):
            table.add_row(label, ", ".join(f"{v:.4g}" for v in row[:8]) + (" ..." if len(row) > 8 else ""))
    out.print(table)
    if shown < len(labels):
        out.print(f"(first {shown} of {len(labels):,}; --output FILE.csv writes them all)")
