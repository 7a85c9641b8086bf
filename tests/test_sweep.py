"""dlcli sweep end to end, as separate processes: workers sharing one journal file, a study continued, pruning, a
diverged trial recorded as failed, Ctrl-C, and workers on "two machines" sharing a real PostgreSQL server."""
import csv
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import optuna
import pytest

from dlcli.config import load_config
from dlcli.errors import ConfigError
from tests.postgres_fixture import postgres_url  # noqa: F401  (a fixture)
from tests.sweep_fixture import dlcli, read_trials, start_dlcli, write_sweep_config


def test_parameter_paths_and_values_are_checked_before_any_trial(tmp_path):
    config = write_sweep_config(tmp_path, parameters="""\
    compile.optimizer.learnin_rate: {type: float, low: 0.001, high: 0.1}
    model.layers.3.units: {type: int, low: 1, high: 8}
    train.batch_size: {type: categorical, choices: [16, big]}
""")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    found = [str(i) for i in info.value.issues]
    assert found[0].startswith(f"{config}:21: sweep.parameters.compile.optimizer.learnin_rate: with the value "
                               f"0.001: unknown key 'learnin_rate' for adam (did you mean 'learning_rate'?)")
    assert found[1] == f"{config}:22: sweep.parameters.model.layers.3.units: with the value 1: model.layers has 2 " \
                       f"items (indices 0..1); index 3 is out of range"
    assert found[2] == f"{config}:23: sweep.parameters.train.batch_size: with the value 'big': expected an " \
                       f"integer, found 'big'"
    result = dlcli("sweep", config, "--runs-dir", tmp_path / "runs")
    assert result.returncode == 2 and "learnin_rate" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.slow
