"""The CLI end to end: train writes a complete run directory, inspect-shapes needs no data, evaluate reads a run,
bad configs exit 2 with file:line and no traceback."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from dlcli.cli import app
from tests.conftest import require_dataset
from tests.runs_fixture import class_config, write_class_npz, write_tiny_config, write_yaml

runner = CliRunner()

@pytest.fixture()
def tiny_config(tmp_path):
    """class_config's network on 4 features: 200 training samples, 60 held out as the test split, seed 1."""
    return write_yaml(tmp_path / "tiny.yaml", class_config(write_class_npz(tmp_path / "tiny.npz", 260, 4, test=60), 4,
                                                           seed=1))


def run_dirs(root):
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_train_writes_the_run_directory_contract(tiny_config, tmp_path):
    result = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (run,) = run_dirs(tmp_path / "runs")
    assert run.name.startswith("tiny-") and str(run) in result.output
    for name in ["config.yaml", "history.csv", "summary.txt", "meta.json", "train.log", "weights/last.npz",
                 "weights/best.npz"]:
        assert (run / name).is_file(), name
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"} <= set(header)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["seed"] == 1 and meta["test"]["accuracy"] > 0.7  # majority: 0.5
    with np.load(run / "weights" / "last.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["weights/dense/bias", "weights/dense/kernel", "weights/dense_1/bias",
                                   "weights/dense_1/kernel"]


def test_resolved_config_reproduces_the_run(tiny_config, tmp_path):
    first = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "a"), "--quiet",
                                "--set", "train.epochs=2"])
    assert first.exit_code == 0, first.output
    (run_a,) = run_dirs(tmp_path / "a")
    again = runner.invoke(app, ["train", str(run_a / "config.yaml"), "--runs-dir", str(tmp_path / "b"), "--quiet"])
    assert again.exit_code == 0, again.output
    (run_b,) = run_dirs(tmp_path / "b")
    strip = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]  # drop the seconds column
    assert strip((run_a / "history.csv").read_text()) == strip((run_b / "history.csv").read_text())


def test_set_overrides_and_seed_option(tiny_config, tmp_path):
    result = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path), "--quiet",
                                 "--set", "train.epochs=1", "--set", "model.layers.0.units=5", "--seed", "7",
                                 "--name", "renamed"])
    assert result.exit_code == 0, result.output
    (run,) = run_dirs(tmp_path)
    config = (run / "config.yaml").read_text()
    assert run.name.startswith("renamed-") and "units: 5" in config and "seed: 7" in config
    assert "epochs: 1" in config


