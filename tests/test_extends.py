"""Config composition: `extends:` merges (deep mappings, replaced lists and scalars, null deletes), a list of bases
in order, errors pointing into the file that wrote the value, cycles and missing files with the chain, and
`dlcli config` printing the resolved YAML."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlcli.cli import app
from dlcli.config import load_config
from dlcli.errors import ConfigError
from dlcli.yaml_lines import load_yaml

BASE = """\
name: base
seed: 3
data: {type: mnist, limit: 500}
model:
  input_shape: [28, 28]
  layers:
    - {type: Flatten}
    - {type: Dense, units: 64, activation: relu}
    - {type: Dense, units: 10, activation: softmax}
compile:
  optimizer: {type: adam, learning_rate: 0.001, beta_1: 0.8}
  loss: sparse_categorical_crossentropy
  metrics: [accuracy]
train:
  epochs: 5
  batch_size: 64
  checkpoint_every: 10
"""


def resolved(spec):
    """An optimizer spec as a resolved config holds it: every argument (dlcli.config._resolve_optimizer)."""
    from dlcli.optimizers import OPTIMIZERS

    return OPTIMIZERS.create(spec).get_config()


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_errors(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert info.value.exit_code == 2
    return [str(i) for i in info.value.issues]


def test_mappings_merge_deeply_lists_and_scalars_replace_null_deletes(tmp_path):
    write(tmp_path, "base/mlp.yaml", BASE)
    child = write(tmp_path, "child.yaml", """\
extends: base/mlp.yaml
name: child
data: {limit: 200}
model:
  layers:
    - {type: Flatten}
    - {type: Dense, units: 10, activation: softmax}
compile:
  optimizer: {learning_rate: 0.01}
  metrics: [accuracy, sparse_top_k_categorical_accuracy]
train:
  epochs: 2
  batch_size: null
  checkpoint_every: null
""")
    cfg = load_config(child).to_dict()
    assert cfg["name"] == "child" and cfg["seed"] == 3
    assert cfg["data"] == {"type": "mnist", "limit": 200}
    assert [layer["type"] for layer in cfg["model"]["layers"]] == ["Flatten", "Dense"]
    assert cfg["compile"]["optimizer"] == resolved({"type": "adam", "learning_rate": 0.01, "beta_1": 0.8})
    assert cfg["compile"]["metrics"] == ["accuracy", "sparse_top_k_categorical_accuracy"]
    assert cfg["train"]["epochs"] == 2
    # null deletes the base's value, so the schema's default applies (32 for batch_size, not None)
    assert cfg["train"]["batch_size"] == 32 and cfg["train"]["checkpoint_every"] is None


def test_changed_type_replaces_the_spec_and_a_mapping_fills_a_bare_name(tmp_path):
    write(tmp_path, "base.yaml", BASE.replace("{type: adam, learning_rate: 0.001, beta_1: 0.8}", "rmsprop"))
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ncompile:\n  optimizer: {learning_rate: 0.05}\n")
    assert load_config(child).to_dict()["compile"]["optimizer"] == resolved({"type": "rmsprop", "learning_rate": 0.05})
    write(tmp_path, "adam.yaml", BASE)
    child = write(tmp_path, "sgd.yaml", "extends: adam.yaml\ncompile:\n  optimizer: {type: sgd, momentum: 0.9}\n")
    # beta_1 belongs to adam: merging it into sgd's arguments would be an error the user never wrote
    assert load_config(child).to_dict()["compile"]["optimizer"] == resolved({"type": "sgd", "momentum": 0.9})


def test_a_list_of_bases_merges_in_order_then_the_file_itself(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "fast.yaml", "train: {epochs: 1, batch_size: 256}\ndata: {limit: 100}\n")
    write(tmp_path, "small.yaml", "train: {batch_size: 32}\n")
    child = write(tmp_path, "run.yaml", "extends: [base.yaml, fast.yaml, small.yaml]\ndata: {limit: 50}\n")
    cfg = load_config(child).to_dict()
    assert (cfg["train"]["epochs"], cfg["train"]["batch_size"], cfg["data"]["limit"]) == (1, 32, 50)


def test_errors_point_at_the_file_and_line_that_wrote_the_value(tmp_path):
    base = write(tmp_path, "base.yaml", BASE.replace("units: 64", "units: many"))
    child = write(tmp_path, "sub/child.yaml", "extends: ../base.yaml\ntrain:\n  epochs: 0\n")
    found = config_errors(child, ["compile.optimizer.learnin_rate=0.1"])
    assert len(found) == 3, found
    # base file errors first (reading order), then this file's, then the --set
    assert found[0].startswith(f"{base}:8: model.layers.1.units: expected an integer, found 'many'")
    assert found[1].startswith(f"{child}:3: train.epochs: expected a value >= 1, found 0")
    assert found[2].startswith("--set compile.optimizer.learnin_rate=0.1: compile.optimizer.learnin_rate: unknown "
                               "key 'learnin_rate' for adam (did you mean 'learning_rate'?)")


def test_a_value_merged_over_keeps_the_later_files_line(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ncompile:\n  optimizer:\n    beta_1: yes please\n")
    [found] = config_errors(child)
    assert found.startswith(f"{child}:4: compile.optimizer.beta_1: expected a number, found 'yes please'")


def test_missing_base_names_the_chain_of_files(tmp_path):
    middle = write(tmp_path, "middle.yaml", "extends: nowhere.yaml\n")
    top = write(tmp_path, "top.yaml", "extends: middle.yaml\nname: top\n")
    [found] = config_errors(top)
    assert found == (f"{middle}:1: extends: cannot read {tmp_path / 'nowhere.yaml'}: file not found (extends chain: "
                     f"{top} -> {middle} -> {tmp_path / 'nowhere.yaml'})")


def test_a_cycle_is_an_error_naming_the_cycle(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path, "b.yaml", "name: b\nextends: [a.yaml]\n")
    [found] = config_errors(a)
    assert found == f"{b}:2: extends: a cycle of extends: {a} -> {b} -> {a}"


def test_syntax_error_in_a_base_and_a_bad_extends_value(tmp_path):
    base = write(tmp_path, "base.yaml", "model: [unclosed\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\n")
    [found] = config_errors(child)
    assert found.startswith(f"{base}:1: YAML syntax error")
    bad = write(tmp_path, "bad.yaml", "name: x\nextends: {file: base.yaml}\n")
    [found] = config_errors(bad)
    assert found.startswith(f"{bad}:2: extends: expected a config file path or a list of them")


def test_config_command_prints_resolved_yaml_that_trains_the_same(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ntrain: {epochs: 2}\n")
    result = CliRunner().invoke(app, ["config", str(child), "--set", "train.batch_size=16"])
    assert result.exit_code == 0, result.output
    printed = load_yaml(result.output)
    assert "extends" not in printed and printed["train"]["epochs"] == 2 and printed["train"]["batch_size"] == 16
    resolved = write(tmp_path, "resolved.yaml", result.output)
    assert load_config(resolved) == load_config(child, ["train.batch_size=16"])
    bad = CliRunner().invoke(app, ["config", str(child), "--set", "train.epoch=3"])
    assert bad.exit_code == 2 and "train.epoch: unknown key 'epoch' (did you mean 'epochs'?)" in bad.output
    assert "Traceback" not in bad.output
