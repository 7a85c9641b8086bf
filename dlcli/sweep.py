"""Hyperparameter sweeps on Optuna: a config's `sweep:` section searched trial by trial, each trial an ordinary run.

- Every trial is `dlcli.train(config, overrides=[the searched --set values])` into `runs/<study>/trial-NNN-<time>/`,
  so evaluate, predict, plot and `runs compare` work on it. Its value is the best epoch's `sweep.metric`.
- The study lives in an Optuna storage: by default a journal file `runs/<study>/study.journal`, which several
  local processes share (Optuna's JournalFileBackend appends with a file lock); or any RDB URL
  (`postgresql://...`), which workers on many machines share. Starting again continues the study up to
  `sweep.trials` trials in all.
- A pruner stops a poor trial early from the metric reported after each epoch (the run's status says "pruned"); a
  k-fold trial reports after each fold instead (the mean so far of its folds' best values), see TrialReporter.
  A trial that fails or diverges is recorded as failed with its reason; the study goes on. What would fail every
  trial the same way (sweep.metric not in the epoch logs, a full disk) stops the sweep at once.
- A trial left running by a worker process that died (kill -9, out of memory) is recorded as failed, with a notice.
- The report: trials.csv, best.yaml (the best trial's resolved config), optimization_history.png and
  param_importances.png in `runs/<study>/`.
"""
import errno
import fcntl
import hashlib
import math
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from dlcli import fingerprint, runs
from dlcli.callbacks import Callback
from dlcli.config import Override, SweepConfig
from dlcli.errors import ConfigError, DlcliError
from dlcli.metrics import metric_direction
from dlcli.registry import Registry

JOURNAL = "study.journal"
INTERRUPTED = "interrupted"  # the reason recorded for a trial stopped by Ctrl-C: it does not count as done
LOST = "its worker process died"  # the reason's start for a trial whose worker was killed: it does not count either
# A database study's trials beat (Optuna's heartbeat) this often; one silent for GRACE_BEATS beats has lost its worker
HEARTBEAT_SECONDS, GRACE_BEATS = 30, 4
RECORD = "dlcli"  # the study user attribute holding what the study was started with (see check_study)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise DlcliError("dlcli sweep needs Optuna: pip install 'dlcli[sweep]'", exit_code=2) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported by us, with their reason
    return optuna


def _families():
    """Closed registries of the samplers and pruners a config may name, with Optuna's constructor arguments."""
    optuna = _optuna()
    samplers, pruners = Registry("sampler"), Registry("pruner")
    samplers.register("tpe")(optuna.samplers.TPESampler)
    samplers.register("random")(optuna.samplers.RandomSampler)
    samplers.register("grid")(optuna.samplers.GridSampler)
    pruners.register("median")(optuna.pruners.MedianPruner)
    pruners.register("hyperband")(optuna.pruners.HyperbandPruner)
    pruners.register("none")(optuna.pruners.NopPruner)
    return samplers, pruners


