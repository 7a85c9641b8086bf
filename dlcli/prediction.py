"""A trained run's predictions on new inputs (what `dlcli predict` prints or writes)."""
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlcli.errors import DlcliError


@dataclass
class Predictions:
    labels: list[str]  # one per sample: file name, or file:row
    outputs: np.ndarray  # the first model output
    probabilities: np.ndarray | None  # (N, k) for a classifier, else None
    classes: list[str] = field(default_factory=list)  # k names when probabilities is set


def predict_run(run_dir, inputs: list[Path], weights: str = "best", key: str | None = None, invert: bool = False,
                pixel_scale: float | None = None, allow_config_change: bool = False) -> Predictions:
    """Read `inputs` (dlcli.data.inputs: arrays, CSV, text, images, folders) and run the run's model on them."""
    from dlcli.data.inputs import read_inputs
    from dlcli.experiment import load_run_model

    config, model = load_run_model(run_dir, weights, allow_config_change)
    xs, labels = read_inputs(list(inputs), run_dir, config.data, model, key, invert, pixel_scale)
    preds = model.predict(xs, batch_size=config.train.batch_size)
    preds = preds[0] if isinstance(preds, list) else preds  # the first output for multi-output models
    probs = probabilities(model, preds)
    names = class_names(run_dir, config, probs.shape[1]) if probs is not None else []
    return Predictions(labels, preds, probs, names)


def class_names(run_dir, config, count: int) -> list[str]:
    """Class names from the run's meta.json (what the dataset reported), else data.classes, else indices."""
    import json

    try:
        names = json.loads((Path(run_dir) / "meta.json").read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        names = None
    names = names or config.data.get("classes")
    return [str(n) for n in names] if names and len(names) == count else [str(i) for i in range(count)]


def probabilities(model, preds: np.ndarray) -> np.ndarray | None:
    """Per-class probabilities (N, k) when the model ends in softmax, or sigmoid with one unit; else None."""
    activation = getattr(getattr(model.outputs[0].node.layer, "activation", None), "name", None)
    if preds.ndim == 2 and activation == "softmax" and preds.shape[1] > 1:
        return preds
    if activation == "sigmoid" and preds.shape[1:] == (1,):
        return np.concatenate([1 - preds, preds], axis=1)
    return None


def write_predictions(path: Path, p: Predictions):
    """Every prediction to a .csv (class and probabilities, or the outputs) or .npy, atomically."""
    from dlcli import runs

    suffix = path.suffix.lower()
    if suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, p.probabilities if p.probabilities is not None else p.outputs, allow_pickle=False)
        runs.atomic_write_bytes(path, buffer.getvalue())
    elif suffix == ".csv":
        import csv

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if p.probabilities is not None:
            writer.writerow(["input", "predicted", *[f"p_{n}" for n in p.classes]])
            for label, row in zip(p.labels, p.probabilities):
                writer.writerow([label, p.classes[int(row.argmax())], *[f"{v:.6g}" for v in row]])
        else:
            flat = p.outputs.reshape(len(p.outputs), -1)
            writer.writerow(["input", *[f"output_{j}" for j in range(flat.shape[1])]])
            for label, row in zip(p.labels, flat):
                writer.writerow([label, *[f"{v:.6g}" for v in row]])
        runs.atomic_write_text(path, out.getvalue())
    else:
        raise DlcliError(f"--output must end in .csv or .npy; got {path}", exit_code=2)
