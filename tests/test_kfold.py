"""K-fold validation: seeded stratified folds, one run directory with every fold's run and the mean/spread per
epoch, and --resume continuing the fold it stopped in (ending identical to an uninterrupted run)."""
import io
import json
import sys

import numpy as np
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

import dlcli
from dlcli import run_files
from dlcli.callbacks import Callback
from dlcli.cli import app
from dlcli.commands.train_output import print_kfold, report_interrupted
from dlcli.config import parse_config
from dlcli.data.split import kfold_indices
from dlcli.errors import ConfigError
from dlcli.yaml_lines import load_yaml
from tests.runs_fixture import class_config, write_class_npz, write_yaml

@pytest.fixture
def config(tmp_path):
    return _config(tmp_path, seed=4)


def _config(tmp_path, seed, **train):
    data = write_class_npz(tmp_path / "data.npz", 120, 6, test=30, seed=3, threshold=0.7)
    config = class_config(data, 6, name="folds", seed=seed, train=kfold_train(**train))
    return write_yaml(tmp_path / "folds.yaml", config)


def kfold_train(**train) -> dict:
    return {"epochs": 3, "batch_size": 16, "kfold": 3, **train}


def test_folds_partition_the_samples_seeded_and_stratified():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    folds = kfold_indices(y, 5, np.random.default_rng(0), stratify=True)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    assert [len(f) for f in folds] == [20] * 5
    for f in folds:  # every fold keeps the 50/30/20 proportions exactly
        assert np.bincount(y[f]).tolist() == [10, 6, 4]
    again = kfold_indices(y, 5, np.random.default_rng(0), stratify=True)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))
    plain = kfold_indices(np.zeros(10), 3, np.random.default_rng(1))
    assert sorted(len(f) for f in plain) == [3, 3, 4]
    with pytest.raises(ConfigError, match="between 2 and the number of training samples"):
        kfold_indices(np.zeros(3), 4, np.random.default_rng(0))


def test_kfold_run_keeps_each_fold_and_the_mean_and_spread_per_epoch(config, tmp_path):
    run = dlcli.train(config, runs_dir=tmp_path / "runs")
    assert run.status == "completed" and run.dir.parent == tmp_path / "runs"
    folds = [run_files.read_history(run.dir / "folds" / str(i)) for i in (1, 2, 3)]
    assert all(len(h) == 3 for h in folds)
    sizes = [json.loads((run.dir / "folds" / str(i) / "meta.json").read_text())["sizes"] for i in (1, 2, 3)]
    assert [s["validation"] for s in sizes] == [30, 30, 30] and all(s["train"] == 60 for s in sizes)
    val = np.array([[r["val_loss"] for r in h] for h in folds])
    mean_rows = run_files.read_history(run.dir)
    np.testing.assert_allclose([r["val_loss"] for r in mean_rows], val.mean(0), rtol=1e-5)
    spread = _read_csv(run.dir / "kfold.csv")
    np.testing.assert_allclose([float(r["val_loss_std"]) for r in spread], val.std(0), atol=1e-5)  # CSVs keep 6 digits
    assert "val_accuracy_std" in spread[0]
    assert (run.dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((run.dir / "meta.json").read_text())
    assert meta["kfold"] == 3 and meta["folds"] == ["completed"] * 3 and meta["status"] == "completed"
    assert meta["data_dirs"] and meta["config_fingerprint"].startswith("sha256:")  # where evaluate looks for data
    assert meta["best_epoch"] == 1 + int(np.argmin(val.mean(0)))
    assert set(meta["test"]) == {"loss", "accuracy"} and run.test == meta["test"]
    fold_config = load_yaml((run.dir / "folds" / "1" / "config.yaml").read_text())
    assert "kfold" not in fold_config["train"]  # a fold's config.yaml trains one model, as any run's does


def _read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class StopInFold(Callback):
    """Ends the run (as Ctrl-C does) in the given fold after its first epoch."""

    def __init__(self, fold):
        self.fold = fold

    def on_run_begin(self, run):
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        if self.run.dir.name == str(self.fold) and epoch == 0:
            self.run.stop("interrupted")


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, 6))])  # 5 more
def test_resume_continues_the_fold_it_stopped_in(seed, tmp_path):
    """Every file ends identical to the uninterrupted run's, whatever the seed: the mean rows of folds finished before
    the resume and after it come from the same place (each fold's history.csv)."""
    config = _config(tmp_path, seed)
    whole = dlcli.train(config, runs_dir=tmp_path / "whole")
    stopped = dlcli.train(config, runs_dir=tmp_path / "stopped", callbacks=[StopInFold(2)])
    assert stopped.status == "interrupted"
    meta = json.loads((stopped.dir / "meta.json").read_text())
    assert meta["folds"] == ["completed", "interrupted"] and meta["status"] == "interrupted"
    assert not (stopped.dir / "folds" / "3").exists()
    fold1 = (stopped.dir / "folds" / "1" / "weights" / "last.npz").read_bytes()
    resumed = dlcli.train(stopped.dir, resume=True)
    assert resumed.status == "completed" and resumed.dir == stopped.dir
    assert (stopped.dir / "folds" / "1" / "weights" / "last.npz").read_bytes() == fold1  # not trained again

    def no_time(rows):
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]

    for i in (1, 2, 3):  # the interrupted fold ends exactly as it would have without the stop
        assert no_time(run_files.read_history(stopped.dir / "folds" / str(i))) == \
            no_time(run_files.read_history(whole.dir / "folds" / str(i)))
        assert (stopped.dir / "folds" / str(i) / "weights" / "last.npz").read_bytes() == \
            (whole.dir / "folds" / str(i) / "weights" / "last.npz").read_bytes()
    assert no_time(run_files.read_history(stopped.dir)) == no_time(run_files.read_history(whole.dir))
    assert no_time(run_files.read_history(stopped.dir, "kfold.csv")) == \
        no_time(run_files.read_history(whole.dir, "kfold.csv"))
    assert no_time(resumed.history) == no_time(whole.history) and resumed.test == whole.test
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_an_interrupted_kfold_run_reports_only_its_finished_folds(config, tmp_path, capsys):
    """No mean table or final-model advice from partial folds; the checkpoint path is the fold's; resuming names the
    whole K-fold run (issue 28)."""
    stopped = dlcli.train(config, runs_dir=tmp_path / "runs", callbacks=[StopInFold(2)])
    out = io.StringIO()
    print_kfold(Console(file=out, width=300), stopped)
    text = out.getvalue()
    assert "3-fold validation interrupted in fold 2 of 3; finished: folds 1" in text
    assert "+-" not in text and "best mean" not in text and "--set train.epochs" not in text
    report_interrupted(stopped)
    err = capsys.readouterr().err
    checkpoint = stopped.dir / "folds" / "2" / "checkpoint" / "state.npz"
    assert checkpoint.is_file() and f"checkpoint saved in {checkpoint}" in " ".join(err.split())
    assert f"resume with: dlcli train --resume {stopped.dir}\n" in err
    # the aggregate holds the finished fold alone: what it says is true of fold 1
    assert [r["val_loss"] for r in run_files.read_history(stopped.dir)] == \
        [r["val_loss"] for r in run_files.read_history(stopped.dir / "folds" / "1")]
    resumed = CliRunner().invoke(app, ["train", "--resume", str(stopped.dir)], env={"COLUMNS": "300"})
    assert resumed.exit_code == 0, resumed.output
    banner = " ".join(resumed.output.split())
    assert f"dlcli train --resume {stopped.dir} (config {stopped.dir}/config.yaml) -> {stopped.dir}/folds/2" in banner
    assert "best mean val_loss at epoch" in banner
    again = CliRunner().invoke(app, ["train", "--resume", str(stopped.dir)])
    assert again.exit_code == 0 and "nothing to do:" in again.output
    assert "has finished (completed: all 3 folds trained)" in " ".join(again.output.split())


