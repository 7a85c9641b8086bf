"""dlcli sweep end to end, as separate processes: workers sharing one journal file, a study continued, pruning, a
diverged trial recorded as failed, Ctrl-C, and workers on "two machines" sharing a real PostgreSQL server."""
import json
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


def test_two_workers_share_one_journal_and_a_rerun_continues_the_study(tmp_path):
    config = write_sweep_config(tmp_path)
    runs = tmp_path / "runs"
    result = dlcli("sweep", config, "--workers", 2, "--trials", 6, "--runs-dir", runs)
    assert result.returncode == 0, result.stdout + result.stderr
    study = runs / "tiny-sweep"
    trials = read_trials(study)
    assert [t["state"] for t in trials] == ["COMPLETE"] * 6
    assert len({t["worker"] for t in trials}) == 2  # both processes ran trials from the one journal file
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
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(study_dir / "study.journal")))
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


def test_ctrl_c_prints_the_table_and_the_study_continues(tmp_path):
    config = write_sweep_config(tmp_path, epochs=500)  # trials that cannot finish before the Ctrl-C
    runs = tmp_path / "runs"
    proc = start_dlcli("sweep", config, "--workers", 2, "--trials", 50, "--runs-dir", runs)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((runs / "tiny-sweep").glob("trial-*/history.csv"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # to the parent only: it passes the stop on to its worker
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "study tiny-sweep: 2 trials" in out and "interrupted" in out and "Traceback" not in err
    assert "dlcli sweep" in err and "--study tiny-sweep" in err
    trials = read_trials(runs / "tiny-sweep")
    assert [(t["state"], t["reason"]) for t in trials] == [("FAIL", "interrupted")] * 2
    for t in trials:  # each trial's run directory says so too, with a checkpoint to resume it by hand
        assert json.loads(open(f"{t['run_dir']}/meta.json").read())["status"] == "interrupted"
    again = dlcli("sweep", config, "--trials", 1, "--runs-dir", runs, "--set", "train.epochs=1")
    assert again.returncode == 0, again.stderr
    assert "0 of 1 trials so far" in again.stdout  # interrupted trials do not count
    assert [t["state"] for t in read_trials(runs / "tiny-sweep")] == ["FAIL", "FAIL", "COMPLETE"]


def test_workers_on_two_machines_share_a_postgresql_study(tmp_path, postgres_url):  # noqa: F811
    config = write_sweep_config(tmp_path)
    name = f"pg-{time.time_ns()}"
    machines = [start_dlcli("sweep", config, "--storage", postgres_url, "--study", name, "--trials", 4,
                            "--runs-dir", tmp_path / f"machine{i}") for i in (1, 2)]
    outputs = [m.communicate(timeout=300) for m in machines]
    for m, (out, err) in zip(machines, outputs):
        assert m.returncode == 0, out + err
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    # each machine's report lists the whole study; its own trials' run directories are on its disk
    for i in (1, 2):
        rows = read_trials(tmp_path / f"machine{i}" / name)
        assert len(rows) == 4 and {r["state"] for r in rows} <= {"COMPLETE", "RUNNING"}
        mine = [r for r in rows if f"machine{i}" in r["run_dir"]]
        assert mine and all(Path(r["run_dir"], "history.csv").is_file() for r in mine)


def test_missing_optuna_and_an_unreachable_database_are_one_line_each(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dlcli.cli import app

    config = write_sweep_config(tmp_path)
    bad = CliRunner().invoke(app, ["sweep", str(config), "--storage", "postgresql://dlcli@127.0.0.1:1/none",
                                   "--runs-dir", str(tmp_path / "runs")])
    assert bad.exit_code == 1 and bad.output.startswith("error: cannot open the study storage postgresql://")
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    missing = CliRunner().invoke(app, ["sweep", str(config), "--runs-dir", str(tmp_path / "runs")])
    assert missing.exit_code == 2 and missing.output == "error: dlcli sweep needs Optuna: pip install 'dlcli[sweep]'\n"
    assert not (tmp_path / "runs").exists()


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
