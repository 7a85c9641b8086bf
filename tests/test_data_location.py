"""A run records where its data was found; evaluate in a new shell (no DLCLI_DATA_DIR, another directory) looks
there first instead of failing or downloading."""
import json

import numpy as np
from typer.testing import CliRunner

from dlcli.cli import app
from tests.runs_fixture import write_tiny_config

runner = CliRunner()


def test_evaluate_in_a_new_shell_finds_the_runs_data(tmp_path, monkeypatch):
    data = tmp_path / "datasets"
    data.mkdir()
    config = write_tiny_config(tmp_path)
    (tmp_path / "tiny.npz").rename(data / "tiny.npz")
    text = open(config).read().replace(str(tmp_path / "tiny.npz"), "tiny.npz")  # relative: found via the data dir
    open(config, "w").write(text)
    monkeypatch.setenv("DLCLI_DATA_DIR", str(data))
    result = runner.invoke(app, ["train", config, "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    assert str(data.resolve()) in json.loads((run / "meta.json").read_text())["data_dirs"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("DLCLI_DATA_DIR")
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "evaluation.json").read_text())["samples"] == 24


def test_named_datasets_are_found_where_the_run_found_them(tmp_path, monkeypatch):
    from dlcli.data import load_dataset, paths

    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    monkeypatch.delenv("DLCLI_DATA_DIR", raising=False)
    monkeypatch.setenv("DLCLI_CACHE_DIR", str(tmp_path / "empty-cache"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"data_dirs": [str(tmp_path / "data")]}))
    with paths.searching_first(run):
        assert paths.candidate_dirs(["mnist"])[0] == ("recorded by the run", folder)
    assert all(label != "recorded by the run" for label, _ in paths.candidate_dirs(["mnist"]))
    import dlcli.data.images as images

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded instead of using the recorded folder")

    from tests.conftest import require_dataset

    datasets = require_dataset("mnist").parent
    monkeypatch.setattr(images, "download", no_download)
    (run / "meta.json").write_text(json.dumps({"data_dirs": [str(datasets)]}))
    with paths.searching_first(run):
        d = load_dataset({"type": "mnist", "limit": 5})
    assert len(d.x_train) == 5 and np.isfinite(d.x_train).all()