def test_two_workers_share_one_journal_and_a_rerun_continues_the_study(tmp_path):
    config = write_sweep_config(tmp_path)
    runs = tmp_path / "runs"
    result = dlcli("sweep", config, "--workers", 2, "--trials", 6, "--runs-dir", runs)
    assert result.returncode == 0, result.stdout + result.stderr
    study = runs / "tiny-sweep"
    trials = read_trials(study)
    assert [t["state"] for t in trials] == ["COMPLETE"] * 6
    assert len({t["worker"] for t in trials}) == 2  # both processes ran trials from the one journal file
    # each worker samples its own stream: the same seed in both made every worker's trial k the same trial
    assert len({t["compile.optimizer.learning_rate"] for t in trials}) == 6
    assert (study / "study.journal").is_file()
    for t in trials:  # every trial is an ordinary run with its parameters applied
        run = load_config(f"{t['run_dir']}/config.yaml").to_dict()
        assert run["model"]["layers"][0]["units"] == int(t["model.layers.0.units"])
        assert run["compile"]["optimizer"]["learning_rate"] == pytest.approx(
            float(t["compile.optimizer.learning_rate"]), rel=1e-5)  # trials.csv keeps 6 significant digits
        assert "sweep" not in run and json.loads(open(f"{t['run_dir']}/meta.json").read())["status"] == "completed"
    best = min(trials, key=lambda t: float(t["value"]))
    assert load_config(study / "best.yaml") == load_config(f"{best['run_dir']}/config.yaml")
    for png in ("optimization_history.png", "param_importances.png"):
        assert (study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best: trial" in result.stdout and "dlcli train" in result.stdout

    again = dlcli("sweep", config, "--trials", 7, "--runs-dir", runs)
    assert again.returncode == 0, again.stderr
    assert "6 of 7 trials so far" in again.stdout
    trials_after = read_trials(study)
    assert len(trials_after) == 7 and trials_after[:6] == trials


@pytest.mark.slow
def test_pruning_stops_a_clearly_worse_trial_and_a_diverged_trial_is_recorded(tmp_path):
    config = write_sweep_config(tmp_path, epochs=4, sampler="random",
                                pruner="{type: median, n_startup_trials: 2, n_warmup_steps: 0}", parameters="""\
    compile.optimizer.learning_rate: {type: categorical, choices: [0.03, 1.0e-7, 1.0e+30]}
""")
    runs = tmp_path / "runs"
    study_dir = runs / "tiny-sweep"
    study_dir.mkdir(parents=True)
    # The same study, created through Optuna's own API on the journal file: two good trials first, then one that
    # barely learns (pruned after its first epoch), then one whose loss overflows (failed, the study goes on).
    storage = journal(study_dir)
    study = optuna.create_study(storage=storage, study_name="tiny-sweep", direction="minimize")
    for lr in (0.03, 0.03, 1e-7, 1e30):
        study.enqueue_trial({"compile.optimizer.learning_rate": lr})
    result = dlcli("sweep", config, "--runs-dir", runs)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = read_trials(study_dir)
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"]
    pruned, failed = trials[2], trials[3]
    assert pruned["reason"] == "pruned after epoch 1"
    assert json.loads(open(f"{pruned['run_dir']}/meta.json").read())["status"] == "pruned"
    assert len(open(f"{pruned['run_dir']}/history.csv").read().splitlines()) == 2  # header + one epoch of four
    assert "diverged" in failed["reason"] and failed["run_dir"]
    assert "trial 3 fail" in result.stdout
    listed = dlcli("runs", "list", "--runs-dir", runs)  # trials are runs too, shown under their study
    assert listed.returncode == 0 and "4 runs in" in listed.stdout and "4 of them sweep trials" in listed.stdout
    assert f"tiny-sweep/{Path(pruned['run_dir']).name}" in listed.stdout


@pytest.mark.slow
def test_ctrl_c_prints_the_table_and_the_study_continues(tmp_path):
    config = write_sweep_config(tmp_path, epochs=500)  # trials that cannot finish before the Ctrl-C
    runs = tmp_path / "runs"
    proc = start_dlcli("sweep", config, "--workers", 2, "--trials", 50, "--runs-dir", runs,
                       "--set", "train.batch_size=16")
    _wait_for_histories(runs / "tiny-sweep", 2)
    proc.send_signal(signal.SIGINT)  # to the parent only: it passes the stop on to its worker
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "study tiny-sweep: 2 trials" in out and "interrupted" in out and "Traceback" not in err
    hint = err.split("continue the study with: ")[1].strip()
    assert hint == f"dlcli sweep {config} --set train.batch_size=16 --trials 50 --workers 2 --study tiny-sweep " \
                   f"--runs-dir {runs}"  # every option that shaped the study, not only where it lives
    trials = read_trials(runs / "tiny-sweep")
    assert [(t["state"], t["reason"]) for t in trials] == [("FAIL", "interrupted")] * 2
    for t in trials:  # each trial's run directory says so too, with a checkpoint to resume it by hand
        assert json.loads(open(f"{t['run_dir']}/meta.json").read())["status"] == "interrupted"
    changed = dlcli("sweep", config, "--trials", 1, "--runs-dir", runs, "--set", "train.epochs=1")
    assert changed.returncode == 2 and "  train.epochs: 500 -> 1\n" in changed.stderr  # other data: refused
    assert "train.batch_size: 16 -> 32" in changed.stderr
    again = start_dlcli(*shlex.split(hint)[1:])  # the hint itself, as printed
    _wait_for_histories(runs / "tiny-sweep", 3)
    again.send_signal(signal.SIGINT)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 130, out + err
    assert "0 of 50 trials so far" in out  # interrupted trials do not count
    states = [t["state"] for t in read_trials(runs / "tiny-sweep")]
    assert len(states) in (3, 4) and set(states) == {"FAIL"}  # trials 2 (and 3, the worker's) ran: 0 counted


def journal(study_dir: Path):
    """The study's journal file, opened as dlcli sweep opens it."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(study_dir /
                                                                                         "study.journal")))


def _wait_for_histories(study_dir: Path, count: int, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(study_dir.glob("trial-*/history.csv"))) < count:
        time.sleep(0.2)


@pytest.mark.slow
def test_workers_on_two_machines_share_a_postgresql_study(tmp_path, postgres_url):  # noqa: F811
    config = write_sweep_config(tmp_path)
    name = f"pg-{time.time_ns()}"
    machines = [start_dlcli("sweep", config, "--storage", postgres_url, "--study", name, "--trials", 4,
                            "--runs-dir", tmp_path / f"machine{i}") for i in (1, 2)]
    outputs = [m.communicate(timeout=300) for m in machines]
    for m, (out, err) in zip(machines, outputs):
        assert m.returncode == 0, out + err
        assert "warning" not in err.lower()  # Optuna's ExperimentalWarning for the heartbeat included
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    # each machine's report lists the whole study; its own trials' run directories are on its disk
    for i in (1, 2):
        rows = read_trials(tmp_path / f"machine{i}" / name)
        assert len(rows) == 4 and {r["state"] for r in rows} <= {"COMPLETE", "RUNNING"}
        mine = [r for r in rows if f"machine{i}" in r["run_dir"]]
        assert mine and all(Path(r["run_dir"], "history.csv").is_file() for r in mine)


@pytest.mark.slow
def test_missing_optuna_and_an_unreachable_database_are_one_line_each(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dlcli.cli import app

    config = write_sweep_config(tmp_path)
    bad = CliRunner().invoke(app, ["sweep", str(config), "--storage", "postgresql://dlcli@127.0.0.1:1/none",
                                   "--runs-dir", str(tmp_path / "runs")])
    assert bad.exit_code == 1 and bad.output.startswith("error: cannot open the study storage postgresql://")
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    monkeypatch.setitem(sys.modules, "MySQLdb", None)  # SQLAlchemy's default MySQL driver, as if not installed
    mysql = CliRunner().invoke(app, ["sweep", str(config), "--storage", "mysql://dlcli@127.0.0.1:1/none",
                                     "--runs-dir", str(tmp_path / "runs")])
    assert mysql.exit_code == 2 and mysql.output == "error: the storage mysql://dlcli@127.0.0.1:1/none needs a " \
                                                    "database driver (MySQLdb): pip install mysqlclient\n"
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    missing = CliRunner().invoke(app, ["sweep", str(config), "--runs-dir", str(tmp_path / "runs")])
    assert missing.exit_code == 1 and missing.output == "error: dlcli sweep needs optuna: pip install 'dlcli[sweep]'\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_worker_starts_no_trial_while_another_holds_the_claim(tmp_path):
    """Counting the study's trials and starting one is a critical section: two workers that both counted target - 1
    would otherwise both start one (seen as 5 trials of 4 with two machines on PostgreSQL)."""
    import threading

    from dlcli.sweep import Claim, prepare, work

    sweep = prepare(write_sweep_config(tmp_path), ["train.epochs=1"], trials=1, runs_dir=tmp_path / "runs")
    sweep.dir.mkdir(parents=True)
    other = Claim(sweep)
    other.acquire()
    worker = threading.Thread(target=work, args=(sweep,))
    worker.start()
    time.sleep(2)
    assert len(sweep.load_study().trials) == 0  # waiting for the claim, not counting
    other.release()
    worker.join(timeout=120)
    other.close()
    assert [t.state.name for t in sweep.load_study().trials] == ["COMPLETE"]


def test_a_trial_trains_the_config_resolved_when_the_sweep_started(tmp_path):
    """The config is resolved once: a trial overrides that, so editing the file during a study changes no trial."""
    from dlcli import run_files
    from dlcli.sweep import prepare, work
    from dlcli.yaml_lines import load_yaml

    config = write_sweep_config(tmp_path)
    sweep = prepare(config, ["train.epochs=1"], trials=1, runs_dir=tmp_path / "runs")
    sweep.dir.mkdir(parents=True)
    config.write_text(config.read_text().replace("epochs: 2", "epochs: 3").replace("units: 3", "units: 5"))
    work(sweep)
    trial = sweep.load_study().trials[0]
    trained = load_yaml(run_files.RunDir(trial.user_attrs["run_dir"]).config.read_text())
    assert trained["train"]["epochs"] == 1 and trained["model"]["layers"][1]["units"] == 3
    assert trained["model"]["layers"][0]["units"] == trial.params["model.layers.0.units"]


@pytest.mark.slow
def test_a_changed_metric_direction_or_base_config_is_refused_with_the_diff(tmp_path):
    config = write_sweep_config(tmp_path, epochs=1)
    runs = tmp_path / "runs"
    first = dlcli("sweep", config, "--trials", 1, "--runs-dir", runs)
    assert first.returncode == 0, first.stderr
    record = optuna.load_study(study_name="tiny-sweep", storage=journal(runs / "tiny-sweep")).user_attrs["dlcli"]
    assert record["metric"] == "val_loss" and record["direction"] == "minimize"
    assert record["config"]["train"]["epochs"] == 1 and record["config_fingerprint"].startswith("sha256:")
    metric = dlcli("sweep", config, "--trials", 2, "--runs-dir", runs, "--set", "sweep.metric=val_accuracy")
    assert metric.returncode == 2 and "Traceback" not in metric.stderr
    assert "  sweep.metric: 'val_loss' -> 'val_accuracy'\n  sweep.direction: 'minimize' -> 'maximize'\n" \
        in metric.stderr
    direction = dlcli("sweep", config, "--trials", 2, "--runs-dir", runs, "--set", "sweep.direction=maximize")
    assert direction.returncode == 2 and "  sweep.direction: 'minimize' -> 'maximize'\n" in direction.stderr
    data = dlcli("sweep", config, "--trials", 2, "--runs-dir", runs, "--set", "data.limit=100")
    assert data.returncode == 2 and "  data.limit: None -> 100\n" in data.stderr
    assert len(read_trials(runs / "tiny-sweep")) == 1  # nothing ran
    same = dlcli("sweep", config, "--trials", 2, "--runs-dir", runs, "--set", "sweep.pruner=median",
                 "--set", "compile.optimizer.learning_rate=0.5")  # a searched value's default: never trained with
    assert same.returncode == 0, same.stderr  # the search itself may change: the trials stay comparable
    assert "1 of 2 trials so far" in same.stdout and len(read_trials(runs / "tiny-sweep")) == 2
    over = dlcli("sweep", config, "--trials", 1, "--runs-dir", runs)
    assert over.returncode == 0 and "2 trials already (target 1): nothing to run" in over.stdout  # not "2 of 1"
    assert len(read_trials(runs / "tiny-sweep")) == 2


@pytest.mark.slow
def test_a_study_made_with_another_direction_through_optuna_is_refused(tmp_path):
    config = write_sweep_config(tmp_path)
    study_dir = tmp_path / "runs" / "tiny-sweep"
    study_dir.mkdir(parents=True)
    optuna.create_study(storage=journal(study_dir), study_name="tiny-sweep", direction="maximize")
    result = dlcli("sweep", config, "--runs-dir", tmp_path / "runs")
    assert result.returncode == 2 and "  sweep.direction: 'maximize' -> 'minimize'\n" in result.stderr


@pytest.mark.slow
def test_a_metric_missing_from_the_epoch_logs_stops_every_worker_at_once(tmp_path):
    config = write_sweep_config(tmp_path, epochs=50)
    runs = tmp_path / "runs"
    result = dlcli("sweep", config, "--workers", 2, "--trials", 8, "--runs-dir", runs,
                   "--set", "train.validation_split=0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: sweep.metric 'val_loss' is not in the epoch logs (set "
                                    "train.validation_split for val_* values); available: loss, accuracy")
    assert len(result.stderr.strip().splitlines()) == 1 and "study tiny-sweep:" not in result.stdout
    for history in (runs / "tiny-sweep").glob("trial-*/history.csv"):
        assert len(history.read_text().splitlines()) <= 2  # stopped at its first epoch, not after 50
    # the study had no finished trial: it is gone, so the fixed config starts it afresh instead of being refused
    assert optuna.get_all_study_names(journal(runs / "tiny-sweep")) == []
    fixed = dlcli("sweep", config, "--trials", 1, "--runs-dir", runs, "--set", "train.epochs=1")
    assert fixed.returncode == 0, fixed.stderr


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_recorded_as_failed_with_a_notice(tmp_path):
    config = write_sweep_config(tmp_path, epochs=60)
    runs = tmp_path / "runs"
    proc = start_dlcli("sweep", config, "--workers", 2, "--trials", 2, "--runs-dir", runs)
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline:  # the extra worker's trial, once it has trained an epoch
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name="tiny-sweep", storage=journal(runs / "tiny-sweep")).trials
        except (KeyError, ValueError, OSError):
            continue
        for t in trials:
            pid = int(t.user_attrs.get("worker", ":0").rpartition(":")[2])
            if t.state.name == "RUNNING" and pid not in (0, proc.pid) and \
                    list(runs.glob(f"tiny-sweep/trial-{t.number:03d}-*/history.csv")):
                victim = (t.number, pid)
    assert victim is not None
    os.kill(victim[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert f"notice: worker process {victim[1]} was killed by SIGKILL" in err and "Traceback" not in err
    trials = read_trials(runs / "tiny-sweep")
    killed = trials[victim[0]]
    assert killed["state"] == "FAIL" and killed["reason"].startswith("its worker process died")
    assert json.loads(Path(killed["run_dir"], "meta.json").read_text())["status"] == "failed"
    # not counted: another trial took its place, and none is left running
    assert sorted(t["state"] for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"], out + err


@pytest.mark.slow
def test_each_trial_value_is_its_best_epoch_not_its_last(tmp_path):
    """A learning rate whose val_loss goes down, then up (epochs 3 -> 6 here): a trial value read from the last
    epoch, or from the wrong end of the column, fails this."""
    config = write_sweep_config(tmp_path, epochs=6, sampler="random", parameters="""\
    compile.optimizer.learning_rate: {type: categorical, choices: [0.3]}
""")
    result = dlcli("sweep", config, "--trials", 1, "--runs-dir", tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    (trial,) = read_trials(tmp_path / "runs" / "tiny-sweep")
    column = [float(r["val_loss"]) for r in csv.DictReader(open(Path(trial["run_dir"], "history.csv")))]
    assert column.index(min(column)) < len(column) - 1 and max(column) > min(column)  # the test can tell them apart
    assert float(trial["value"]) == pytest.approx(min(column), rel=1e-5)


def test_bad_runs_dir_non_finite_ranges_and_a_full_disk_are_one_line_each(tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    from dlcli import run_files
    from dlcli.cli import app

    config = write_sweep_config(tmp_path, epochs=1)
    not_dir = CliRunner().invoke(app, ["sweep", str(config), "--runs-dir", str(config)])
    assert not_dir.exit_code == 2 and not_dir.output == f"error: cannot create the study directory {config}/" \
                                                         f"tiny-sweep: Not a directory (see --runs-dir)\n"
    nan = tmp_path / "nan.yaml"
    nan.write_text(config.read_text().replace("low: 0.003, high: 0.03, log: true", "low: .nan, high: .inf"))
    bad = CliRunner().invoke(app, ["sweep", str(nan), "--runs-dir", str(tmp_path / "runs")])
    assert bad.exit_code == 2 and f"{nan}:21: sweep.parameters.compile.optimizer.learning_rate: low, high and " \
                                  f"step must be finite numbers; found low nan and high inf" in bad.output

    uneven = tmp_path / "uneven.yaml"
    uneven.write_text(config.read_text().replace("low: 0.003, high: 0.03, log: true", "low: 0.001, high: 0.01, "
                                                                                      "step: 0.004"))
    bad = CliRunner().invoke(app, ["sweep", str(uneven), "--runs-dir", str(tmp_path / "runs")])
    assert bad.exit_code == 2 and f"{uneven}:21: sweep.parameters.compile.optimizer.learning_rate: high - low " \
                                  f"(0.009) is not a multiple of step (0.004); the last value reached would be " \
                                  f"0.009: make high 0.009" in bad.output  # not Optuna's warning in every worker

    def full(files, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(files.train_log))

    monkeypatch.setattr(run_files.RunDir, "append_log", full)  # train.log, the first write a trial appends to
    disk = CliRunner().invoke(app, ["sweep", str(config), "--trials", 3, "--runs-dir", str(tmp_path / "runs")])
    assert disk.exit_code == 1 and "Traceback" not in disk.output
    assert disk.output.splitlines()[-1].startswith("error: cannot write ") and \
        disk.output.splitlines()[-1].endswith("train.log: No space left on device")
    assert len(list((tmp_path / "runs" / "tiny-sweep").glob("trial-*"))) == 1  # stopped at the first trial


@pytest.mark.slow
def test_a_kfold_trial_reports_the_mean_of_its_folds_to_the_pruner_after_each_fold(tmp_path):
    """Epoch e of fold 2 is not comparable with epoch e of fold 1, and Optuna keeps only a step's first report: the
    pruner used to see fold 1 alone. Step k-1 is now the mean of the first k folds' best values."""
    config = write_sweep_config(tmp_path, epochs=2)
    runs = tmp_path / "runs"
    result = dlcli("sweep", config, "--trials", 1, "--runs-dir", runs, "--set", "train.kfold=3",
                   "--set", "train.validation_split=0")
    assert result.returncode == 0, result.stderr
    assert "trial 0 fold 3 epoch 2/2: val_loss " in result.stdout  # a line per epoch while the trial runs
    (row,) = read_trials(runs / "tiny-sweep")
    bests = [min(float(r["val_loss"]) for r in csv.DictReader(open(Path(row["run_dir"], "folds", str(k),
                                                                        "history.csv")))) for k in (1, 2, 3)]
    (trial,) = optuna.load_study(study_name="tiny-sweep", storage=journal(runs / "tiny-sweep")).trials
    assert sorted(trial.intermediate_values) == [0, 1, 2]
    for k in range(3):
        assert trial.intermediate_values[k] == pytest.approx(sum(bests[:k + 1]) / (k + 1), rel=1e-5)


@pytest.mark.slow
def test_workers_logging_to_mlflow_print_no_mlflow_info_and_no_traceback(tmp_path):
    """Two workers creating the default MLflow store (mlruns/mlflow.db) at once raced on its migrations; MLflow's
    INFO lines went to the sweep's output."""
    pytest.importorskip("mlflow")
    config = write_sweep_config(tmp_path, epochs=1)
    result = dlcli("sweep", config, "--trials", 2, "--workers", 2, "--runs-dir", tmp_path / "runs",
                   "--set", "train.callbacks=[{type: MLflow, log_artifacts: false}]", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "INFO" not in result.stdout + result.stderr and result.stderr == ""
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()


def test_a_run_stopped_before_its_first_epoch_still_has_history_csv_and_train_log(tmp_path):
    from dlcli.callbacks import Callback
    from dlcli.experiment import train

    class StopAtOnce(Callback):  # what Ctrl-C during a trial's first epoch does
        def on_run_begin(self, run):
            run.stop("interrupted")

    run = train(write_sweep_config(tmp_path), ["sweep=null"], runs_dir=tmp_path / "runs", callbacks=[StopAtOnce()])
    assert run.status == "interrupted"
    assert (run.dir / "history.csv").read_text() == "epoch\n"
    assert (run.dir / "train.log").read_text() == "interrupted before the first epoch ended\n"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test's own ask(), as the lost machine's
def test_a_trial_whose_worker_elsewhere_stopped_beating_is_failed_and_replaced(tmp_path, postgres_url):  # noqa: F811
    """On a database shared by machines a dead worker's pid tells nothing: Optuna's heartbeat does."""
    from dlcli import sweep as sweeps
    from dlcli.sweep import search

    plan = sweeps.prepare(write_sweep_config(tmp_path), ["train.epochs=1"], trials=1, storage=postgres_url,
                          study=f"beat-{time.time_ns()}", runs_dir=tmp_path / "runs")
    beat, search.HEARTBEAT_SECONDS = search.HEARTBEAT_SECONDS, 1
    try:
        study = plan.load_study()
        lost = study.ask()  # a trial another machine started, then went silent
        study._storage.set_trial_user_attr(lost._trial_id, "worker", "elsewhere:1")
        study._storage.record_heartbeat(lost._trial_id)
        time.sleep(search.GRACE_BEATS + 1.5)
        sweeps.work(plan)
    finally:
        search.HEARTBEAT_SECONDS = beat
    trials = plan.load_study().trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # not counted: the new trial took its place
    assert trials[0].user_attrs["reason"] == f"its worker process died (elsewhere:1): no heartbeat for " \
                                             f"{search.GRACE_BEATS} s"
