"""A training run from a config: build, load data, train into a run directory, evaluate.

This is what `dlcli train` and `dlcli evaluate` call; it knows the run-directory contract (dlcli.runs) but not the
CLI. Output for people goes through the `log` function and callbacks the caller passes in.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlcli import runs
from dlcli.callbacks import Callback
from dlcli.errors import DlcliError


@dataclass
class Splits:
    """Arrays per split, each a list aligned with the model's inputs / outputs."""

    x_train: list
    y_train: list
    x_val: list | None
    y_val: list | None
    x_test: list | None
    y_test: list | None
    classes: list | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def sizes(self) -> dict:
        return {name: (0 if xs is None else len(xs[0]))
                for name, xs in (("train", self.x_train), ("validation", self.x_val), ("test", self.x_test))}


def load_splits(config: dict, model) -> Splits:
    """Load the dataset, fit its arrays to the model's inputs, and carve the seeded validation split."""
    from dlcli.data import load_dataset, validation_split

    train_cfg = config.get("train", {})
    ds = load_dataset(config["data"])
    x_train, y_train = _fit_inputs(ds.x_train, model), _fit_targets(ds.y_train, model)
    x_test = None if ds.x_test is None else _fit_inputs(ds.x_test, model)
    y_test = None if ds.y_test is None else _fit_targets(ds.y_test, model)
    x_val = y_val = None
    if getattr(ds, "x_val", None) is not None:
        x_val, y_val = _fit_inputs(ds.x_val, model), _fit_targets(ds.y_val, model)
    elif train_cfg.get("validation_split"):
        rng = np.random.default_rng([int(config.get("seed", 0)), 1])
        idx = np.arange(len(x_train[0]))
        strat = y_train[0] if train_cfg.get("stratify") else np.zeros(len(idx))
        tr, _, va, _ = validation_split(idx, strat, float(train_cfg["validation_split"]), rng,
                                        bool(train_cfg.get("stratify")))
        x_val, y_val = [a[va] for a in x_train], [a[va] for a in y_train]
        x_train, y_train = [a[tr] for a in x_train], [a[tr] for a in y_train]
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, ds.classes, ds.source, ds.extra or {})


def _fit_inputs(x, model) -> list:
    """Arrays for each model input; (N, 28, 28) data feeds an input of shape (28, 28, 1) as a free reshape."""
    xs = [x[n] for n in model.input_names] if isinstance(x, dict) else (list(x) if isinstance(x, list) else [x])
    out = []
    for a, t in zip(xs, model.inputs):
        if a.shape[1:] != t.shape and int(np.prod(a.shape[1:])) == int(np.prod(t.shape)) \
                and [d for d in a.shape[1:] if d != 1] == [d for d in t.shape if d != 1]:
            a = a.reshape((len(a), *t.shape))
        out.append(a)
    return model._inputs_list(out)


def _fit_targets(y, model) -> list:
    return model._targets_list(y)


class RunRecorder(Callback):
    """Writes the run directory as training goes: history.csv, train.log, weights/last.npz and best.npz."""

    def __init__(self, run_dir: Path, monitor: str = "val_loss", mode: str = "min", history_rows=None):
        self.run_dir = Path(run_dir)
        self.monitor, self.mode = monitor, mode
        self.rows = list(history_rows or [])
        self.best, self.best_epoch = None, None

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{k: v for k, v in logs.items()}}
        self.rows.append(row)
        runs.atomic_write_text(self.run_dir / "history.csv", runs.history_csv(self.rows))
        with open(self.run_dir / "train.log", "a") as f:
            from dlcli.callbacks import format_logs

            f.write(f"epoch {epoch + 1}  {format_logs(logs)}  ({logs.get('seconds', 0):.1f}s)\n")
        weights = self.model.weights_dict()
        runs.atomic_savez(self.run_dir / "weights" / "last.npz", weights)
        key = self.monitor if self.monitor in logs else "loss"
        value = logs.get(key)
        if value is not None and np.isfinite(value) and (
                self.best is None or (value < self.best if self.mode == "min" else value > self.best)):
            self.best, self.best_epoch = value, epoch + 1
            self.best_key = key
            runs.atomic_savez(self.run_dir / "weights" / "best.npz", weights)


@dataclass
class RunResult:
    run_dir: Path
    history: dict
    test: dict | None
    seconds: float
    status: str
    best_epoch: int | None


