"""dlcli.train, the library entry point behind `dlcli train`: a run from Python, stopped by a callback, resumed,
fine-tuned, and byte-identical to the same run started from the CLI."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import dlcli
from dlcli import run_files
from dlcli.callbacks import Callback
from dlcli.cli import app
from dlcli.errors import DlcliError
from tests.runs_fixture import class_config, write_class_npz, write_yaml


@pytest.fixture
def config(tmp_path):
    data = write_class_npz(tmp_path / "data.npz", 200, test=40, held_out=False)
    return write_yaml(tmp_path / "tiny.yaml", class_config(data, units=16, seed=5))


class StopAfterEpoch(Callback):
    """What a sweep's pruning callback does: look at the epoch's logs, end the run with its own status."""

    def __init__(self, epoch):
        self.epoch, self.seen = epoch, None

    def on_run_begin(self, run):
        self.run, self.seen = run, run.sizes

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            self.run.stop("pruned")


def test_train_returns_the_run_and_writes_what_the_cli_writes(config, tmp_path):
    run = dlcli.train(config, ["train.epochs=2"], runs_dir=tmp_path / "lib", name="same")
    assert run.status == "completed" and run.dir.parent == tmp_path / "lib" and run.dir.name.startswith("same-")
    assert [r["epoch"] for r in run.history] == [1, 2] and set(run.test) == {"loss", "accuracy"}
    assert run.sizes == {"train": 150, "validation": 50, "test": 40}
    result = CliRunner().invoke(app, ["train", str(config), "--set", "train.epochs=2", "--runs-dir",
                                      str(tmp_path / "cli"), "--name", "same", "-q"])
    assert result.exit_code == 0, result.output
    (cli_dir,) = (tmp_path / "cli").iterdir()
    for name in ("config.yaml", "summary.txt", "weights/best.npz", "weights/last.npz"):
        assert (cli_dir / name).read_bytes() == (run.dir / name).read_bytes(), name
    drop = [{k: v for k, v in r.items() if k != "seconds"} for r in run_files.read_history(cli_dir)]
    assert drop == [{k: v for k, v in r.items() if k != "seconds"} for r in run_files.read_history(run.dir)]


def test_a_callback_stops_the_run_and_it_resumes_to_the_same_end(config, tmp_path):
    stopper = StopAfterEpoch(1)
    run = dlcli.train(config, runs_dir=tmp_path, seed=1, callbacks=[stopper])
    assert stopper.seen == run.sizes
    assert run.status == "pruned" and run.test is None and [r["epoch"] for r in run.history] == [1]
    assert json.loads((run.dir / "meta.json").read_text())["status"] == "pruned"
    resumed = dlcli.train(run.dir, resume=True)
    assert resumed.status == "completed" and resumed.dir == run.dir and "start of epoch 2" in resumed.resumed
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    straight = dlcli.train(config, runs_dir=tmp_path / "straight", seed=1)
    assert resumed.test == straight.test
    a, b = run_files.load_npz(run.dir / "weights/last.npz"), run_files.load_npz(straight.dir / "weights/last.npz")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_with_a_new_learning_rate_and_init_from(config, tmp_path):
    first = dlcli.train(config, ["train.epochs=1"], runs_dir=tmp_path)
    with pytest.raises(DlcliError, match="pass --allow-config-change"):
        dlcli.train(config, ["train.epochs=2"], resume=first.dir)
    more = dlcli.train(config, ["train.epochs=2", "compile.optimizer.learning_rate=0.001"], resume=first.dir,
                       allow_config_change=True)
    assert more.config_changes == ["  compile.optimizer.learning_rate: 0.01 -> 0.001", "  train.epochs: 1 -> 2"]
    assert [r["learning_rate"] for r in more.history] == [0.01, 0.001]
    tuned = dlcli.train(config, ["train.epochs=1"], runs_dir=tmp_path / "tuned", init_from=first.dir)
    assert tuned.init_from == first.dir / "weights" / "best.npz" and tuned.dir != first.dir
    with pytest.raises(DlcliError, match="give one of them") as e:
        dlcli.train(config, resume=first.dir, init_from=first.dir)
    assert e.value.exit_code == 2


def test_multi_optimizer_trains_each_layer_with_its_own_and_resumes(config, tmp_path):
    """The first Dense keeps the default SGD at rate 0 (its weights stay as initialised), the second takes Adam by
    its path; stopped after epoch 1 and resumed, the run ends where the straight run does (inner state saved)."""
    multi = ['compile.optimizer={type: MultiOptimizer, optimizer_map: {default_optimizer: {type: sgd, '
             'learning_rate: 0.0}, optimizer_map: {"dense_1/.*": {type: adam, learning_rate: 0.01}}}}']
    frozen = dlcli.train(config, ["compile.optimizer={type: sgd, learning_rate: 0.0}"], runs_dir=tmp_path / "frozen")
    straight = dlcli.train(config, multi, runs_dir=tmp_path / "straight")
    stopped = dlcli.train(config, multi, runs_dir=tmp_path / "stopped", callbacks=[StopAfterEpoch(1)])
    resumed = dlcli.train(stopped.dir, resume=True)
    weights = [run_files.load_npz(r.dir / "weights/last.npz") for r in (frozen, straight, resumed)]
    first, second = [k for k in weights[0] if "dense_1" not in k], [k for k in weights[0] if "dense_1" in k]
    assert first and second
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in first)
    assert not any(np.array_equal(weights[0][k], weights[1][k]) for k in second)
    assert all(np.array_equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert straight.history[-1]["learning_rate"] == 0.0  # the default optimizer's


def test_use_ema_last_weights_are_the_averages_the_run_ends_with(config, tmp_path):
    """Keras ends a fit with use_ema by making the weights their averages (finalize_variable_values), after its
    ModelCheckpoint saved the last epoch's: weights/last.npz held those raw weights, so `dlcli evaluate --weights
    last` did not measure what the run's test metrics did (fails before). last.npz is now the model as the fit
    leaves it; the checkpoint keeps the raw weights (and the averages as optimizer state), from which --resume
    continues exactly."""
    from dlcli import checkpoint
    from dlcli.experiment import evaluation_report

    ema = ["compile.optimizer={type: adam, learning_rate: 0.01, use_ema: true, ema_momentum: 0.9}"]
    run = dlcli.train(config, ema, runs_dir=tmp_path / "runs")
    with np.load(run.dir / "weights" / "last.npz") as f:
        last = {k: f[k] for k in f.files}
    raw = checkpoint.load(run.dir)["arrays"]
    for p in run.model.weights:
        np.testing.assert_array_equal(last[f"weights/{p.path}"], p.value)
        assert not np.array_equal(raw[f"weights/{p.path}"], p.value)
    report = evaluation_report(run.dir, weights="last")
    assert report["metrics"] == pytest.approx(run.test, rel=1e-6)