def test_inspect_shapes_needs_no_data(tiny_config, tmp_path):
    (tmp_path / "tiny.npz").unlink()
    result = runner.invoke(app, ["inspect-shapes", str(tiny_config), "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    assert "(None, 8)" in result.output and "(None, 3)" in result.output
    assert "Total params: 67" in result.output and "batch 64" in result.output


@pytest.mark.parametrize("size", ["-5", "0"])
def test_inspect_shapes_refuses_a_batch_size_below_one(tiny_config, size):
    """Was: -5 printed negative memory, 0 silently used train.batch_size (issue 28)."""
    result = runner.invoke(app, ["inspect-shapes", str(tiny_config), "--batch-size", size])
    assert result.exit_code == 2 and "Invalid value for '--batch-size': Input should be greater than or equal to 1" in \
        " ".join(result.output.split()), result.output
    assert "Memory" not in result.output


def test_inspect_shapes_graph_in_a_missing_folder_is_refused(tiny_config, tmp_path):
    result = runner.invoke(app, ["inspect-shapes", str(tiny_config), "--graph", str(tmp_path / "nowhere" / "g.md")])
    assert result.exit_code == 2 and f"the folder {tmp_path / 'nowhere'} does not exist" in result.output
    assert not (tmp_path / "nowhere").exists()


def test_inspect_shapes_reports_the_books_mlp():
    result = runner.invoke(app, ["inspect-shapes", "configs/mnist.yaml"])
    assert result.exit_code == 0, result.output
    assert "407,050" in result.output and "(None, 784)" in result.output


def test_incompatible_layers_fail_naming_the_layer(tmp_path):
    config = class_config("x.npz", 4)
    config["model"] = {"input_shape": [4, 4, 4], "layers": [{"type": "Reshape", "target_shape": [5, 5]}]}
    config = write_yaml(tmp_path / "bad.yaml", config)
    result = runner.invoke(app, ["inspect-shapes", str(config)])
    assert result.exit_code == 2
    assert "Reshape" in result.output and "Traceback" not in result.output


def test_bad_config_lists_every_error_with_lines(tmp_path):
    config = class_config("x.npz", 4)
    config["model"]["layers"][0]["type"], config["compile"]["optimizer"]["type"] = "Dens", "adamm"
    config = write_yaml(tmp_path / "bad.yaml", config)
    text = config.read_text().splitlines()
    dens, adamm = text.index("    type: Dens") + 1, text.index("    type: adamm") + 1  # 1-based line numbers
    result = runner.invoke(app, ["train", str(config)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert any(line.startswith(f"{config}:{dens}: model.layers.0.type: unknown layer 'Dens' (did you mean 'Dense'?)")
               for line in lines), result.output
    assert any(line.startswith(f"{config}:{adamm}: compile.optimizer.type: unknown optimizer 'adamm'")
               for line in lines)
    assert "Traceback" not in result.output


def test_bad_set_override_exits_2(tiny_config):
    result = runner.invoke(app, ["train", str(tiny_config), "--set", "train.epoch=1"])
    assert result.exit_code == 2 and "epochs" in result.output


def test_evaluate_writes_evaluation_json(tiny_config, tmp_path):
    assert runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path), "--quiet"]).exit_code == 0
    (run,) = run_dirs(tmp_path)
    result = runner.invoke(app, ["evaluate", str(run), "--weights", "last"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "evaluation.json").read_text())
    assert report["samples"] == 60 and len(report["confusion_matrix"]) == 3
    assert sum(map(sum, report["confusion_matrix"])) == 60
    assert "confusion matrix" in result.output
    bad = runner.invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not a dlcli run directory" in " ".join(bad.output.split())


def test_version_and_fast_help():
    from dlcli import __version__

    assert runner.invoke(app, ["--version"]).output.strip() == f"dlcli {__version__}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dlcli.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "train" in done.stdout
    # --help must not import NumPy or the engine (lazy imports); the time itself is reported, not asserted.
    probe = subprocess.run([sys.executable, "-c", "import sys, dlcli.cli; print('numpy' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False", f"dlcli.cli imports numpy at startup ({time.perf_counter() - start:.2f}s)"


@pytest.mark.slow
def test_mnist_subset_end_to_end_beats_85_percent(tmp_path):
    """Train from the CLI on the first 2,000 MNIST images; the run's own test figure is on all 10,000 test images
    (data.limit caps training only) and beats 85%, and equals the saved weights evaluated by hand."""
    require_dataset("mnist")
    from dlcli import run_files
    from dlcli.builder import build_model
    from dlcli.config import load_config
    from dlcli.data import load_dataset

    result = runner.invoke(app, ["train", "configs/mnist.yaml", "--runs-dir", str(tmp_path), "--quiet",
                                 "--set", "data.limit=2000"])
    assert result.exit_code == 0, result.output
    (run,) = run_dirs(tmp_path)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["sizes"] == {"train": 2000, "validation": 0, "test": 10000} and meta["status"] == "completed"
    model = build_model(load_config(run / "config.yaml"))
    model.load_weights_dict(run_files.load_npz(run / "weights" / "last.npz"))
    test = load_dataset({"type": "mnist"})
    accuracy = model.evaluate(test.x_test, test.y_test, batch_size=1000, return_dict=True)["accuracy"]
    assert accuracy > 0.85 and abs(meta["test"]["accuracy"] - accuracy) < 1e-6


def test_conv_on_images_without_channel_axis_hints_the_fix(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: {type: mnist}\nmodel:\n  input_shape: [28, 28]\n  layers:\n"
                      "    - {type: Conv2D, filters: 8, kernel_size: 3}\n"
                      "compile: {loss: mse}\n")
    result = runner.invoke(app, ["inspect-shapes", str(config)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Conv2D 'conv2d'" in text and "[28, 28, 1]" in text


@pytest.mark.parametrize("override,expected", [
    ("model.layers.0.units=-5", "model.layers.0.units: expected a positive integer"),
    ("model.layers.0.units=0", "model.layers.0.units: expected a positive integer"),
    ("model.layers.0.units=99999999999999999999", "model.layers.0.units: expected a positive integer"),
    ("seed=-1", "seed: expected a value >= 0, found -1"),
    ("compile.optimizer.learning_rate=-0.1", "compile.optimizer.learning_rate: expected a finite number >= 0"),
    ("train.class_weight={0: -1.0}", "train.class_weight.0: expected a value >= 0.0, found -1.0"),
    ("name=../../escape", "name: expected a plain file name"),
    ("model.input_shape=[4, -1]", "model.input_shape.1: expected a value >= 1, found -1"),
])
def test_impossible_values_are_config_errors(tiny_config, tmp_path, override, expected):
    result = runner.invoke(app, ["train", str(tiny_config), "--set", override, "--runs-dir", str(tmp_path / "r")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert f"--set {override}: {expected}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_run_name_option_cannot_escape_the_runs_dir(tiny_config, tmp_path):
    for option in (["--name", "../../x"], ["--name", "a/b"], ["--name", ".."]):
        result = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "r"), *option])
        assert result.exit_code == 2 and f"{' '.join(option)}: name: expected a plain file name" in \
            " ".join(result.output.split()), result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "r").exists()


def test_a_bad_seed_option_is_named_as_given(tiny_config, tmp_path):
    result = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "r"), "--seed", "-1"],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "--seed -1: seed: expected a value >= 0, found -1" in result.output
    assert not (tmp_path / "r").exists()


def test_convolution_sizes_in_a_file_name_the_line(tmp_path):
    config = tmp_path / "conv.yaml"
    config.write_text("data: {type: mnist}\nmodel:\n  input_shape: [28, 28, 1]\n  layers:\n"
                      "    - {type: Conv2D, filters: -3, kernel_size: [3, 0]}\n    - {type: Flatten}\n"
                      "compile: {loss: mse}\n")
    result = runner.invoke(app, ["inspect-shapes", str(config)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert f"{config}:5: model.layers.0.filters: expected a positive integer" in result.output
    assert f"{config}:5: model.layers.0.kernel_size: expected a positive integer" in result.output


def test_a_model_too_big_for_memory_is_refused_before_allocating(tiny_config, tmp_path, monkeypatch):
    result = runner.invoke(app, ["inspect-shapes", str(tiny_config), "--set", "model.layers.0.units=2147483647"],
                           env={"COLUMNS": "300"})  # this machine's real memory: 96 GiB at the float64 draw
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "layer 'dense': weight 'kernel' of shape (4, 2147483647) needs 32.0 GiB (float32" in result.output
    assert "available" in result.output

    monkeypatch.setattr("dlcli.memory.available_bytes", lambda: 1000)  # weights fit, training does not
    result = runner.invoke(app, ["train", str(tiny_config), "--runs-dir", str(tmp_path / "r")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "needs about" in result.output and "activations" in result.output and "at batch 16" in result.output
    assert "1000 B available" in result.output and not (tmp_path / "r").exists()


def test_data_limit_leaves_the_test_split_whole_and_the_banner_says_which_test_set(tmp_path):
    config = write_tiny_config(tmp_path)
    common = ["train", config, "--set", "train.epochs=1", "--set", "data.limit=40", "--runs-dir", str(tmp_path / "r")]
    full = CliRunner().invoke(app, common, env={"COLUMNS": "200"})
    assert full.exit_code == 0, full.output
    text = " ".join(full.output.split())
    assert "train 30, validation 10, test 24 samples (the full test split)" in text
    limited = CliRunner().invoke(app, [*common, "--set", "data.test_limit=10"], env={"COLUMNS": "200"})
    assert limited.exit_code == 0, limited.output
    assert "test 10 samples (the first 10 of the test split: data.test_limit)" in " ".join(limited.output.split())
    bad = CliRunner().invoke(app, [*common, "--set", "data.test_limit=-3"])
    assert bad.exit_code == 2 and "data.test_limit must be a positive integer" in bad.output
