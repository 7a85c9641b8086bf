"""A study: where it is stored (a journal file or a database), its sampler and pruner, what it searches, and the
record of what it was started with, which every later run of it must match."""
import hashlib
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dlcli import fingerprint
from dlcli.config import SweepConfig
from dlcli.errors import ConfigError, DlcliError, require
from dlcli.metrics import metric_direction
from dlcli.registry import Registry
from dlcli.run_files import RunDir

INTERRUPTED = "interrupted"  # the reason recorded for a trial stopped by Ctrl-C: it does not count as done
LOST = "its worker process died"  # the reason's start for a trial whose worker was killed: it does not count either
# A database study's trials beat (Optuna's heartbeat) this often; one silent for GRACE_BEATS beats has lost its worker
HEARTBEAT_SECONDS, GRACE_BEATS = 30, 4
RECORD = "dlcli"  # the study user attribute holding what the study was started with (see check_study)


def optuna_module():
    optuna = require("optuna", "sweep", "dlcli sweep")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported by us, with their reason
    return optuna


def _families():
    """Closed registries of the samplers and pruners a config may name, with Optuna's constructor arguments."""
    optuna = optuna_module()
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
    """What one `dlcli sweep` works on: the resolved config, the study's name, directory and storage."""

    study_name: str
    dir: Path
    storage: str | None  # an RDB URL, or None for the journal file in `dir`
    spec: SweepConfig  # the config's sweep section
    target: int  # trials in all
    direction: str
    base: dict = field(default_factory=dict)  # the config (--set applied, no sweep section) every trial overrides
    worker: int = 0  # this process's index among the local workers (0: the one the command started)

    def open_storage(self):
        optuna = optuna_module()
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
        return optuna.storages.JournalStorage(journal.JournalFileBackend(str(RunDir(self.dir).journal)))

    def load_study(self):
        optuna = optuna_module()
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


def prepare(config, overrides=(), *, trials: int | None = None, storage: str | None = None,
            study: str | None = None, runs_dir="runs") -> Sweep:
    """Validate the config (every sweep parameter at the ends of its range) before any trial runs."""
    from dlcli.config import load_config

    optuna_module()  # a missing extra fails before anything is read or written

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
    return Sweep(name, Path(runs_dir) / name, storage, spec, target, direction, base)


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
        where = sweep.storage or RunDir(sweep.dir).journal
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
