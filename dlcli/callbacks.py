"""Callbacks (Keras' hooks, the protocol in dlcli.callback): History, progress output, and the training-control
callbacks a config can name. Importing this module registers every callback, the trackers' too.

Printing is a callback too, so the trainer and library users stay silent unless they ask for output.
"""
import math
import sys
import time

import numpy as np

from dlcli import trackers  # noqa: F401  (registers TensorBoard and MLflow)
from dlcli.callback import CALLBACKS, Callback, RankZeroCallback
from dlcli.errors import ConfigError, DlcliError
from dlcli.metrics import metric_direction


class CallbackList(Callback):
    """Calls a hook on each callback in order, skipping those that leave an on_ hook Callback's no-op: fit calls two
    hooks per batch, which most callbacks ignore. Each hook's callers are looked up once, at its first call."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)
        self.hooks = {}

    def __getattribute__(self, name):
        if name.startswith("on_") or name in ("set_model", "set_params"):
            hooks = object.__getattribute__(self, "hooks")
            if name not in hooks:
                methods = object.__getattribute__(self, "_methods")(name)

                def call_all(*args, **kwargs):
                    for method in methods:
                        method(*args, **kwargs)
                hooks[name] = call_all
            return hooks[name]
        return object.__getattribute__(self, name)

    def _methods(self, name: str) -> list:
        noop = getattr(Callback, name, None) if name.startswith("on_") else None
        return [getattr(cb, name) for cb in self.callbacks
                if noop is None or name in vars(cb) or getattr(type(cb), name, None) is not noop]

    def listens(self, name: str) -> bool:
        """Whether a callback defines hook `name`: fit builds each batch's logs only for one that does."""
        return bool(self._methods(name))


class History(Callback):
    """`history.history[name]` is the list of per-epoch values, as in Keras."""

    def __init__(self):
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)


def format_logs(logs: dict, skip=("epoch", "seconds", "learning_rate")) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k not in skip and isinstance(v, (int, float)))


