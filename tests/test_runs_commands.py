import json

from typer.testing import CliRunner

from dlcli.cli import app
from dlcli.run_files import best_metric, run_summary
from dlcli.yaml_lines import flatten
from tests.runs_fixture import train_tiny

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_best_metric_prefers_a_validation_metric_in_its_direction():
    rows = [{"epoch": 1, "loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.5},
            {"epoch": 2, "loss": 0.8, "val_loss": 1.2, "val_accuracy": 0.7}]
    assert best_metric(rows) == ("val_accuracy", 0.7, 2)
    assert best_metric([{k: v for k, v in r.items() if k != "val_accuracy"} for r in rows]) == ("val_loss", 0.9, 1)
    assert best_metric([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]) == ("loss", 1.5, 2)
    assert best_metric([]) == ("loss", None, None)


def test_flatten_gives_set_paths():
    assert flatten({"a": {"b": [1, {"c": 2}], "d": []}}) == {"a.b.0": 1, "a.b.1.c": 2, "a.d": []}


def test_list_show_compare_with_damaged_runs(tmp_path):
    a = train_tiny(tmp_path, runner, name="alpha")
    b = train_tiny(tmp_path, runner, name="beta", epochs=3)
    runs_dir = tmp_path / "runs"
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "meta.json").write_text("{not json")
    (runs_dir / "half").mkdir()
    (runs_dir / "half" / "config.yaml").write_text("name: half\n")
    (runs_dir / "half" / "history.csv").write_text("epoch,loss\n1,0.5\n2,")  # killed mid-write
    running = runs_dir / "killed"
    running.mkdir()
    (running / "meta.json").write_text(json.dumps({"status": "running", "start": "2026-01-02T03:04:05+00:00"}))

    result = invoke("runs", "list", "--runs-dir", runs_dir)
    assert result.exit_code == 0, result.output
    out = result.output
    for name in (a.name, b.name, "broken", "half", "killed"):
        assert name in out
    assert "completed" in out and "damaged" in out and "running or killed" in out and "2026-01-02 03:04" in out
    assert "meta.json damaged" in out and "no meta.json" in out
    assert run_summary(b)["epochs"] == 3 and run_summary(runs_dir / "half")["epochs"] == 2

    result = invoke("runs", "show", a)
    assert result.exit_code == 0, result.output
    assert "config.yaml" in result.output and "sparse_categorical_crossentropy" in result.output
    assert "history" in result.output and "val_accuracy" in result.output and "Total params" in result.output
    result = invoke("runs", "show", runs_dir / "broken")
    assert result.exit_code == 0 and "damaged" in result.output and "no epochs recorded" in result.output

    result = invoke("runs", "compare", a, b, runs_dir / "broken")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "train.epochs" in line or line.count("name ")]
    assert any("train.epochs" in line and "2" in line and "3" in line for line in lines)
    assert "model.layers" not in result.output  # identical keys are not listed
    assert "final val_accuracy" in result.output and "test accuracy" in result.output

    assert invoke("runs", "compare", a).exit_code == 2
    # every "not a run directory" is one error with one exit code, 2 (issue 28: they mixed 1 and 2)
    (tmp_path / "plain").mkdir(exist_ok=True)
    for args in (("runs", "list", "--runs-dir", tmp_path / "nowhere"), ("runs", "show", tmp_path / "nowhere"),
                 ("runs", "show", tmp_path / "plain"), ("runs", "compare", a, tmp_path / "nowhere"),
                 ("evaluate", tmp_path / "plain"), ("export", tmp_path / "plain"), ("plot", tmp_path / "plain"),
                 ("predict", tmp_path / "plain", a / "config.yaml"), ("train", "--resume", tmp_path / "plain")):
        result = invoke(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)
        assert "not a dlcli run directory" in result.output or "runs directory" in result.output, result.output
    # was: exit 0 and a column of dashes for the stray folder
    refused = invoke("runs", "compare", a, tmp_path / "plain")
    assert refused.exit_code == 2 and f"{tmp_path / 'plain'} is not a dlcli run directory" in refused.output


def test_list_names_a_training_figure_compare_says_identical_show_refuses_a_non_run(tmp_path):
    run = train_tiny(tmp_path, runner, name="solo", validation_split=0.0)
    result = invoke("runs", "list", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "best metric" in result.output and "best val metric" not in result.output
    assert "loss (training)" in result.output  # no validation split: the best is a training figure
    twin = train_tiny(tmp_path, runner, name="solo", validation_split=0.0)
    same = invoke("runs", "compare", run, twin)
    assert same.exit_code == 0 and "the configs are identical" in same.output, same.output
    assert "config differences" not in same.output
    (tmp_path / "plain").mkdir()
    shown = invoke("runs", "show", tmp_path / "plain")
    assert shown.exit_code == 2 and "not a dlcli run directory" in shown.output