@pytest.mark.parametrize("change, message, code", [
    ({"kfold": 500}, "train.kfold must be between 2 and the number of training samples (90); got 500", 2),
    ({"callbacks": [{"type": "TensorBoard"}]}, "the TensorBoard callback needs tensorboardX: pip install "
                                               "'dlcli[tracking]'", 1),
])
def test_a_kfold_run_that_cannot_start_leaves_no_run_directory(tmp_path, monkeypatch, change, message, code):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if dlcli[tracking] were not installed
    config = _config(tmp_path, 4, **change)
    result = CliRunner().invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == code and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "runs").exists()


def test_plot_redraws_a_kfold_run_with_its_band(config, tmp_path):
    run = dlcli.train(config, runs_dir=tmp_path / "runs")
    band = (run.dir / "curves.png").read_bytes()
    result = CliRunner().invoke(app, ["plot", str(run.dir)])
    assert result.exit_code == 0, result.output
    assert (run.dir / "curves.png").read_bytes() == band  # the mean +- 1 std plot, not a plain overlay over it
    for command in ("evaluate", "export", "predict"):  # K models, none of them "the" model: name where they are
        args = [command, str(run.dir)] + ([str(tmp_path / "data.npz")] if command == "predict" else [])
        result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code == 2 and f"{run.dir} is a K-fold run: its models are its folds, {run.dir}/folds/N " \
            f"(N = 1, 2, 3)" in " ".join(result.output.split()), result.output


def test_kfold_run_with_one_hot_targets_stratifies_its_folds(tmp_path):
    """categorical_crossentropy's one-hot targets are class labels: the folds are stratified (each keeps the 2:1
    class ratio of the 90 samples: 20 + 10 per fold), the run trains every fold."""
    from dlcli.data.split import are_class_labels

    rng = np.random.default_rng(6)
    x = rng.normal(size=(90, 6)).astype(np.float32)
    labels = rng.permutation(np.repeat([0, 1], [60, 30]))
    x[:, 0] += 2 * labels
    np.savez(tmp_path / "data.npz", x=x, y=np.eye(2, dtype=np.float32)[labels])
    assert are_class_labels(np.eye(2)[labels]) and not are_class_labels(x[:, :2])  # floats, not one-hot
    config = class_config(tmp_path / "data.npz", 6, name="folds", seed=4, train=kfold_train())
    del config["data"]["x_test"], config["data"]["y_test"]
    config["model"]["layers"][-1]["units"], config["compile"]["loss"] = 2, "categorical_crossentropy"
    run = dlcli.train(write_yaml(tmp_path / "onehot.yaml", config), runs_dir=tmp_path / "runs")
    assert run.status == "completed"
    for i in (1, 2, 3):
        meta = json.loads((run.dir / "folds" / str(i) / "meta.json").read_text())
        assert meta["status"] == "completed" and meta["sizes"]["validation"] == 30
    folds = kfold_indices(np.eye(2)[labels], 3, np.random.default_rng([4, 3]), stratify=True)
    assert [int(labels[f].sum()) for f in folds] == [10, 10, 10]


def test_kfold_with_a_validation_split_is_a_config_error():
    text = yaml.safe_dump(class_config("d.npz", 6, train=kfold_train(validation_split=0.2)))
    line = text.splitlines().index("  kfold: 3") + 1
    with pytest.raises(ConfigError, match=rf"c.yaml:{line}: train.kfold: K-fold validation holds out each fold"):
        parse_config(text, "c.yaml")
