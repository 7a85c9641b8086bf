"""The config fingerprint: a run's config.yaml edited after training is refused (with the diff, exit 2) by evaluate,
predict, export and --resume, unless --allow-config-change; runs recorded before fingerprints keep working."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import dlcli
from dlcli import checkpoint, fingerprint, run_files
from dlcli.cli import app
from tests.runs_fixture import train_tiny, write_tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("fingerprint"), runner)


def edited_copy(run, tmp_path, old="activation: relu", new="activation: sigmoid"):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    text = (copy / "config.yaml").read_text()
    assert old in text
    (copy / "config.yaml").write_text(text.replace(old, new))
    return copy


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").glob("*.yaml")))
def test_fingerprints_are_those_of_the_yaml_round_trip_older_runs_recorded(path):
    """Runs recorded before the config was resolved once hashed load_yaml(dump_yaml(config)): every shipped config
    (and one with overrides) must hash the same, or resuming those runs would report a changed config."""
    from dlcli.config import load_config
    from dlcli.yaml_lines import dump_yaml, load_yaml

    for sets in ([], ["seed=7", "name=x", "train.epochs=3", "compile.optimizer.learning_rate=0.01"]):
        plain = load_config(path, sets).to_dict()
        assert fingerprint.record(plain) == fingerprint.record(load_yaml(dump_yaml(plain)))
        assert json.dumps(plain) == json.dumps(load_yaml(dump_yaml(plain)))


def test_the_run_records_its_config_in_meta_and_checkpoint(run):
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config_fingerprint"].startswith("sha256:") and meta["config"]["model"]["layers"][1]["units"] == 8
    header = checkpoint.load(run)["header"]
    assert header["config_fingerprint"] == meta["config_fingerprint"] and header["config"] == meta["config"]
    from dlcli.config import load_config

    assert fingerprint.changes(run, load_config(run / "config.yaml").to_dict()) == []


def test_an_edited_activation_is_refused_by_every_command_that_loads_the_weights(run, tmp_path):
    copy = edited_copy(run, tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4), np.float32))
    for args in (["evaluate", copy], ["predict", copy, tmp_path / "x.npy"], ["export", copy]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "model.layers.1.activation: 'relu' -> 'sigmoid'" in result.output, result.output
        assert "--allow-config-change" in result.output and "Traceback" not in result.output
    assert not (copy / "evaluation.json").exists() and not (copy / "model.onnx").exists()
    allowed = invoke("evaluate", copy, "--allow-config-change")
    assert allowed.exit_code == 0 and (copy / "evaluation.json").exists(), allowed.output
    # unedited, the same run evaluates as it always did
    assert invoke("evaluate", run).exit_code == 0


def test_an_edited_name_alone_is_accepted_by_evaluate(run, tmp_path):
    """The run's name is a label (the directory says which run it is), not a setting its weights depend on."""
    copy = edited_copy(run, tmp_path, "name: tiny", "name: renamed")
    result = invoke("evaluate", copy)
    assert result.exit_code == 0, result.output
    assert "edited after the run was trained" not in result.output and (copy / "evaluation.json").exists()


def test_resume_compares_with_the_record_not_with_config_yaml_itself(tmp_path):
    config = write_tiny_config(tmp_path, epochs=1)
    first = dlcli.train(config, runs_dir=tmp_path / "runs")
    text = (first.dir / "config.yaml").read_text()
    (first.dir / "config.yaml").write_text(text.replace("activation: relu", "activation: sigmoid"))
    result = invoke("train", "--resume", first.dir)
    assert result.exit_code == 2 and "architecture" in result.output and "'relu' -> 'sigmoid'" in result.output
    (first.dir / "config.yaml").write_text(text.replace("epochs: 1", "epochs: 2"))
    result = invoke("train", "--resume", first.dir)
    assert result.exit_code == 2 and "train.epochs: 1 -> 2" in result.output
    assert "--allow-config-change" in result.output
    more = dlcli.train(first.dir, resume=True, allow_config_change=True)
    assert more.status == "completed" and [r["epoch"] for r in more.history] == [1, 2]
    assert json.loads((first.dir / "meta.json").read_text())["config"]["train"]["epochs"] == 2  # the new record
    assert invoke("evaluate", first.dir).exit_code == 0


def test_old_runs_without_a_fingerprint_and_schema_defaults_keep_working(run, tmp_path):
    copy = edited_copy(run, tmp_path, "units: 3", "units: 3")
    meta = run_files.read_json(copy / "meta.json")
    recorded = meta["config"]
    # a schema that gained a default after the run: the record lacks the key, config.yaml re-resolved has it
    del recorded["train"]["divergence_factor"]
    meta["config_fingerprint"] = fingerprint.record(recorded)["config_fingerprint"]
    run_files.atomic_write_json(copy / "meta.json", meta)
    assert invoke("evaluate", copy).exit_code == 0
    for key in fingerprint.META_KEYS:  # a run from before fingerprints: trusted as before
        del meta[key]
    run_files.atomic_write_json(copy / "meta.json", meta)
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(text.replace("activation: relu", "activation: sigmoid"))
    assert invoke("evaluate", copy).exit_code == 0
