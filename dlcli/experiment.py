"""A training run from a config: build, load data, train into a run directory, evaluate.

This is what `dlcli train` and `dlcli evaluate` call; it knows the run-directory contract (dlcli.run_files) but not the
CLI. Output for people goes through the `log` function and callbacks the caller passes in.
"""
import contextlib
from pathlib import Path

import numpy as np

from dlcli import checkpoint, kernels, mixing, run_files
from dlcli.config import Config, Override, as_config
from dlcli.data import paths
from dlcli.data.dataset import load_fitted
from dlcli.errors import DlcliError, NothingToDo, plural
from dlcli.trainer import Run


@contextlib.contextmanager
def run_data(run_dir):
    """Data as the run in `run_dir` saw it: the directories it found its data in searched first, and a table's
    stored preprocessing (feature_space.json) used instead of adapting again. None: as for a new run."""
    from dlcli.data import table

    with paths.searching_first(run_dir), table.stored(run_dir):
        yield


def train(config=None, overrides=(), *, runs_dir="runs", resume=False, allow_config_change: bool = False,
          init_from=None, seed: int | None = None, name: str | None = None, callbacks=(), verbose: int = 0,
          distributed: bool = False, threads: int | None = None) -> Run:
    """One complete training run, as `dlcli train` does it: build the model, load the data, create the run directory
    (summary.txt, config.yaml, meta.json, history.csv, weights/, checkpoint/), train, evaluate on the test split.

    `config` is a YAML file or a Config, `overrides` `--set` texts (`"train.epochs=1"`) or `dlcli.config.Override`s.
    `resume=True` continues the run directory given as `config`; `resume=RUN_DIR` does so with `config` (or the run's
    own config.yaml) as the new config, refused where it differs unless `allow_config_change` and only epochs or the
    learning rate changed. `init_from=RUN_DIR` starts from another run's weights. `callbacks` join the config's; each
    gets `on_run_begin(run)` before the first epoch and may end the run with `run.stop(status)`. `verbose=1` prints a
    line (or a bar) per epoch. Returns the Run (dir, status, history, test); a diverged run raises DivergenceError.

    `distributed=True` trains data-parallel over the MPI ranks this process was started among (`mpiexec -n 4`,
    `srun`; one process without a launcher), see dlcli.distributed: rank 0 resolves the config, loads any checkpoint
    and writes the run directory; every rank returns the same Run. `threads` sets the BLAS threads per process
    (default with several ranks: this node's cores shared among its ranks).
    """
    from dlcli.distributed import limit_threads, world as mpi_world

    world = mpi_world(distributed)
    limit_threads(world, threads)
    with world.guard():
        return _train(world, config, overrides, runs_dir, resume, allow_config_change, init_from, seed, name,
                      callbacks, verbose)


def _train(world, config, overrides, runs_dir, resume, allow_config_change, init_from, seed, name, callbacks,
           verbose) -> Run:
    from dlcli.builder import build_model
    from dlcli.callbacks import CALLBACKS, BackupAndRestore
    from dlcli.config import dump_yaml
    from dlcli.kfold import train_folds

    overrides = [*overrides, *([Override("seed", seed, f"--seed {seed}")] if seed is not None else []),
                 *([Override("name", name, f"--name {name}")] if name else [])]
    resolved = _resolve(config, overrides, resume, allow_config_change, init_from) if world.is_root else (None,) * 5
    if world.is_root and resume in (False, None) and init_from is None:
        backup = BackupAndRestore.unfinished_run(resolved[0].train.callbacks)  # Keras' restore from a backup
        if backup is not None:
            resolved = _resolve(config, overrides, backup, allow_config_change, None)
    cfg, state, run_dir, changes, kfold_resume = resolved
    # rank 0's resolution for every rank (its checkpoint follows in Run.fit: other nodes may not see its disk)
    shared = world.bcast_json({"config": None if cfg is None else cfg.to_dict(),
                               "run_dir": None if run_dir is None else str(run_dir), "changes": changes,
                               "resumed": None if state is None else checkpoint.resume_banner(state)})
    cfg, changes = cfg if world.is_root else as_config(shared["config"]), shared["changes"]
    if world.size > 1 and cfg.train.kfold:
        raise DlcliError("train.kfold trains its folds one after another in one process; drop --distributed (or "
                         "train.kfold)", exit_code=2)
    with run_data(shared["run_dir"]):  # a resumed run looks where it found its data first, with its preprocessing
        model = build_model(cfg)  # shapes and names fail here, before any data is loaded (a table adapts first)
        initial = _init_from(model, init_from) if init_from is not None and world.is_root else None
        data = load_fitted(cfg, model)
    # everything that can refuse the run does so before its directory exists: folds, callbacks and their extras,
    # DLCLI_KERNELS (read at the first kernel call, which comes after)
    folds = data.folds(cfg.train.kfold, np.random.default_rng([cfg.seed, 3])) if cfg.train.kfold else None
    for spec in cfg.train.callbacks:
        CALLBACKS.create(spec)
    if cfg.train.mix is not None:
        mixing.get(cfg.train.mix).check(model)
    kernels.choice()
    if shared["run_dir"] is None and world.is_root:
        run_dir = run_files.create_run_dir(runs_dir, cfg.name)
        lines = []
        model.summary(print_fn=lines.append)
        new = run_files.RunDir(run_dir)
        new.write_text(new.summary, "\n".join(lines) + "\n")
    files = run_files.RunDir.for_rank(world.bcast_json(None if run_dir is None else str(run_dir)), world)
    files.write_text(files.config, dump_yaml(cfg.to_dict()))
    if cfg.train.kfold:
        return train_folds(cfg, model, data, folds, files.path, callbacks, resume=kfold_resume, verbose=verbose)
    return Run.in_dir(files, cfg, model, data, callbacks, verbose, world, init_from=initial,
                      config_changes=changes, resumed=shared["resumed"]).train(state)