@dataclass
class Sweep:
    """What one `dlcli sweep` works on: the config, the study's name, directory and storage."""

    config: str
    overrides: list
    study_name: str
    dir: Path
    storage: str | None  # an RDB URL, or None for the journal file in `dir`
    spec: SweepConfig  # the config's sweep section
    target: int  # trials in all
    direction: str
    base: dict = field(default_factory=dict)  # the resolved config every trial starts from (no sweep section)
    worker: int = 0  # this process's index among the local workers (0: the one the command started)

    def open_storage(self):
        optuna = _optuna()
        if self.storage:
            for attempt in range(5):
                try:
                    # the heartbeat tells a trial whose worker died on another machine (kill -9, power) from one
                    # still running: fail_stale_trials
                    with warnings.catch_warnings():  # "experimental" since Optuna 2.9: not the user's concern
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        return optuna.storages.RDBStorage(self.storage, heartbeat_interval=HEARTBEAT_SECONDS,
                                                          grace_period=GRACE_BEATS * HEARTBEAT_SECONDS)
                except Exception as e:
                    # Workers started together on a fresh database race to create Optuna's tables: the loser's
                    # CREATE fails on a unique index, and a moment later the tables are simply there.
                    if attempt == 4 or "UniqueViolation" not in repr(e) and "already exists" not in str(e):
                        raise
                    time.sleep(0.5 + attempt)
        journal = optuna.storages.journal
        return optuna.storages.JournalStorage(journal.JournalFileBackend(str(self.dir / JOURNAL)))

    def load_study(self):
        optuna = _optuna()
        samplers, pruners = _families()
        sampler = _spec(self.spec.sampler)
        if self.spec.seed is not None:
            sampler.setdefault("seed", self.spec.seed)
        if sampler.get("seed") is not None and (self.worker or self.storage):
            # Workers drawing the same numbers would run the same trials: each gets a stream of its own (on a
            # database shared by machines, a process's host and pid tell it apart). One worker stays reproducible.
            who = f"{socket.gethostname()}:{os.getpid()}" if self.storage else ""
            key = f"{sampler['seed']}/{self.worker}/{who}".encode()
            sampler["seed"] = int.from_bytes(hashlib.sha256(key).digest()[:4], "big")
        if sampler["type"] == "grid":
            sampler["search_space"] = grid_space(self.spec.parameters)
        sampler, pruner = samplers.create(sampler), pruners.create(_spec(self.spec.pruner))
        try:
            return optuna.create_study(storage=self.open_storage(), sampler=sampler, pruner=pruner,
                                       study_name=self.study_name, direction=self.direction, load_if_exists=True)
        except ImportError as e:
            module = _missing_module(e)  # Optuna re-raises SQLAlchemy's ImportError as its own, nameless
            raise DlcliError(f"the storage {self.storage} needs a database driver{f' ({module})' if module else ''}: "
                             f"{_driver_install(module)}", exit_code=2) from None
        except Exception as e:  # a database that cannot be reached: one line, not SQLAlchemy's traceback
            if type(e).__module__.startswith(("sqlalchemy", "psycopg")):
                raise DlcliError(f"cannot open the study storage {self.storage}: {str(e).splitlines()[0]}") from None
            raise