class ProgressLogger(Callback):
    """A tqdm bar per epoch on a terminal (live loss/metrics, samples/s); one plain line per epoch otherwise."""

    def __init__(self, epochs: int, samples: int, stream=None, bar: bool | None = None):
        self.epochs, self.samples = epochs, samples
        self.stream = stream or sys.stdout
        self.bar = self.stream.isatty() if bar is None else bar
        self.pbar = None

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.seen, self.last_post = time.perf_counter(), 0, 0.0
        self.trained = self.start  # when the epoch's last training batch ended (validation comes after)
        if self.bar:
            from tqdm import tqdm

            # smoothing=0: the bar shows the epoch's mean rate, the figure the epoch line ends with
            self.pbar = tqdm(total=self.samples, desc=f"epoch {epoch + 1}/{self.epochs}", unit="sample",
                             unit_scale=True, leave=False, file=self.stream, dynamic_ncols=True, smoothing=0)

    def on_train_batch_end(self, batch, logs=None):
        size = logs.get("size", 0)
        self.seen += size
        self.trained = time.perf_counter()
        if self.pbar is None:
            return
        self.pbar.update(size)
        now = time.perf_counter()
        if now - self.last_post > 0.25:  # formatting every batch would cost more than a small batch's maths
            self.last_post = now
            self.pbar.set_postfix_str(format_logs(logs, skip=("size", "batch")), refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        seconds = logs.get("seconds", time.perf_counter() - self.start)
        training = self.trained - self.start
        rate = self.seen / training if training > 0 else 0.0  # samples trained / training time, as the bar
        print(f"epoch {epoch + 1}/{self.epochs}  {format_logs(logs)}  ({seconds:.1f}s, {rate:,.0f} samples/s "
              f"training)", file=self.stream, flush=True)


# --- training control (Keras' names, arguments and defaults) -------------------------------------------------------
class MonitorMixin:
    """Reads `monitor` from the epoch logs and decides what counts as better (Keras' mode='auto' rules)."""

    def _direction(self, mode: str) -> str:
        if mode in ("min", "max"):
            return mode
        if mode != "auto":
            raise ConfigError(f"{type(self).__name__} mode must be 'auto', 'min' or 'max'; got '{mode}'")
        direction = metric_direction(self.monitor)
        if direction is not None:
            return direction
        raise ConfigError(f"{type(self).__name__}: cannot tell whether '{self.monitor}' should go up or down; "
                          f"give mode: min or mode: max (as Keras asks)")

    def _current(self, logs):
        value = (logs or {}).get(self.monitor)
        if value is None:
            known = ", ".join(k for k in (logs or {}) if k not in ("seconds", "learning_rate"))
            hint = " (set train.validation_split for val_* values)" if self.monitor.startswith("val_") else ""
            raise DlcliError(f"{type(self).__name__} monitors '{self.monitor}', which the epoch logs do not have"
                             f"{hint}; available: {known}")
        return float(value)


def _state(obj, keys) -> dict:
    return {k: getattr(obj, k) for k in keys}


@CALLBACKS.register("EarlyStopping")
class EarlyStopping(MonitorMixin, Callback):
    """Stop when `monitor` has not improved by more than min_delta for `patience` epochs (Keras 3 semantics: the
    wait counter starts at start_from_epoch; a baseline must be beaten to reset it; best weights restored at the
    end of training when restore_best_weights)."""

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, verbose: int = 0,
                 mode: str = "auto", baseline: float | None = None, restore_best_weights: bool = False,
                 start_from_epoch: int = 0):
        self.monitor, self.min_delta, self.patience, self.verbose = monitor, abs(float(min_delta)), int(patience), \
            verbose
        self.mode, self.baseline = mode, baseline
        self.restore_best_weights, self.start_from_epoch = bool(restore_best_weights), int(start_from_epoch)
        self.sign = -1.0 if self._direction(mode) == "min" else 1.0
        self._reset()

    def _reset(self):
        self.wait, self.stopped_epoch, self.best, self.best_epoch, self.best_weights = 0, 0, None, 0, None

    def on_train_begin(self, logs=None):
        if not getattr(self, "_resumed", False):
            self._reset()

    def _improves(self, value, reference) -> bool:
        # Keras: monitor_op(current - min_delta, reference), min_delta negated when lower is better
        return reference is None or self.sign * (value - self.sign * self.min_delta) > self.sign * reference

    def on_epoch_end(self, epoch, logs=None):
        current = self._current(logs)
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = self.model.get_weights(), epoch
        self.wait += 1
        if self._improves(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or self._improves(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose:
            print(f"early stopping after epoch {self.stopped_epoch + 1}: {self.monitor} has not improved since "
                  f"epoch {self.best_epoch + 1} ({self.best:.4f})")
        if self.restore_best_weights and self.best_weights is not None:
            self.model.set_weights(self.best_weights)

    def get_state(self):
        state = _state(self, ("wait", "stopped_epoch", "best", "best_epoch"))
        if self.best_weights is not None:
            state["best_weights"] = self.best_weights
        return state

    def set_state(self, state):
        self._reset()
        for k, v in state.items():
            setattr(self, k, v)
        self._resumed = True


@CALLBACKS.register("ModelCheckpoint")
class ModelCheckpoint(MonitorMixin, RankZeroCallback):
    """weights/last.npz after every epoch (unless save_best_only) and weights/best.npz whenever `monitor` improves.

    `filepath` is the weights directory (default: the run directory's weights/, set by the run); files are written
    atomically (temp, fsync, rename), so a crash leaves the previous file whole.
    """

    def __init__(self, filepath: str | None = None, monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, mode: str = "auto", initial_value_threshold: float | None = None):
        self.filepath, self.monitor, self.verbose = filepath, monitor, verbose
        self.save_best_only, self.mode = bool(save_best_only), mode
        self.sign = -1.0 if self._direction(mode) == "min" else 1.0
        self.best = initial_value_threshold
        self.best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        from dlcli.checkpoint import save_weights
        from dlcli.run_files import weights_file

        if self.filepath is None:
            raise DlcliError("ModelCheckpoint needs a filepath (a directory for best.npz/last.npz) outside a run")
        current = self._current(logs)
        if not self.save_best_only and self.active:
            save_weights(weights_file(self.filepath, "last"), self.model)
        if current == current and (self.best is None or self.sign * current > self.sign * self.best):
            self.best, self.best_epoch = current, epoch + 1
            if self.active:
                save_weights(weights_file(self.filepath, "best"), self.model)
            if self.verbose:
                print(f"epoch {epoch + 1}: {self.monitor} improved to {current:.4f}; saved best.npz")

    def on_train_end(self, logs=None):
        """use_ema: fit has made the weights their averages (Keras' finalize_variable_values, after the last epoch's
        save), so last.npz becomes the model as fit leaves it, which the run's test metrics measure (Keras'
        model.save after fit holds the averages too). best.npz keeps the weights of its epoch's end, as Keras'
        ModelCheckpoint saves them (the averages with SwapEMAWeights(swap_on_epoch) listed before it)."""
        from dlcli.checkpoint import save_weights
        from dlcli.run_files import weights_file

        if self.save_best_only or not self.active or self.filepath is None:
            return
        if any(a is not None for a in self.model.optimizer.ema_averages(self.model.trainable_weights)):
            save_weights(weights_file(self.filepath, "last"), self.model)

    def get_state(self):
        return _state(self, ("best", "best_epoch"))

    def set_state(self, state):
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


@CALLBACKS.register("ReduceLROnPlateau")
class ReduceLROnPlateau(MonitorMixin, Callback):
    """learning_rate *= factor (not below min_lr) after `patience` epochs without an improvement larger than
    min_delta, then `cooldown` epochs of rest (Keras 3; mode 'auto' means max only for accuracy-like names)."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, verbose: int = 0,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0):
        if factor >= 1.0:
            raise ConfigError(f"ReduceLROnPlateau factor must be < 1 (as in Keras); got {factor}")
        self.monitor, self.factor, self.patience, self.verbose = monitor, float(factor), int(patience), verbose
        self.mode, self.min_delta, self.cooldown, self.min_lr = mode, float(min_delta), int(cooldown), float(min_lr)
        self.lower = mode == "min" or (mode == "auto" and "acc" not in monitor)  # Keras' own auto rule here
        if mode not in ("auto", "min", "max"):
            raise ConfigError(f"ReduceLROnPlateau mode must be 'auto', 'min' or 'max'; got '{mode}'")
        self._reset()

    def _reset(self):
        self.best = math.inf if self.lower else -math.inf
        self.wait, self.cooldown_counter = 0, 0

    def on_train_begin(self, logs=None):
        if not getattr(self, "_resumed", False):
            self._reset()

    def on_epoch_end(self, epoch, logs=None):
        current = self._current(logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        better = current < self.best - self.min_delta if self.lower else current > self.best + self.min_delta
        if better:
            self.best, self.wait = current, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = float(self.model.optimizer.learning_rate)
                if old > float(np.float32(self.min_lr)):
                    new = max(old * self.factor, self.min_lr)
                    self.model.optimizer.learning_rate = new
                    if self.verbose:
                        print(f"epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new:.4g}")
                    self.cooldown_counter, self.wait = self.cooldown, 0

    def get_state(self):
        return _state(self, ("best", "wait", "cooldown_counter"))

    def set_state(self, state):
        for k, v in state.items():
            setattr(self, k, v)
        self._resumed = True


@CALLBACKS.register("LearningRateScheduler")
class LearningRateScheduler(Callback):
    """Sets the learning rate at each epoch's start: schedule(epoch, lr) or schedule(epoch) as in Keras; in YAML the
    schedule is a built-in one ({type: cosine_decay, ...}, dlcli.schedules) evaluated at the epoch index."""

    def __init__(self, schedule, verbose: int = 0):
        from dlcli import schedules

        self.schedule = schedules.get(schedule) if isinstance(schedule, dict) else schedule
        if not callable(self.schedule):
            raise ConfigError(f"LearningRateScheduler schedule must be a mapping like {{type: exponential_decay, "
                              f"initial_learning_rate: 0.01, decay_steps: 1, decay_rate: 0.9}}; got {schedule!r}")
        self.verbose = verbose
        self.last_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.last_epoch:
            return  # resumed inside this epoch: the rate was set (and checkpointed) already
        lr = float(self.model.optimizer.learning_rate)
        try:
            lr = self.schedule(epoch, lr)
        except TypeError:
            lr = self.schedule(epoch)
        self.model.optimizer.learning_rate = float(lr)
        self.last_epoch = epoch
        if self.verbose:
            print(f"epoch {epoch + 1}: LearningRateScheduler setting learning rate to {float(lr):.4g}")

    def get_state(self):
        return {"last_epoch": self.last_epoch}

    def set_state(self, state):
        self.last_epoch = state.get("last_epoch")


@CALLBACKS.register("SwapEMAWeights")
class SwapEMAWeights(Callback):
    """Validation (and, with swap_on_epoch, everything after each epoch: ModelCheckpoint listed after it saves the
    averages) sees the optimizer's moving averages of the weights instead of the weights (Keras' SwapEMAWeights;
    the optimizer needs use_ema: true). The weights and averages trade places and back, so training continues on
    the weights; at the last epoch with swap_on_epoch the averages stay, as Keras finalizes them."""

    def __init__(self, swap_on_epoch: bool = False):
        self.swap_on_epoch = bool(swap_on_epoch)
        self.ema_weights_in_model = False

    def on_train_begin(self, logs=None):
        if not getattr(self.model.optimizer, "use_ema", False):
            raise ConfigError("SwapEMAWeights needs an optimizer with use_ema: true (compile.optimizer)")

    def _swap(self):
        params = self.model.trainable_weights
        for param, average in zip(params, self.model.optimizer.ema_averages(params)):
            if average is not None:
                swapped = param.value.copy()
                param.value[...] = average
                average[...] = swapped
        self.ema_weights_in_model = not self.ema_weights_in_model

    def on_epoch_begin(self, epoch, logs=None):
        if self.swap_on_epoch and self.ema_weights_in_model:
            self._swap()

    def on_epoch_end(self, epoch, logs=None):
        if self.swap_on_epoch and not self.ema_weights_in_model:
            self._swap()
            if epoch == self.params["epochs"] - 1:  # Keras' finalize: the averages stay in the model
                params = self.model.trainable_weights
                for param, average in zip(params, self.model.optimizer.ema_averages(params)):
                    if average is not None:
                        average[...] = param.value

    def on_test_begin(self, logs=None):
        if not self.ema_weights_in_model:
            self._swap()

    def on_test_end(self, logs=None):
        if self.ema_weights_in_model:
            self._swap()

    def get_state(self) -> dict:
        return {"ema_weights_in_model": self.ema_weights_in_model}

    def set_state(self, state: dict):
        self.ema_weights_in_model = bool(state.get("ema_weights_in_model", False))


@CALLBACKS.register("BackupAndRestore")
class BackupAndRestore(RankZeroCallback):
    """Keras' BackupAndRestore on dlcli's resume: the backup is the run directory's checkpoint (written at every
    epoch end, and every train.checkpoint_every batches), and backup_dir/run.json names the run using it.
    `dlcli train` of a config with this callback whose backup_dir names a run that did not complete continues that
    run exactly, as `--resume RUN` would, instead of starting a new one; a completed run deletes run.json
    (delete_checkpoint). double_checkpoint is accepted: dlcli writes its checkpoint atomically, so there is never a
    half-written one to fall back from."""

    POINTER = "run.json"

    def __init__(self, backup_dir: str, save_freq="epoch", double_checkpoint: bool = False,
                 delete_checkpoint: bool = True):
        if save_freq != "epoch":  # the run's checkpoint frequency is train.checkpoint_every's, not a callback's
            raise ConfigError(f"BackupAndRestore save_freq: dlcli checkpoints every epoch; for a checkpoint every N "
                              f"batches give train.checkpoint_every: N; got {save_freq!r}")
        self.backup_dir, self.save_freq = str(backup_dir), save_freq
        self.double_checkpoint, self.delete_checkpoint = bool(double_checkpoint), bool(delete_checkpoint)

    def on_run_begin(self, run):
        from pathlib import Path

        from dlcli import run_files

        super().on_run_begin(run)
        if self.active:
            run_files.atomic_write_json(Path(self.backup_dir) / self.POINTER, {"run_dir": str(Path(run.dir).resolve())})

    def on_run_end(self, run):
        from pathlib import Path

        if run.status == "completed" and self.delete_checkpoint and self.active:
            (Path(self.backup_dir) / self.POINTER).unlink(missing_ok=True)

    @classmethod
    def unfinished_run(cls, callback_specs):
        """The run directory a config's BackupAndRestore backup_dir names, if that run exists and did not complete
        (dlcli.train resumes it); None otherwise."""
        import json
        from pathlib import Path

        from dlcli import run_files

        for spec in callback_specs or []:
            if not (isinstance(spec, dict) and spec.get("type") == "BackupAndRestore" and spec.get("backup_dir")):
                continue
            try:
                run_dir = Path(json.loads((Path(spec["backup_dir"]) / cls.POINTER).read_text())["run_dir"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
            meta = run_files.RunDir(run_dir).meta
            status = run_files.read_json(meta).get("status") if meta.is_file() else None
            return run_dir if run_dir.is_dir() and status != "completed" else None
        return None


@CALLBACKS.register("RemoteMonitor")
class RemoteMonitor(RankZeroCallback):
    """POSTs each epoch's logs to root + path (Keras' RemoteMonitor): {"epoch": e, **logs} as a form field `field`
    holding JSON, or as a JSON body with send_as_json; `headers` are added to the request. A server that cannot be
    reached gets a warning, as in Keras, and training goes on. With several ranks only rank 0 sends."""

    def __init__(self, root: str = "http://localhost:9000", path: str = "/publish/epoch/end/", field: str = "data",
                 headers: dict | None = None, send_as_json: bool = False, timeout: float = 10.0):
        if not str(root).startswith(("http://", "https://")):
            raise ConfigError(f"RemoteMonitor root must be an http:// or https:// URL; got {root!r}")
        self.root, self.path, self.field, self.headers = str(root), str(path), str(field), dict(headers or {})
        self.send_as_json, self.timeout = bool(send_as_json), float(timeout)

    def on_epoch_end(self, epoch, logs=None):
        import json
        import urllib.error
        import urllib.parse
        import urllib.request
        import warnings

        if not self.active:
            return
        send = {"epoch": epoch, **{k: v.item() if isinstance(v, (np.ndarray, np.generic)) else v
                                   for k, v in (logs or {}).items()}}
        if self.send_as_json:
            body, kind = json.dumps(send).encode(), "application/json"
        else:
            body, kind = urllib.parse.urlencode({self.field: json.dumps(send)}).encode(), \
                "application/x-www-form-urlencoded"
        request = urllib.request.Request(self.root + self.path, data=body, method="POST",
                                         headers={"Content-Type": kind, **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as e:
            warnings.warn(f"Could not reach RemoteMonitor root server at {self.root} ({e})", stacklevel=2)


@CALLBACKS.register("TerminateOnNaN")
class TerminateOnNaN(Callback):
    """Stops training when a batch's loss is NaN or infinite (Keras)."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            print(f"batch {batch}: invalid loss, terminating training")
            self.model.stop_training = True


@CALLBACKS.register("CSVLogger")
class CSVLogger(RankZeroCallback):
    """Epoch logs to a CSV file (Keras' filename, separator, append). A run writes history.csv regardless."""

    def __init__(self, filename: str, separator: str = ",", append: bool = False):
        self.filename, self.separator, self.append = filename, separator, bool(append)
        self.rows: list[dict] = []

    def on_train_begin(self, logs=None):
        if self.append and not self.rows:
            self.rows = _read_csv(self.filename, self.separator)

    def on_epoch_end(self, epoch, logs=None):
        from dlcli.run_files import atomic_write_text, history_csv

        self.rows.append({"epoch": epoch, **(logs or {})})  # Keras' CSVLogger counts epochs from 0
        text = history_csv(self.rows)
        if self.active:
            atomic_write_text(self.filename, text if self.separator == "," else text.replace(",", self.separator))

    def get_state(self):
        return {"rows": self.rows}

    def set_state(self, state):
        self.rows = list(state.get("rows", []))


def _read_csv(path, separator) -> list[dict]:
    import csv
    from pathlib import Path

    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=separator))