def train_run(config: dict, model, splits: Splits, run_dir: Path, callbacks=(), verbose=1, log=print,
              trainer_hook=None) -> RunResult:
    """Train `model` on `splits` into `run_dir` (already created; config.yaml written by the caller)."""
    from dlcli.trainer import Trainer

    train_cfg = config.get("train", {})
    meta = {**runs.versions_meta(config.get("seed", 0)), "name": config.get("name"), "status": "running",
            "start": runs.utc_now(), "sizes": splits.sizes(), "source": splits.source,
            "params": model.count_params(), "classes": splits.classes}
    runs.atomic_write_json(run_dir / "meta.json", meta)
    if splits.extra.get("vocabulary"):  # lets `dlcli predict` encode raw text the way the training data was
        runs.atomic_write_json(run_dir / "vocabulary.json", splits.extra["vocabulary"])
    recorder = RunRecorder(run_dir, monitor="val_loss" if splits.x_val is not None else "loss")
    rng = np.random.default_rng([int(config.get("seed", 0)), 2])
    trainer = Trainer(model, callbacks=[recorder, *callbacks], verbose=verbose, rng=rng)
    if trainer_hook is not None:
        trainer_hook(trainer)
    validation = (splits.x_val, splits.y_val) if splits.x_val is not None else None
    start = time.perf_counter()
    status = "completed"
    history = trainer.fit(splits.x_train, splits.y_train, epochs=int(train_cfg.get("epochs", 1)),
                          batch_size=int(train_cfg.get("batch_size", 32)), validation_data=validation,
                          shuffle=bool(train_cfg.get("shuffle", True)),
                          class_weight=train_cfg.get("class_weight"))
    if trainer.stop_requested:
        status = "interrupted"
    seconds = time.perf_counter() - start
    test = None
    if splits.x_test is not None and status == "completed":
        test = model.evaluate_arrays(splits.x_test, splits.y_test, int(train_cfg.get("batch_size", 32)))
    meta.update({"status": status, "end": runs.utc_now(), "seconds": round(seconds, 3),
                 "epochs_run": len(history.epoch), "best_epoch": recorder.best_epoch,
                 "best": {getattr(recorder, "best_key", recorder.monitor): recorder.best}, "test": test})
    runs.atomic_write_json(run_dir / "meta.json", meta)
    from dlcli.plots import write_curves

    write_curves(run_dir, recorder.rows)
    return RunResult(run_dir, history.history, test, seconds, status, recorder.best_epoch)


def evaluate_run(run_dir, weights: str = "best", split: str = "test", batch_size: int | None = None) -> dict:
    """Loss and metrics of a finished run on a split; per-class accuracy and a confusion matrix for classifiers."""
    from dlcli.builder import build_model
    from dlcli.config import load_config

    run_dir = runs.require_run_dir(run_dir)
    config = load_config(run_dir / "config.yaml").to_dict()
    model = build_model(config)
    weights_path = run_dir / "weights" / f"{weights}.npz"
    if not weights_path.exists():
        raise DlcliError(f"{weights_path} does not exist; choose --weights best or last "
                         f"(a run writes both after its first epoch)")
    model.load_weights_dict(runs.load_npz(weights_path), source=str(weights_path))
    splits = load_splits(config, model)
    xs, ys = (splits.x_test, splits.y_test) if split == "test" else (splits.x_val, splits.y_val)
    if xs is None:
        raise DlcliError(f"run {run_dir.name} has no {split} split (set train.validation_split for a validation "
                         f"split)" if split == "validation" else f"the dataset has no test split")
    bs = batch_size or int(config.get("train", {}).get("batch_size", 32))
    result = {"run": run_dir.name, "weights": weights, "split": split, "samples": len(xs[0]),
              "metrics": model.evaluate_arrays(xs, ys, bs)}
    preds = model.predict(xs if len(xs) > 1 else xs[0], batch_size=bs)
    preds = preds if isinstance(preds, list) else [preds]
    report = classification_report(ys[0], preds[0], splits.classes)
    if report:
        result.update(report)
    baseline = splits.extra.get("baseline") if splits.extra else None
    if baseline:
        result["baseline"] = baseline
        result["comparison"] = baseline_comparison(result["metrics"], splits.extra, split)
    runs.atomic_write_json(run_dir / "evaluation.json", result)
    return result


def baseline_comparison(metrics: dict, extra: dict, split: str) -> dict | None:
    """The model's MAE beside the common-sense baseline's, both in the series' original units (as the book
    compares its forecasts with "tomorrow = today")."""
    mae = metrics.get("mae", metrics.get("mean_absolute_error"))
    key = f"{'test' if split == 'test' else 'validation'}_mae"
    if mae is None or key not in extra.get("baseline", {}):
        return None
    model_mae = float(mae) * float(extra.get("target_std", 1.0))
    base = float(extra["baseline"][key])
    return {"model_mae": model_mae, "baseline_mae": base, "improvement": 1 - model_mae / base if base else None,
            "beats_baseline": model_mae < base, "units": extra.get("target", "target")}


def classification_report(y_true, y_pred, classes=None) -> dict | None:
    """Per-class accuracy and a confusion matrix when the output is a class distribution."""
    if y_pred.ndim != 2 or y_pred.shape[1] < 2:
        return None
    k = y_pred.shape[1]
    truth = y_true.argmax(1) if y_true.ndim == 2 and y_true.shape[1] == k else y_true.reshape(-1).astype(int)
    guess = y_pred.argmax(1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (truth, guess), 1)
    support = confusion.sum(1)
    names = [str(c) for c in classes] if classes and len(classes) == k else [str(i) for i in range(k)]
    per_class = {n: (float(confusion[i, i] / support[i]) if support[i] else None) for i, n in enumerate(names)}
    return {"classes": names, "per_class_accuracy": per_class, "confusion_matrix": confusion.tolist()}