def _resolve(config, overrides, resume, allow_config_change, init_from):
    """(Config, loaded checkpoint or None, run directory when resuming, lines naming accepted changes, whether
    it resumes a k-fold run)."""
    from dlcli import fingerprint

    state, changes, run_dir, folds = None, [], None, False
    if resume is not False and resume is not None:
        run_dir, config = (config, None) if resume is True else (resume, config)
        if init_from is not None:
            raise DlcliError("--resume continues a run; --init-from starts a new one from a run's weights: "
                             "give one of them", exit_code=2)
        run_dir = run_files.require_run_dir(run_dir)
        folds = run_files.RunDir(run_dir).folds.is_dir()  # each fold keeps its own checkpoint
        state = None if folds else checkpoint.load(run_dir)  # before anything else: a damaged one fails fast
        # what the run was trained with (its fingerprint record), not config.yaml, which may have been edited since
        recorded = fingerprint.recorded_config(run_dir, state)
        old = as_config(recorded) if recorded is not None else _config(run_files.RunDir(run_dir).config, [])
        cfg = _config(run_files.RunDir(run_dir).config if config is None else config, overrides)
        cfg = cfg.model_copy(update={"name": old.name})
        changes = fingerprint.check_resume(old.to_dict(), cfg.to_dict(), allow_config_change and not folds)
        if folds or state is not None:
            _refuse_finished(run_dir, None if folds else state["header"]["position"]["epoch"], old, cfg)
        new_lr = _constant_lr(cfg.compile.optimizer)
        # a new constant learning rate replaces the checkpointed one
        if state is not None and new_lr is not None and new_lr != _constant_lr(old.compile.optimizer):
            state["arrays"]["optimizer/learning_rate"] = np.array(new_lr, np.float64)
            state["header"]["position"]["learning_rate"] = new_lr
    elif config is None:
        raise DlcliError("give a config file (dlcli train configs/mnist.yaml) or --resume RUN_DIR", exit_code=2)
    else:
        cfg = _config(config, overrides)
    return cfg, state, run_dir, changes, folds


def _refuse_finished(run_dir, done: int | None, old: Config, new: Config):
    """A completed run (all its epochs trained, or EarlyStopping's end; for a K-fold run, all its folds) has
    nothing to resume unless the resume asks for more epochs. `done`: the epochs its checkpoint holds. A run whose
    checkpoint is at the end but whose meta.json does not say completed (killed or interrupted after its last
    checkpoint, before its end: EMA averages, on_train_end, the test split, meta.json) resumes to do that end."""
    meta = run_files.RunDir(run_dir).meta
    status = run_files.read_json(meta).get("status") if meta.is_file() else None
    if status == "completed" and ((done is not None and done >= new.train.epochs) or
                                  new.train.epochs <= old.train.epochs):
        trained = (f"all {old.train.kfold} folds trained" if done is None else
                   f"{done} of {plural(old.train.epochs, 'epoch')} trained")
        raise NothingToDo(f"{run_dir} has finished ({status}: {trained}), so "
                          f"there is nothing to resume; to train it longer resume with more epochs (--set "
                          f"train.epochs=N --allow-config-change), or start a new run from its weights (--init-from "
                          f"{run_dir})")


def _config(config, overrides) -> Config:
    from dlcli.config import load_config, validate_config

    if isinstance(config, Config):
        return validate_config(config.to_dict(), f"<{config.name}>", overrides)
    return load_config(config, overrides)


