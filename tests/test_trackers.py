"""TensorBoard and MLflow callbacks on a real run: the event files read back record by record, the MLflow store read
back through MLflow's client; a missing extra fails with the one line that installs it."""
import struct
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import dlcli
from dlcli.cli import app
from tests.runs_fixture import class_config, write_class_npz, write_yaml


def write_config(tmp_path, callback: dict):
    data = write_class_npz(tmp_path / "data.npz", 100, 6, test=20, seed=1, threshold=0.8)
    config = class_config(data, 6, name="tracked", seed=2)
    config["model"]["layers"][0]["name"], config["model"]["layers"][1]["name"] = "hidden", "out"
    config["train"]["callbacks"] = [callback]
    return write_yaml(tmp_path / "tracked.yaml", config)


def read_events(folder):
    """Every Event in a directory's TensorBoard event files (TFRecord framing: length, CRC, payload, CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def scalars(events) -> dict:
    out = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def test_tensorboard_writes_epoch_and_batch_scalars_histograms_and_the_model(tmp_path):
    config = write_config(tmp_path, {"type": "TensorBoard", "histogram_freq": 1, "update_freq": 2})
    run = dlcli.train(config, runs_dir=tmp_path / "runs")
    train_events = read_events(run.dir / "tensorboard" / "train")
    train, validation = scalars(train_events), scalars(read_events(run.dir / "tensorboard" / "validation"))
    assert [s for s, _ in train["epoch_loss"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in train["epoch_loss"]], [r["loss"] for r in run.history], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in validation["epoch_accuracy"]],
                               [r["val_accuracy"] for r in run.history], rtol=1e-6)
    assert [v for _, v in train["epoch_learning_rate"]] == pytest.approx([0.01] * 3)
    # 60 training samples in batches of 16 = 4 batches per epoch: batch scalars after batches 2 and 4
    assert [s for s, _ in train["batch_loss"]] == [2, 4, 6, 8, 10, 12]
    histograms = {(v.tag, e.step) for e in train_events for v in e.summary.value if v.HasField("histo")}
    assert {tag for tag, _ in histograms} == {"hidden/kernel", "hidden/bias", "out/kernel", "out/bias"}
    assert {step for _, step in histograms} == {0, 1, 2}
    texts = [v.tensor.string_val[0].decode() for e in train_events for v in e.summary.value if v.tag.startswith("model")]
    assert texts and "hidden" in texts[0] and "Dense" in texts[0]


@pytest.mark.slow
def test_mlflow_logs_params_metrics_artifacts_into_a_local_mlruns(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = write_config(tmp_path, {"type": "MLflow"})
    run = dlcli.train(config, ["train.epochs=2"], runs_dir=tmp_path / "runs")
    client = MlflowClient(tracking_uri="sqlite:///mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("tracked")
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == run.dir.name and logged.info.status == "FINISHED"
    assert logged.data.tags["dlcli.status"] == "completed"
    params = logged.data.params
    assert params["compile.optimizer.learning_rate"] == "0.01" and params["model.layers.1.units"] == "3"
    history = client.get_metric_history(logged.info.run_id, "val_loss")
    assert [m.step for m in history] == [0, 1]
    np.testing.assert_allclose([m.value for m in history], [r["val_loss"] for r in run.history])
    artifacts = {f.path for f in client.list_artifacts(logged.info.run_id)}
    assert {"config.yaml", "history.csv", "meta.json", "curves.png", "weights"} <= artifacts
    assert "checkpoint" not in artifacts
    assert (tmp_path / "mlruns").is_dir()


def test_a_missing_tracking_extra_is_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed: importing it raises ImportError
    config = write_config(tmp_path, {"type": "TensorBoard"})
    result = CliRunner().invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 1  # as every missing extra: the config is fine, the environment lacks a package
    assert "the TensorBoard callback needs tensorboardX: pip install 'dlcli[tracking]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # refused before the run directory exists: no run left "running"
