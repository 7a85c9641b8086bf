"""A trained run's predictions on new inputs (what `dlcli predict` prints or writes)."""
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlcli import run_files
from dlcli.errors import DlcliError

OUTPUT_SUFFIXES = (".csv", ".npy", ".npz")


@dataclass
class Output:
    """One model output for every sample."""

    name: str
    values: np.ndarray  # exactly as Keras' predict returns it: (N, 1) for one sigmoid unit
    probabilities: np.ndarray | None  # (N, k) for a classifier head (one sigmoid unit as [1 - p, p]), else None
    classes: list[str] = field(default_factory=list)  # k names when probabilities is set
    decoded: np.ndarray | None = None  # (N, time) label ids, -1 padded: the greedy CTC decode of a ctc-loss output


@dataclass
class Predictions:
    labels: list[str]  # one per sample: file name, or file:row (bytes that are not UTF-8 shown as \xNN)
    outputs: list[Output]  # every model output, in the model's order


def predict_run(run_dir, inputs: list[Path], weights: str = "best", key: str | None = None, invert: bool = False,
                pixel_scale: float | None = None, allow_config_change: bool = False) -> Predictions:
    """Read `inputs` (dlcli.data.inputs: arrays, CSV, text, images, folders) and run the run's model on them."""
    from dlcli.data.inputs import read_inputs
    from dlcli.experiment import load_run_model

    config, model = load_run_model(run_dir, weights, allow_config_change)
    xs, labels = read_inputs(list(inputs), run_dir, config.data, model, key, invert, pixel_scale)
    preds = model.predict(xs, batch_size=config.train.batch_size)
    return Predictions([printable(label) for label in labels], model_outputs(run_dir, config, model, preds))


def model_outputs(run_dir, config, model, preds) -> list[Output]:
    """What model.predict returned as one Output per model output, with probabilities and class names for
    classifier heads."""
    from dlcli.losses import CTC, ctc_greedy_decode

    outputs = []
    for name, tensor, values, loss in zip(model.output_names, model.outputs,
                                          preds if isinstance(preds, list) else [preds], model.losses):
        probs = probabilities(tensor, values)
        names = class_names(run_dir, config, probs.shape[1]) if probs is not None else []
        decoded = ctc_greedy_decode(values) if isinstance(loss, CTC) and values.ndim == 3 else None
        outputs.append(Output(name, values, probs, names, decoded))
    return outputs


def decoded_text(row: np.ndarray) -> str:
    """A greedy CTC decode as label ids separated by spaces."""
    return " ".join(str(i) for i in row[row >= 0])


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that do not decode (Python keeps them as surrogate escapes) become
    \\xNN (errors='backslashreplace'), so a CSV or a terminal can always take it."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def class_names(run_dir, config, count: int) -> list[str]:
    """Class names from the run's meta.json (what the dataset reported), else data.classes, else indices."""
    import json

    try:
        names = json.loads(run_files.RunDir(run_dir).meta.read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        names = None
    names = names or config.data.get("classes")
    return [str(n) for n in names] if names and len(names) == count else [str(i) for i in range(count)]


def probabilities(output, values: np.ndarray) -> np.ndarray | None:
    """Per-class probabilities (N, k) when the output layer ends in softmax, or sigmoid with one unit; else None."""
    activation = getattr(getattr(output.node.layer, "activation", None), "name", None)
    if values.ndim == 2 and activation == "softmax" and values.shape[1] > 1:
        return values
    if activation == "sigmoid" and values.shape[1:] == (1,):
        return np.concatenate([1 - values, values], axis=1)
    return None


def check_output_path(path: Path) -> None:
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DlcliError(f"--output must end in {', '.join(OUTPUT_SUFFIXES)}; got {path}", exit_code=2)


def write_predictions(path: Path, p: Predictions) -> list[Path]:
    """Every output of every prediction, atomically; returns the files written. .npy: the outputs as Keras'
    predict returns them, one file per output when there are several (stem_<output>.npy); .npz: one array per
    output name; .csv: one row per sample, each output's class and probabilities (or its values) as columns,
    prefixed with the output's name when there are several; a ctc-loss output adds its greedy decode first."""
    check_output_path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        run_files.atomic_savez(path, {o.name: o.values for o in p.outputs})
        return [path]
    if suffix == ".npy":
        files = [path] if len(p.outputs) == 1 else [path.with_name(f"{path.stem}_{o.name}{path.suffix}")
                                                     for o in p.outputs]
        for file, o in zip(files, p.outputs):
            buffer = io.BytesIO()
            np.save(buffer, o.values, allow_pickle=False)
            run_files.atomic_write_bytes(file, buffer.getvalue())
        return files
    import csv

    columns, cells = ["input"], [np.asarray(p.labels, dtype=object)[:, None]]
    for o in p.outputs:
        prefix = f"{o.name}_" if len(p.outputs) > 1 else ""
        if o.decoded is not None:
            columns.append(f"{prefix}decoded")
            cells.append(np.array([decoded_text(row) for row in o.decoded], dtype=object)[:, None])
        if o.probabilities is not None:
            columns += [f"{prefix}predicted", *[f"{prefix}p_{n}" for n in o.classes]]
            cells += [np.asarray(o.classes, dtype=object)[o.probabilities.argmax(1)][:, None],
                      _formatted(o.probabilities)]
        else:
            flat = o.values.reshape(len(o.values), -1)
            columns += [f"{prefix}output_{j}" for j in range(flat.shape[1])]
            cells.append(_formatted(flat))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(np.concatenate(cells, axis=1).tolist())
    run_files.atomic_write_text(path, out.getvalue())
    return [path]


def _formatted(values: np.ndarray) -> np.ndarray:
    return np.char.mod("%.6g", values).astype(object)