# The pip package of each database driver SQLAlchemy may ask for: the sweep extra brings only PostgreSQL's.
_DRIVERS = {"MySQLdb": "mysqlclient", "pymysql": "pymysql", "mysql": "mysql-connector-python",
            "mysqldb": "mysqlclient", "mariadb": "mariadb", "asyncmy": "asyncmy", "aiomysql": "aiomysql",
            "psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "pg8000": "pg8000"}


def _missing_module(error) -> str | None:
    while error is not None:
        if isinstance(error, ImportError) and error.name:
            return error.name
        error = error.__cause__ or error.__context__
    return None


def _driver_install(module: str | None) -> str:
    package = _DRIVERS.get((module or "").split(".")[0])
    return f"pip install {package}" if package else "pip install 'dlcli[sweep]' (PostgreSQL) or your database's " \
                                                      "SQLAlchemy driver"


@dataclass
class SweepResult:
    study_name: str
    dir: Path
    trials: list = field(default_factory=list)  # rows of trials.csv
    best: dict | None = None
    files: list = field(default_factory=list)
    interrupted: bool = False
    lost: list = field(default_factory=list)  # lines naming trials whose worker process died


def prepare(config, overrides=(), *, trials: int | None = None, storage: str | None = None,
            study: str | None = None, runs_dir="runs") -> Sweep:
    """Validate the config (every sweep parameter at the ends of its range) before any trial runs."""
    from dlcli.config import load_config

    _optuna()  # a missing extra fails before anything is read or written

    cfg = load_config(config, list(overrides))
    spec = cfg.sweep
    if spec is None:
        raise ConfigError(f"{config} has no sweep: section (see configs/mnist_sweep.yaml: metric, trials, sampler, "
                          f"pruner, parameters)")
    direction = spec.direction
    if direction is None:
        inferred = metric_direction(spec.metric)
        if inferred is None:
            raise ConfigError(f"{config}: sweep.metric '{spec.metric}': cannot tell whether it should go up or "
                              f"down; give sweep.direction: minimize or maximize")
        direction = "minimize" if inferred == "min" else "maximize"
    if trials is not None and trials < 1:
        raise DlcliError(f"--trials must be at least 1; found {trials}", exit_code=2)
    name = study or cfg.name
    if not name or "/" in name or name.startswith("."):
        raise DlcliError(f"the study name '{name}' cannot be a directory name under {runs_dir}", exit_code=2)
    target = trials or spec.trials
    if _spec(spec.sampler)["type"] == "grid":
        size = 1
        for values in grid_space(spec.parameters).values():
            size *= len(values)
        target = min(target, size)
    base = {**cfg.to_dict(), "name": name}
    del base["sweep"]
    return Sweep(str(config), list(overrides), name, Path(runs_dir) / name, storage, spec, target, direction, base)


def study_record(sweep: Sweep) -> dict:
    """What a study is started with and every later run of it must match."""
    return {"metric": sweep.spec.metric, "direction": sweep.direction, **fingerprint.record(sweep.base)}


def check_study(study, sweep: Sweep):
    """Record what a new study is started with; refuse (exit 2, with the diff) a run of an existing one that changes
    its metric, direction or base config: its trials would not be comparable (Optuna keeps the stored direction
    whatever the config says, so the pruner would stop the better trials)."""
    mine, stored = study_record(sweep), study.user_attrs.get(RECORD)
    found = []
    if stored is None:  # a new study, or one made through Optuna's own API: only its direction is known
        if study.direction.name.lower() != sweep.direction:
            found.append(("sweep.direction", study.direction.name.lower(), sweep.direction))
    else:
        for key in ("metric", "direction"):
            if stored.get(key) != mine[key]:
                found.append((f"sweep.{key}", stored.get(key), mine[key]))
        if stored.get("config_fingerprint") != mine["config_fingerprint"]:
            # a searched value's default in the config is never trained with: changing it changes no trial
            searched = tuple(sweep.spec.parameters)
            found += [d for d in fingerprint.diff(stored.get("config") or {}, mine["config"])
                      if not any(d[0] == p or d[0].startswith(p + ".") for p in searched)]
    if found:
        where = sweep.storage or sweep.dir / JOURNAL
        raise DlcliError(f"study {sweep.study_name} ({where}) was started with other settings; its trials would "
                         f"not be comparable with this run's:\n{fingerprint.diff_lines(found)}\nrestore them, or "
                         f"start another study (--study NAME)", exit_code=2)
    if stored is None:
        study.set_user_attr(RECORD, mine)


def _spec(value) -> dict:
    return {"type": value} if isinstance(value, str) else dict(value)


def grid_space(parameters: dict) -> dict:
    """Every value the grid sampler visits (parameter name -> SweepParameter): choices, int ranges by step, float
    ranges that give a step."""
    import numpy as np

    space = {}
    for name, p in parameters.items():
        if p.type == "categorical":
            space[name] = list(p.choices)
        elif p.type == "int":
            space[name] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        elif p.step:
            space[name] = [float(v) for v in np.arange(p.low, p.high + p.step / 2, p.step)]
        else:
            raise ConfigError(f"sweep.parameters.{name}: the grid sampler needs a step for a float range "
                              f"(or use choices)")
    return space


def suggest(trial, parameters: dict) -> dict:
    values = {}
    for name, p in parameters.items():
        if p.type == "categorical":
            values[name] = trial.suggest_categorical(name, p.choices)
        elif p.type == "int":
            values[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[name] = trial.suggest_float(name, float(p.low), float(p.high), step=p.step, log=p.log)
    return values


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
        from dlcli.runs import FOLDS

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
    """The objective: one ordinary run with this trial's values; its best epoch's metric."""
    from dlcli.experiment import train

    optuna = _optuna()
    values = suggest(trial, sweep.spec.parameters)
    sets = [*sweep.overrides, Override("sweep", None, "dlcli sweep"),
            *(Override(k, v, f"sweep trial {trial.number}: {k}={v!r}") for k, v in values.items())]
    reporter = TrialReporter(trial, sweep.spec.metric, sweep.direction == "minimize", log)
    try:
        run = train(sweep.config, sets, runs_dir=sweep.dir, name=f"trial-{trial.number:03d}", callbacks=[reporter],
                    verbose=0)
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


def _trial_run_dir(number: int, sweep: Sweep) -> Path | None:
    """A trial's run directory, if it got one (the newest trial-NNN-* of this number)."""
    found = sorted(sweep.dir.glob(f"trial-{number:03d}-*"))
    return found[-1] if found else None


def _record_run_dir(trial, sweep: Sweep):
    found = _trial_run_dir(trial.number, sweep)
    if found is not None:
        trial.set_user_attr("run_dir", str(found))


def work(sweep: Sweep, ready=None, start=None, log=None):
    """One worker: run trials until the study has `sweep.target` finished ones (shared with every other worker).

    `ready`/`start` (multiprocessing events) let the parent start all workers' first trials together; `log` gets
    one line per epoch and per finished trial.
    """
    optuna = _optuna()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = sweep.load_study()
    if ready is not None:
        ready.set()
        start.wait()
    done = [] if log is None else [lambda study, trial: log(trial_line(trial, sweep))]
    claim = Claim(sweep)

    def objective(trial):
        # first of all: from here on, a kill -9 of this process leaves a trial fail_stale_trials can find
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        claim.release()  # the trial is RUNNING in the storage now: every other worker counts it
        return run_trial(sweep, trial, log)

    try:
        while not STOP.requested:
            claim.acquire()  # count, then start a trial, with no other worker in between: never above the target
            for line in fail_stale_trials(study, sweep):
                if log is not None:
                    log(line)
            if STOP.requested or _counted(study) >= sweep.target:
                break
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=done)
            claim.release()  # if Optuna failed before calling the objective
            trial = study.trials[-1] if study.trials else None
            if trial is not None and trial.state.name == "FAIL" and "reason" not in trial.user_attrs:
                break  # not ours to judge (Optuna's own failure): stop rather than loop
    finally:
        claim.release()
        claim.close()


class Claim:
    """A lock shared by every worker of a study, held from counting its trials until a new one is RUNNING: without it
    two workers that both count target - 1 both start one. Workers on several machines share a PostgreSQL or MySQL
    database, whose advisory lock serves; workers on one machine (the journal file, SQLite) share a file lock."""

    def __init__(self, sweep: Sweep):
        self.held, self.conn, self.file = False, None, None
        url = sweep.storage or ""
        if url.startswith(("postgresql", "mysql")):
            import sqlalchemy

            self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            self.key = int.from_bytes(hashlib.sha256(sweep.study_name.encode()).digest()[:8], "big", signed=True)
            postgres = url.startswith("postgresql")
            lock, unlock = (("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)") if postgres
                            else ("SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)"))
            self.lock_sql, self.unlock_sql = sqlalchemy.text(lock), sqlalchemy.text(unlock)
        else:
            path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else sweep.dir / JOURNAL
            self.file = open(path.with_name(path.name + ".claim"), "a")

    def acquire(self):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_EX)
        else:
            self.conn = self.conn or self.engine.connect()
            self.conn.execute(self.lock_sql, {"k": self.key})
        self.held = True

    def release(self):
        if not self.held:
            return
        self.held = False
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
        else:
            self.conn.execute(self.unlock_sql, {"k": self.key})
            self.conn.commit()

    def close(self):
        if self.file is not None:
            self.file.close()
        elif self.conn is not None:
            self.conn.close()


