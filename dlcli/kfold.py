"""K-fold validation (`train.kfold: K`): K runs on K folds of the training data, inside one run directory.

The book's recipe for small data (Boston housing): train K models, each validated on a different fold, average the
validation curves, and pick the epoch count from the mean before a final fit on all the data.

runs/<name>-<time>/
  config.yaml  summary.txt   as for any run
  folds/1 ... folds/K/       each an ordinary run directory (history.csv, weights/, checkpoint/, meta.json ...)
  history.csv                per epoch, the mean across the finished folds of every column (epochs they all reached)
  kfold.csv                  per epoch, mean and standard deviation across the finished folds of every column
  curves.png                 per quantity, the validation mean with a +-1 standard deviation band
  meta.json                  K, each fold's status, the best epoch of the mean, the test metrics' mean
Folds are seeded (seed, then the fold stream) and stratified when the targets are class labels. `--resume` skips
the finished folds and continues the one it stopped in from its checkpoint. The aggregate is computed from the
folds' history.csv files whether a fold finished in this process or an earlier one, so a resumed run's files are
identical to an uninterrupted one's.
"""
import copy
import math
import time
from pathlib import Path

import numpy as np

from dlcli import plots, run_files
from dlcli.errors import NothingToDo


def train_folds(cfg, model, data, folds, run_dir: Path, callbacks=(), resume: bool = False, verbose: int = 0):
    """Write the run's meta.json (unless resuming), train every fold (`folds`: Dataset.folds) not finished yet into
    run_dir/folds/<i>/ as an ordinary run (Run.train, `callbacks` joining each fold's), continuing a fold's
    checkpoint when `resume`; write the aggregate. Returns the whole run's Run: the status of the fold that stopped
    it (else "completed"), history = the mean rows, test = the mean."""
    from dlcli import checkpoint
    from dlcli.builder import build_model
    from dlcli.config import dump_yaml
    from dlcli.data.table import stored
    from dlcli.trainer import Run, start_meta

    k = cfg.train.kfold
    fold_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"kfold": None})})
    start = time.perf_counter()
    files = run_files.RunDir(run_dir)
    if not files.meta.exists():
        files.write_json(files.meta, {**start_meta(cfg, model, data), "kfold": k})
    statuses, last = [], None
    fresh_model = model  # the one already built serves the first fold trained now; later folds get new weights
    try:
        for i, val in enumerate(folds):
            fold = files.fold(i + 1)
            meta = run_files.read_json(fold.meta) if fold.meta.exists() else {}
            if meta.get("status") == "completed":
                statuses.append("completed")
                continue
            state = None
            if resume and fold.checkpoint.exists():
                state = checkpoint.load(fold.checkpoint)
            else:
                fold.weights.mkdir(parents=True, exist_ok=True)
                fold.write_text(fold.config, dump_yaml(fold_cfg.to_dict()))
            fold_data = data.fold(val)
            if verbose:
                print(f"fold {i + 1}/{k}: {len(fold_data.x_train):,} training, {len(val):,} validation samples"
                      + (" (resumed)" if state is not None else ""), flush=True)
            space = fold_data.extra.get("feature_space")  # a table adapted on this fold: its own input width
            with stored(space):
                fold_model, fresh_model = build_model(cfg) if space or fresh_model is None else fresh_model, None
            last = Run.in_dir(fold, fold_cfg, fold_model, fold_data, callbacks, verbose, kfold_dir=run_dir,
                              resumed=None if state is None else checkpoint.resume_banner(state)).train(state)
            statuses.append(last.status)
            if last.status != "completed":
                break
    except BaseException as e:  # a fold that failed (or a second Ctrl-C): the whole run says so, not "running"
        files.mark_failed(run_files.read_json(files.meta), e)
        raise
    if last is None:
        raise NothingToDo(f"all {k} folds of {run_dir} are finished: nothing to resume")
    seconds = time.perf_counter() - start
    means, test, best_epoch = write_aggregate(run_dir, cfg, statuses, k, seconds)
    whole = copy.copy(last)  # the last fold's run (model, world, position), as the whole run
    vars(whole).update(files=run_files.RunDir(run_dir), dir=run_dir, config=cfg, data=data, history=means,
                       test=test, seconds=seconds, best_epoch=best_epoch, resumed=None)
    return whole


def finished_folds(run_dir: Path, statuses: list) -> list[Path]:
    return [run_files.RunDir(run_dir).fold(i + 1).path for i, status in enumerate(statuses) if status == "completed"]


def write_aggregate(run_dir: Path, cfg, statuses: list, k: int, seconds: float):
    """history.csv (means), kfold.csv (means and standard deviations), curves.png (bands), meta.json: over the
    finished folds, each read back from its history.csv and meta.json (so a fold finished before a resume counts
    exactly as one finished in this process)."""
    done = finished_folds(run_dir, statuses)
    rows = fold_statistics([run_files.read_history(d) for d in done])
    tests = [run_files.read_json(run_files.RunDir(d).meta).get("test") for d in done]
    means = [{key: v for key, v in r.items() if not key.endswith("_std")} for r in rows]
    files = run_files.RunDir(run_dir)
    files.write_text(files.history, run_files.history_csv(means) if means else "epoch\n")
    files.write_text(files.kfold_csv, run_files.history_csv(rows) if rows else "epoch\n")
    monitor = "val_loss" if means and "val_loss" in means[0] else "loss"
    best = min(means, key=lambda r: r.get(monitor, math.inf)) if means else None
    known = [t for t in tests if t]
    test = {m: float(np.mean([t[m] for t in known])) for m in known[0]} if known and len(known) == k else None
    meta = run_files.read_json(files.meta) if files.meta.exists() else run_files.versions_meta(cfg.seed)
    meta.update({"kfold": k, "folds": statuses,
                 "status": "completed" if len(statuses) == k and all(s == "completed" for s in statuses)
                 else statuses[-1] if statuses else "running",
                 "end": run_files.utc_now(), "seconds": round(seconds + meta.get("seconds", 0), 3),
                 "epochs_run": len(means), "best_epoch": best and best["epoch"],
                 "best": {f"mean {monitor}": best and best.get(monitor)}, "test": test})
    files.write_json(files.meta, meta)
    plots.write_curves(files)  # after meta.json: the band's legend counts the finished folds
    return means, test, best and best["epoch"]


def fold_statistics(histories: list[list[dict]]) -> list[dict]:
    """Per epoch that every fold reached: each numeric column's mean and (population) standard deviation."""
    histories = [h for h in histories if h]
    if not histories:
        return []
    epochs = min(len(h) for h in histories)
    rows = []
    for e in range(epochs):
        row = {"epoch": e + 1}
        for key in histories[0][e]:
            if key == "epoch":
                continue
            values = [h[e].get(key) for h in histories]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                row[key] = float(np.mean(values))
                row[f"{key}_std"] = float(np.std(values))
        rows.append(row)
    return rows
