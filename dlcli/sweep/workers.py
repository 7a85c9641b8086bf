"""The processes sharing a study: this one and `--workers - 1` spawned ones on this machine, any number elsewhere
on a database; each claims a trial under a shared lock so the study never runs more than its target, and the
trials of a worker that died are failed and replaced."""
import fcntl
import hashlib
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from dlcli import run_files
from dlcli.errors import DlcliError
from dlcli.sweep.report import SweepResult, report, trial_line
from dlcli.sweep.search import GRACE_BEATS, INTERRUPTED, LOST, Sweep, check_study, optuna_module
from dlcli.sweep.trial import STOP, MetricMissing, TrialFailed, run_trial, trial_run_dir

def work(sweep: Sweep, ready=None, start=None, log=None):
    """One worker: run trials until the study has `sweep.target` finished ones (shared with every other worker).

    `ready`/`start` (multiprocessing events) let the parent start all workers' first trials together; `log` gets
    one line per epoch and per finished trial.
    """
    optuna = optuna_module()
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
            path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else \
                run_files.RunDir(sweep.dir).journal
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
            reason = f"{LOST} ({worker}): no heartbeat for {GRACE_BEATS * beats()} s"
        elif name == host and pid.isdigit() and not _alive(int(pid)):
            reason = f"{LOST} ({worker}) before the trial ended"
        else:
            continue
        run_dir = trial_run_dir(t.number, sweep)
        try:
            study._storage.set_trial_user_attr(t._trial_id, "reason", reason)
            if run_dir is not None:
                study._storage.set_trial_user_attr(t._trial_id, "run_dir", str(run_dir))
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker of this machine got there first
        files = None if run_dir is None else run_files.RunDir(run_dir)
        if files is not None and files.meta.is_file():
            try:
                meta = run_files.read_json(files.meta)
                if meta.get("status") == "running":
                    files.write_json(files.meta, {**meta, "status": "failed", "end": run_files.utc_now(),
                                                  "error": reason})
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
    optuna_module().delete_study(study_name=sweep.study_name, storage=study._storage)
    error.message += "; the study had no finished trial and was removed: fix the config and run the command again"