def trial_line(trial, sweep: Sweep) -> str:
    value = "" if trial.value is None else f" {sweep.spec.metric} {trial.value:.4f}"
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    reason = trial.user_attrs.get("reason")
    return (f"trial {trial.number} {trial.state.name.lower()}{value} ({params})"
            + (f": {reason}" if reason and trial.state.name != "PRUNED" else f", {reason}" if reason else "")
            + f"  {trial.user_attrs.get('run_dir', '')}")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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


def _worker_main(sweep: Sweep, ready, start, log, errors):
    """Entry point of an extra worker process: quiet on Ctrl-C (the parent reports). An error that stops the sweep
    goes to the parent (`errors`), which this worker then asks to stop every worker."""
    STOP.install()
    # a warning as one line, as the command's own process prints it (dlcli.commands.base), not Python's excerpt
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr, flush=True)
    try:
        work(sweep, ready, start, log)
    except KeyboardInterrupt:
        pass
    except DlcliError as e:
        errors.put((isinstance(e, MetricMissing), e.message, e.exit_code))
        os.kill(os.getppid(), signal.SIGUSR1)


def _counted(study) -> int:
    """Trials that count toward the target: finished ones (not those Ctrl-C stopped or whose worker died) and ones
    running now."""
    states = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.name in states and not _unfinished(t.user_attrs.get("reason", "")))


