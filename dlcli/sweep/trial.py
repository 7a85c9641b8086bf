"""One trial: an ordinary run with the values the sampler suggests, reporting its metric to the pruner after each
epoch (or fold), stopped by Ctrl-C or the pruner between batches; its value is its best epoch's metric."""
import errno
import math
import signal
from pathlib import Path

from dlcli.callbacks import Callback
from dlcli.config import Override, as_config
from dlcli.errors import DlcliError
from dlcli.sweep.search import INTERRUPTED, Sweep, optuna_module, suggest

class Stop:
    """Ctrl-C or SIGTERM in a sweep process: the running trial ends after its batch (its run directory says
    interrupted, with a checkpoint) and no new trial starts; a second signal aborts at once. Ending trials this way,
    never by an exception thrown into arbitrary code, keeps the study's storage (a file lock, a transaction) whole."""

    def __init__(self):
        self.requested, self.run = False, None

    def install(self) -> dict:
        def on_signal(signum, frame):
            if self.requested and signum != signal.SIGUSR1:
                raise KeyboardInterrupt
            self.requested = True
            if self.run is not None:
                self.run.stop("interrupted")

        # SIGUSR1: the parent passing a stop on (never an abort, even if the terminal's Ctrl-C came first)
        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}


STOP = Stop()  # one per process: a worker runs one trial at a time



class MetricMissing(DlcliError):
    """sweep.metric is not among the epoch logs: every trial would fail the same way, so the sweep stops."""


class TrialFailed(Exception):
    """A trial that failed for reasons of its own (diverged, say): recorded with its reason, the study goes on.
    Optuna catches only this; any other error from a trial (MetricMissing, a full disk) stops the sweep."""


class TrialReporter(Callback):
    """Reports the metric to Optuna after each epoch, stops a trial the pruner judges hopeless, logs a line per epoch.

    A k-fold trial (one run per fold) reports after each fold instead: at step k-1, the mean of its first k folds'
    best values. Epoch e of fold 2 is not comparable with epoch e of fold 1 (another validation set, and Optuna keeps
    only the first report of a step), so the pruner compares trials after the same number of folds and stops one at
    a fold's end."""

    def __init__(self, trial, metric: str, minimize: bool, log=None):
        self.trial, self.metric, self.minimize, self.log = trial, metric, minimize, log
        self.pruned_at, self.fold_bests, self.prune_next = None, [], False

    def on_run_begin(self, run):
        from dlcli.run_files import FOLDS

        self.run = STOP.run = run
        self.fold = int(run.dir.name) if run.dir.parent.name == FOLDS else None
        self.fold_best, self.epochs = None, run.config.train.epochs
        if STOP.requested:  # the signal came while the trial was loading its data
            run.stop("interrupted")
        elif self.prune_next:  # the previous fold ended early (early stopping) and was judged at its end
            run.stop("pruned")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.metric not in logs:
            known = ", ".join(k for k in logs if k not in ("seconds",))
            hint = " (set train.validation_split for val_* values)" if self.metric.startswith("val_") else ""
            raise MetricMissing(f"sweep.metric '{self.metric}' is not in the epoch logs{hint}; available: {known}",
                                exit_code=2)
        value = float(logs[self.metric])
        if self.log is not None:
            fold = f" fold {self.fold}" if self.fold else ""
            self.log(f"trial {self.trial.number}{fold} epoch {epoch + 1}/{self.epochs}: {self.metric} {value:.4f}")
        if self.fold is None:
            self.trial.report(value, epoch)
            if self.trial.should_prune():
                self.pruned_at = f"epoch {epoch + 1}"
                self.run.stop("pruned")
            return
        if math.isfinite(value) and (self.fold_best is None or
                                     (value < self.fold_best if self.minimize else value > self.fold_best)):
            self.fold_best = value
        if epoch + 1 == self.epochs:
            self._fold_done(stop_now=True)

    def on_run_end(self, run):
        if self.fold is not None and run.status == "completed" and len(self.fold_bests) < self.fold:
            self._fold_done(stop_now=False)  # the fold ended before its last epoch (early stopping)

    def _fold_done(self, stop_now: bool):
        if self.fold_best is None:
            return  # no finite value: the trial fails on its own
        self.fold_bests.append(self.fold_best)
        self.trial.report(sum(self.fold_bests) / len(self.fold_bests), len(self.fold_bests) - 1)
        if self.trial.should_prune():
            self.pruned_at = f"fold {self.fold}"
            if stop_now:
                self.run.stop("pruned")
            else:
                self.prune_next = True


def run_trial(sweep: Sweep, trial, log=None) -> float:
    """The objective: one ordinary run of the study's resolved config with this trial's values; its best epoch's
    metric."""
    from dlcli.experiment import train

    optuna = optuna_module()
    values = suggest(trial, sweep.spec.parameters)
    sets = [Override(k, v, f"sweep trial {trial.number}: {k}={v!r}") for k, v in values.items()]
    reporter = TrialReporter(trial, sweep.spec.metric, sweep.direction == "minimize", log)
    try:
        run = train(as_config(sweep.base), sets, runs_dir=sweep.dir, name=f"trial-{trial.number:03d}",
                    callbacks=[reporter], verbose=0)
    except KeyboardInterrupt:
        trial.set_user_attr("reason", INTERRUPTED)
        raise
    except (DlcliError, OSError) as e:
        # an OSError is a write outside runs' atomic writes (train.log): the disk's trouble, not the trial's
        error = e if isinstance(e, DlcliError) else DlcliError(f"cannot write {e.filename or sweep.dir}: "
                                                               f"{e.strerror or e}")
        trial.set_user_attr("reason", error.message.splitlines()[0][:500])
        _record_run_dir(trial, sweep)
        if isinstance(e, (MetricMissing, OSError)) or _disk_trouble(e):
            raise error from None  # every trial would fail the same way: stop the sweep
        raise TrialFailed(error.message) from None
    trial.set_user_attr("run_dir", str(run.dir))
    if run.status == "pruned":
        trial.set_user_attr("reason", f"pruned after {reporter.pruned_at}")
        raise optuna.TrialPruned(f"pruned after {reporter.pruned_at}")
    if run.status != "completed":
        trial.set_user_attr("reason", INTERRUPTED if run.status == "interrupted" else run.status)
        raise TrialFailed(f"the run ended {run.status}")
    return trial_value(run.history, sweep.spec.metric, sweep.direction == "minimize", trial)


def trial_value(history: list[dict], metric: str, minimize: bool, trial=None) -> float:
    """A trial's value: its best epoch's metric (the epoch ModelCheckpoint would keep), not its last."""
    values = [float(r[metric]) for r in history if r.get(metric) is not None and math.isfinite(float(r[metric]))]
    if not values:
        reason = f"no finite {metric} value in history.csv"
        if trial is not None:
            trial.set_user_attr("reason", reason)
        raise TrialFailed(reason)
    return min(values) if minimize else max(values)


def _disk_trouble(error) -> bool:
    """Whether an error comes from a full, over-quota or read-only disk (an OSError somewhere in its chain)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return True
        error = error.__cause__ or error.__context__
    return False


def trial_run_dir(number: int, sweep: Sweep) -> Path | None:
    """A trial's run directory, if it got one (the newest trial-NNN-* of this number)."""
    found = sorted(sweep.dir.glob(f"trial-{number:03d}-*"))
    return found[-1] if found else None


def _record_run_dir(trial, sweep: Sweep):
    found = trial_run_dir(trial.number, sweep)
    if found is not None:
        trial.set_user_attr("run_dir", str(found))