def _constant_lr(opt) -> float | None:
    """The learning rate of an optimizer spec when it is a constant (not a schedule)."""
    lr = opt.get("learning_rate") if isinstance(opt, dict) else None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def load_run_model(run_dir, weights: str = "best", allow_config_change: bool = False):
    """(Config, model holding the run's best or last weights) for a run directory. A config.yaml edited since the
    run recorded its config is refused with the diff (dlcli.fingerprint), or with `allow_config_change` used
    with a warning."""
    import warnings

    from dlcli import fingerprint
    from dlcli.builder import build_model
    from dlcli.config import load_config

    if weights not in ("best", "last"):
        raise DlcliError(f"--weights must be 'best' or 'last'; found '{weights}'", exit_code=2)
    run_dir = run_files.require_run_dir(run_dir)
    if (folds_dir := run_files.RunDir(run_dir).folds).is_dir():  # K models, none of them "the" model
        folds = sorted((p.name for p in folds_dir.iterdir() if p.name.isdigit()), key=int)
        raise DlcliError(f"{run_dir} is a K-fold run: its models are its folds, {folds_dir}/N (N = "
                         f"{', '.join(folds) or 'none yet'}); give one of them (e.g. {folds_dir / '1'}), or "
                         f"train the final model on all the data (--set train.kfold=null)", exit_code=2)
    meta = run_files.RunDir(run_dir).meta
    status = run_files.read_json(meta).get("status") if meta.is_file() else None
    if status == "running":
        warnings.warn(f"{run_dir} has not finished (meta.json says running: still training, or killed): using the "
                      f"{weights} weights it has saved so far", stacklevel=2)
    config = load_config(run_files.RunDir(run_dir).config)
    diff = fingerprint.check(run_dir, config.to_dict(), allow_config_change)
    if diff:
        warnings.warn(f"using {run_files.RunDir(run_dir).config}, edited since the run was trained:\n{diff}",
                      stacklevel=2)
    with run_data(run_dir):
        model = build_model(config)
    path = run_files.weights_file(run_files.RunDir(run_dir).weights, weights)
    if not path.exists():
        raise DlcliError(f"{path} does not exist; choose --weights best or last (a run writes both after its "
                         f"first epoch)")
    checkpoint.load_weights(path, model)
    return config, model


def evaluation_report(run_dir, weights: str = "best", split: str = "test", batch_size: int | None = None,
                      allow_config_change: bool = False) -> dict:
    """`dlcli evaluate`: loss and metrics of a finished run on a split; per-class accuracy and a confusion matrix for
    classifiers; written to the run's evaluation.json."""
    config, model = load_run_model(run_dir, weights, allow_config_change)
    files = run_files.RunDir(run_dir)
    with run_data(files.path):
        data = load_fitted(config, model)
    xs, ys = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    if xs is None:
        raise DlcliError(f"run {files.path.name} has no {split} split (set train.validation_split for a validation "
                         f"split)" if split == "validation" else "the dataset has no test split")
    bs = batch_size or config.train.batch_size
    result = {"run": files.path.name, "weights": weights, "split": split, "samples": len(xs),
              "metrics": model.evaluate(xs, ys, bs, return_dict=True)}
    preds = model.predict(xs, batch_size=bs)
    preds = preds if isinstance(preds, list) else [preds]
    report = classification_report(data.labels(split), preds[0], data.classes)
    if report:
        result.update(report)
    baseline = data.extra.get("baseline") if data.extra else None
    if baseline:
        result["baseline"] = baseline
        result["comparison"] = baseline_comparison(result["metrics"], data.extra, split)
    files.write_json(files.evaluation, result)
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
            "baseline": extra.get("baseline_description", "last value"),
            "beats_baseline": model_mae < base, "units": extra.get("target", "target")}


def classification_report(labels, y_pred, classes=None) -> dict | None:
    """Per-class accuracy and a confusion matrix when the output is a class distribution; `labels`: the true class
    of each sample (Dataset.labels)."""
    if y_pred.ndim != 2 or y_pred.shape[1] < 2:
        return None
    k = y_pred.shape[1]
    truth = labels.astype(int)
    guess = y_pred.argmax(1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (truth, guess), 1)
    support = confusion.sum(1)
    names = [str(c) for c in classes] if classes and len(classes) == k else [str(i) for i in range(k)]
    per_class = {n: (float(confusion[i, i] / support[i]) if support[i] else None) for i, n in enumerate(names)}
    return {"classes": names, "per_class_accuracy": per_class, "confusion_matrix": confusion.tolist()}


# --- fine-tune --------------------------------------------------------------------------------------------------------
def _init_from(model, run_dir) -> Path:
    """Fine-tuning: load another run's weights (best.npz, else last.npz); optimizer and counters start fresh."""
    run_dir = run_files.require_run_dir(run_dir)
    for path in (run_files.RunDir(run_dir).best_weights, run_files.RunDir(run_dir).last_weights):
        if path.exists():
            checkpoint.load_weights(path, model)
            return path
    raise DlcliError(f"{run_dir} has no weights yet (weights/best.npz or last.npz are written after each epoch)")