def _unfinished(reason: str) -> bool:
    return reason == INTERRUPTED or reason.startswith(LOST)


def fail_stale_trials(study, sweep: Sweep) -> list[str]:
    """Trials left RUNNING by a worker that no longer exists (kill -9, out of memory): on this machine a worker whose
    process is gone, on a database also one whose heartbeat stopped. Recorded as failed (not counted: a new trial
    takes their place), their run directories too (when on this machine). One line each, for people."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    beats = getattr(storage, "get_heartbeat_interval", None)  # a database's (Optuna wraps it in a cache)
    silent = set(storage._get_stale_trial_ids(study._study_id)) if beats and beats() else set()
    host, lines = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if t._trial_id in silent:
            reason = f"{LOST} ({worker}): no heartbeat for {GRACE_BEATS * HEARTBEAT_SECONDS} s"
        elif name == host and pid.isdigit() and not _alive(int(pid)):
            reason = f"{LOST} ({worker}) before the trial ended"
        else:
            continue
        run_dir = _trial_run_dir(t.number, sweep)
        try:
            study._storage.set_trial_user_attr(t._trial_id, "reason", reason)
            if run_dir is not None:
                study._storage.set_trial_user_attr(t._trial_id, "run_dir", str(run_dir))
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker of this machine got there first
        if run_dir is not None and runs.RunDir(run_dir).meta.is_file():
            try:
                meta = runs.read_json(runs.RunDir(run_dir).meta)
                if meta.get("status") == "running":
                    runs.atomic_write_json(runs.RunDir(run_dir).meta,
                                           {**meta, "status": "failed", "end": runs.utc_now(), "error": reason})
            except DlcliError:
                pass  # the study's record is what matters; a damaged meta.json says enough by itself
        lines.append(f"trial {t.number} failed: {reason}; recorded as failed, not counted"
                     + (f"  {run_dir}" if run_dir else ""))
    return lines


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_study_dir(sweep: Sweep):
    try:
        sweep.dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DlcliError(f"cannot create the study directory {sweep.dir}: {e.strerror or e} (see --runs-dir)",
                         exit_code=2) from None


def run_sweep(sweep: Sweep, workers: int = 1, on_start=None, log=None) -> SweepResult:
    """Run the study with `workers` local processes (this one and workers - 1 more); write the report. Ctrl-C stops
    every worker after its current trial is marked interrupted; the report is written all the same. An error that
    would fail every trial (sweep.metric missing, a full disk) stops every worker and is raised."""
    try:
        return _run_sweep(sweep, workers, on_start, log)
    except OSError as e:  # the study's own files (the journal, the report) on a full or read-only disk
        raise DlcliError(f"cannot write {e.filename or sweep.dir}: {e.strerror or e}") from None
    finally:
        STOP.requested, STOP.run = False, None  # this process may run another sweep (a library user, a test)


def _run_sweep(sweep: Sweep, workers: int, on_start, log) -> SweepResult:
    import multiprocessing

    if workers < 1:
        raise DlcliError(f"--workers must be at least 1; found {workers}", exit_code=2)
    if not sweep.storage:
        make_study_dir(sweep)  # the journal file lives there
    study = sweep.load_study()
    check_study(study, sweep)
    make_study_dir(sweep)
    lost = fail_stale_trials(study, sweep)
    if on_start is not None:
        on_start(study, _counted(study), lost)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked database connections or locks
    procs, ready, start, errors = [], [], context.Event(), context.SimpleQueue()
    for _ in range(workers - 1):
        event = context.Event()
        proc = context.Process(target=_worker_main, args=(replace(sweep, worker=len(procs) + 1), event, start, log,
                                                          errors), daemon=False)
        proc.start()
        procs.append(proc)
        ready.append(event)
    previous = STOP.install()
    fatal = None
    try:
        for event, proc in zip(ready, procs):
            while not event.wait(0.2) and proc.is_alive() and not STOP.requested:
                pass
        start.set()
        if not STOP.requested:
            try:
                _share_work(sweep, procs, log)
            except DlcliError as e:
                fatal = e
                STOP.requested = True
        if STOP.requested:
            # A terminal's Ctrl-C reached every worker; a signal sent to this process alone is passed on.
            for proc in procs:
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGUSR1)
    except KeyboardInterrupt:  # a second signal: stop waiting for the workers
        for proc in procs:
            proc.terminate()
    finally:
        start.set()
        for proc in procs:
            proc.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    while fatal is None and not errors.empty():
        metric_missing, message, exit_code = errors.get()
        fatal = (MetricMissing if metric_missing else DlcliError)(message, exit_code)
    if fatal is not None:
        _forget_if_empty(study, sweep, fatal)
        raise fatal
    lost = fail_stale_trials(study, sweep)  # the trials of workers that were killed (their exit code says how)
    killed = {p.pid: -p.exitcode for p in procs if p.exitcode is not None and p.exitcode < 0}
    for pid, signum in killed.items():
        lost.append(f"worker process {pid} was killed by {signal.Signals(signum).name}")
    interrupted = STOP.requested
    result = report(sweep, study)
    result.interrupted, result.lost = interrupted, lost
    return result


def _share_work(sweep: Sweep, procs: list, log):
    """This process's trials until the study has its target; then, while the other workers run, a trial in place of
    the one a worker was running when it died (kill -9: fail_stale_trials no longer counts it)."""
    dead = set()
    while True:
        work(sweep, log=log)
        while not STOP.requested:
            # is_alive() reaps a dead worker: until then its pid still answers, and its trial looks alive
            killed = {p.pid for p in procs if not p.is_alive() and p.exitcode < 0} - dead
            if killed or not any(p.is_alive() for p in procs):
                break
            time.sleep(0.5)
        if STOP.requested or not killed:
            return
        dead |= killed


def _forget_if_empty(study, sweep: Sweep, error: DlcliError):
    """A study stopped by sweep.metric missing before any trial finished is deleted, so fixing the config and running
    the same command again starts it afresh (rather than being refused as a changed study)."""
    if not isinstance(error, MetricMissing):
        return
    if any(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False)):
        return
    _optuna().delete_study(study_name=sweep.study_name, storage=study._storage)
    error.message += "; the study had no finished trial and was removed: fix the config and run the command again"


def report(sweep: Sweep, study) -> SweepResult:
    """trials.csv, best.yaml and the plots, from the study as it stands (every worker's trials)."""
    rows = trial_rows(study, sweep.spec.parameters)
    result = SweepResult(sweep.study_name, sweep.dir, rows)
    runs.atomic_write_text(sweep.dir / "trials.csv", runs.history_csv(rows) if rows else "number,state\n")
    result.files.append(sweep.dir / "trials.csv")
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        pick = min if sweep.direction == "minimize" else max
        result.best = pick(complete, key=lambda r: r["value"])
        config = runs.RunDir(result.best["run_dir"]).config if result.best.get("run_dir") else None
        if config is not None and config.exists():
            runs.atomic_write_text(sweep.dir / "best.yaml",
                                   f"# best of study {sweep.study_name}: trial {result.best['number']}, "
                                   f"{sweep.spec.metric} {result.best['value']:.6g} ({result.best['run_dir']})\n"
                                   + config.read_text())
            result.files.append(sweep.dir / "best.yaml")
    result.files += plots(study, sweep.dir, sweep.spec.metric, sweep.direction == "minimize")
    return result


def trial_rows(study, parameters: dict) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     **{name: t.params.get(name) for name in parameters},
                     "seconds": None if seconds is None else round(seconds, 2),
                     "run_dir": t.user_attrs.get("run_dir", ""), "reason": t.user_attrs.get("reason", ""),
                     "worker": t.user_attrs.get("worker", "")})
    return rows


def plots(study, folder: Path, metric: str, minimize: bool) -> list[Path]:
    """optimization_history.png, and param_importances.png once two completed trials differ in what they tried."""
    from dlcli.plots import importances_png, sweep_history_png

    optuna = _optuna()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return []
    written = [folder / "optimization_history.png"]
    runs.atomic_write_bytes(written[0], sweep_history_png([(t.number, t.value) for t in complete], metric, minimize,
                                                          f"study {study.study_name}"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError):
        importances = {}  # e.g. one completed trial, or every trial tried the same values: nothing to rank
    if importances:
        written.append(folder / "param_importances.png")
        runs.atomic_write_bytes(written[1], importances_png(importances, metric,
                                                            f"study {study.study_name}: parameter importances"))
    return written
