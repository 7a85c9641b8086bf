"""Config loading: round trips, every error kind with its line, several errors at once, --set overrides."""
from pathlib import Path

import pytest

from dlcli.config import Config, Override, dump_yaml, load_config, parse_config, validate_config
from dlcli.errors import ConfigError
from dlcli.optimizers import OPTIMIZERS
from dlcli.yaml_lines import load_yaml

SRC = "configs/t.yaml"

MLP = """\
name: mlp
data: {type: mnist}
model:
  input_shape: [28, 28]
  layers:
    - {type: Flatten}
    - {type: Dense, units: 512, activation: relu}
    - {type: Dense, units: 10, activation: softmax}
compile:
  optimizer: {type: rmsprop, learning_rate: 1e-3}
  loss: sparse_categorical_crossentropy
  metrics: [accuracy]
train:
  epochs: 5
  batch_size: 128
"""

FUNCTIONAL = """\
data: {type: npz, path: data.npz, x: {img: x}}
model:
  type: functional
  inputs: [{name: img, shape: [8]}]
  layers:
    - {name: h, type: Dense, units: 4, activation: relu, inputs: img, lr_mult: 0.5}
    - {name: h2, shares: h, inputs: img}
    - {name: cls, type: Dense, units: 3, activation: softmax, inputs: h}
    - {name: reg, type: Dense, units: 1, inputs: [h2], trainable: false}
  outputs: [cls, reg]
compile:
  optimizer: adam
  loss: {cls: sparse_categorical_crossentropy, reg: {type: huber, delta: 2.0}}
  loss_weights: {cls: 1.0, reg: 0.5}
  metrics: {cls: [accuracy], reg: [mae]}
train:
  freeze: ["h.*"]
  class_weight: {0: 1.0, 1: 2.5}
  checkpoint_every: 100
"""


def errors(text, overrides=(), source=SRC) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source, overrides)
    assert info.value.exit_code == 2
    lines = [str(i) for i in info.value.issues]
    assert info.value.message.count("\n") == len(lines)  # one line per error, after the heading
    return lines


def one_error(text, overrides=()) -> str:
    found = errors(text, overrides)
    assert len(found) == 1, found
    return found[0]


def edit(text, old, new):
    assert old in text
    return text.replace(old, new, 1)


# --- good configs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [MLP, FUNCTIONAL], ids=["sequential", "functional"])
def test_round_trip_through_resolved_yaml(text):
    config = parse_config(text, SRC)
    resolved = config.to_dict()
    assert list(resolved) == ["name", "seed", "data", "model", "compile", "train"]
    again = parse_config(dump_yaml(resolved), "runs/x/config.yaml")
    assert again == config
    assert again.to_dict() == resolved


def test_defaults_are_filled_in():
    config = parse_config(edit(MLP, "name: mlp\n", ""), "configs/book_mlp.yaml")
    assert config.name == "book_mlp"  # the file stem
    assert config.seed == 0
    text = edit(MLP, "  optimizer: {type: rmsprop, learning_rate: 1e-3}\n", "")
    text = edit(text, "train:\n  epochs: 5\n  batch_size: 128\n", "")
    train = parse_config(text, SRC).to_dict()["train"]
    assert train == {"epochs": 1, "batch_size": 32, "validation_split": 0.0, "stratify": False, "shuffle": True,
                     "callbacks": [], "freeze": [], "class_weight": None, "checkpoint_every": None,
                     "divergence_factor": 1e4}
    # a bare optimizer name is every argument it takes (issue 28: 'rmsprop' and its mapping differed in runs compare)
    assert parse_config(text, SRC).compile.optimizer == {"type": "rmsprop", "learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False}
    assert parse_config(text, SRC, ["compile.optimizer={type: RMSprop, rho: 0.9}"]).compile.optimizer == {"type": "rmsprop", "learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False}


def test_validation_split_null_means_none():
    """Was refused ('expected a number, found null'); stored as 0.0, so it never differs from 0 in a diff."""
    config = parse_config(MLP, SRC, ["train.validation_split=null"])
    assert config.to_dict()["train"]["validation_split"] == 0.0


def test_values_are_typed():
    config = parse_config(MLP, SRC)
    assert config.compile.optimizer == {"type": "rmsprop", "learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False}  # 1e-3 is a float, not a string
    assert config.model.layers[1] == {"type": "Dense", "units": 512, "activation": "relu"}
    functional = parse_config(FUNCTIONAL, SRC)
    assert functional.train.class_weight == {0: 1.0, 1: 2.5}
    assert functional.model.inputs[0].shape == [8]
    assert functional.compile.loss["reg"] == {"type": "huber", "delta": 2.0}


def test_dump_yaml_is_block_style_with_flow_shapes():
    text = dump_yaml(parse_config(MLP, SRC).to_dict())
    assert text.splitlines()[:3] == ["name: mlp", "seed: 0", "data:"]
    assert "  input_shape: [28, 28]" in text
    assert "  - type: Dense" in text
    assert dump_yaml({"s": "1e-3"}) != "s: 1e-3\n" and load_yaml(dump_yaml({"s": "1e-3"})) == {"s": "1e-3"}


def test_repository_configs_load():
    paths = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert paths  # the shipped configs: an empty glob (a moved folder) must not pass
    for path in paths:
        config = load_config(path)
        assert parse_config(dump_yaml(config.to_dict()), str(path)) == config


# --- every error kind, with its line -------------------------------------------------------------------------------
def test_yaml_syntax_error_gives_line():
    message = one_error(edit(MLP, "  batch_size: 128", "  batch_size: [128"))
    assert message.startswith(f"{SRC}:15: YAML syntax error")
    assert one_error("a: 1\n b: 2\n").startswith(f"{SRC}:2: YAML syntax error")


def test_unknown_top_level_key_suggests():
    assert one_error(edit(MLP, "name: mlp", "nmae: mlp")) == (
        f"{SRC}:1: nmae: unknown key 'nmae' (did you mean 'name'?); the top level takes: name, seed, data, model, "
        f"compile, train, sweep")


def test_unknown_section_key_suggests():
    message = one_error(edit(MLP, "  epochs: 5", "  epocs: 5"))
    assert message.startswith(f"{SRC}:14: train.epocs: unknown key 'epocs' (did you mean 'epochs'?)")


@pytest.mark.parametrize("old,new,expected", [
    ("  epochs: 5", "  epochs: five", "14: train.epochs: expected an integer, found 'five'"),
    ("  epochs: 5", "  epochs: 0", "14: train.epochs: expected a value >= 1, found 0"),
    ("  batch_size: 128", "  batch_size: 12.5", "15: train.batch_size: expected an integer, found 12.5"),
    ("  batch_size: 128", "  validation_split: 1.0", "15: train.validation_split: expected a value < 1.0, found 1.0"),
    ("  batch_size: 128", "  shuffle: maybe", "15: train.shuffle: expected true or false, found 'maybe'"),
    ("[28, 28]", "[28, x]", "4: model.input_shape.1: expected an integer, found 'x'"),
    ("  input_shape: [28, 28]\n", "  type: functinal\n  input_shape: [28, 28]\n",
     "4: model.type: expected one of 'sequential' or 'functional', found 'functinal' (did you mean 'functional'?)"),
    ("name: mlp", "seed: [1]", "1: seed: expected an integer, found the list [1]"),
])
def test_wrong_types_name_expected_and_found(old, new, expected):
    assert one_error(edit(MLP, old, new)) == f"{SRC}:{expected}"


def test_unknown_layer_type_suggests():
    message = one_error(edit(MLP, "{type: Flatten}", "{type: Flaten}"))
    assert message.startswith(f"{SRC}:6: model.layers.0.type: unknown layer 'Flaten' (did you mean 'Flatten'?)")
    assert "known: " in message and "Dense" in message


def test_misspelt_layer_key_suggests_and_is_not_also_missing():
    message = one_error(edit(MLP, "units: 512", "unit: 512"))
    assert message.startswith(f"{SRC}:7: model.layers.1.unit: unknown key 'unit' for Dense (did you mean 'units'?); "
                              f"Dense takes: units, activation")
    assert "lr_mult" in message and "trainable" in message  # base Layer arguments are accepted too


def test_layer_arguments_are_checked_against_annotations():
    assert one_error(edit(MLP, "units: 512", "units: many")) == \
        f"{SRC}:7: model.layers.1.units: expected an integer, found 'many'"
    assert one_error(edit(MLP, "units: 512", "units: 512, trainable: perhaps")) == \
        f"{SRC}:7: model.layers.1.trainable: expected true or false, found 'perhaps'"
    assert one_error(edit(MLP, "{type: Flatten}", "{type: Flatten, lr_mult: fast}")) == \
        f"{SRC}:6: model.layers.0.lr_mult: expected a number, found 'fast'"


def test_missing_required_layer_argument():
    assert one_error(edit(MLP, "{type: Dense, units: 10, activation: softmax}", "{type: Dense}")) == \
        f"{SRC}:8: model.layers.2: missing required key 'units' for Dense"


def test_missing_input_shape_and_first_layer_alternative():
    message = one_error(edit(MLP, "  input_shape: [28, 28]\n", ""))
    assert message.startswith(f"{SRC}:3: model: missing required key 'input_shape'")
    parse_config(edit(edit(MLP, "  input_shape: [28, 28]\n", ""), "{type: Flatten}",
                      "{type: Flatten, input_shape: [28, 28]}"), SRC)


def test_unknown_optimizer_and_argument():
    assert one_error(edit(MLP, "type: rmsprop", "type: rmsprp")).startswith(
        f"{SRC}:10: compile.optimizer.type: unknown optimizer 'rmsprp' (did you mean 'rmsprop'?)")
    assert one_error(edit(MLP, "learning_rate: 1e-3", "learning_rat: 1e-3")).startswith(
        f"{SRC}:10: compile.optimizer.learning_rat: unknown key 'learning_rat' for rmsprop "
        f"(did you mean 'learning_rate'?)")
    assert one_error(edit(MLP, "  optimizer: {type: rmsprop, learning_rate: 1e-3}", "  optimizer: adma")).startswith(
        f"{SRC}:10: compile.optimizer: unknown optimizer 'adma' (did you mean 'adam'?)")


def test_unknown_loss_and_metric():
    assert one_error(edit(MLP, "loss: sparse_categorical_crossentropy", "loss: sparse_categorical_crossentropi")
                     ).startswith(f"{SRC}:11: compile.loss: unknown loss 'sparse_categorical_crossentropi' "
                                  f"(did you mean 'sparse_categorical_crossentropy'?)")
    assert one_error(edit(MLP, "[accuracy]", "[accuracy, acuracy]")).startswith(
        f"{SRC}:12: compile.metrics.1: unknown metric 'acuracy' (did you mean 'accuracy'?)")
    assert one_error(edit(MLP, "[accuracy]", "accuracy")) == \
        f"{SRC}:12: compile.metrics: expected a list of metric names like [accuracy], found 'accuracy'"


def test_missing_loss():
    assert one_error(edit(MLP, "  loss: sparse_categorical_crossentropy\n", "")) == \
        f"{SRC}:9: compile: missing required key 'loss'"


def test_unknown_dataset_and_dataset_key():
    assert one_error(edit(MLP, "{type: mnist}", "{type: minst}")).startswith(
        f"{SRC}:2: data.type: unknown dataset 'minst' (did you mean 'mnist'?)")
    assert one_error(edit(MLP, "{type: mnist}", "{type: mnist, limt: 10}")).startswith(
        f"{SRC}:2: data.limt: unknown key 'limt' for mnist (did you mean 'limit'?)")
    assert one_error(edit(MLP, "{type: mnist}", "{type: mnist, limit: lots}")) == \
        f"{SRC}:2: data.limit: expected an integer, found 'lots'"
    assert one_error(edit(MLP, "{type: mnist}", "{type: npz}")) == f"{SRC}:2: data: missing required key 'path' for npz"


def test_callbacks_are_checked():
    text = MLP + "  callbacks:\n    - {type: EarlyStoping, patience: 2}\n    - {type: EarlyStopping, patiense: 2}\n"
    found = errors(text)
    assert found[0].startswith(f"{SRC}:17: train.callbacks.0.type: unknown callback 'EarlyStoping' "
                               f"(did you mean 'EarlyStopping'?)")
    assert found[1].startswith(f"{SRC}:18: train.callbacks.1.patiense: unknown key 'patiense' for EarlyStopping "
                               f"(did you mean 'patience'?)")
    parse_config(MLP + "  callbacks: [{type: EarlyStopping, patience: 2}]\n", SRC)


def test_bad_freeze_pattern():
    assert one_error(MLP + "  freeze: ['dense_(']\n").startswith(
        f"{SRC}:16: train.freeze.0: expected a regular expression matching layer names, found 'dense_('")


def test_duplicate_key():
    assert one_error(edit(MLP, "  batch_size: 128", "  batch_size: 128\n  epochs: 6")) == \
        f"{SRC}:16: train.epochs: duplicate key 'epochs' (first given at line 14)"


def test_duplicate_layer_name():
    text = edit(edit(MLP, "units: 512,", "units: 512, name: d,"), "units: 10,", "units: 10, name: d,")
    assert one_error(text) == f"{SRC}:8: model.layers.2.name: duplicate layer name 'd' (names must be unique)"


def test_top_level_must_be_a_mapping():
    assert one_error("- 1\n- 2\n").startswith(f"{SRC}:1: expected a mapping of sections")


def test_sequential_rejects_functional_keys():
    assert one_error(edit(MLP, "{type: Flatten}", "{type: Flatten, inputs: img}")) == \
        f"{SRC}:6: model.layers.0.inputs: 'inputs' is only for functional models (model.type: functional)"


TIED_LM = """\
data: {type: npz, path: data.npz}
model:
  type: functional
  inputs: [{name: tokens, shape: [6], dtype: int32}]
  layers:
    - {name: emb, type: ReversibleEmbedding, input_dim: 20, output_dim: 4, inputs: tokens}
    - {name: h, type: Dense, units: 4, activation: tanh, inputs: emb}
    - {name: logits, shares: emb, inputs: h, reverse: true}
  outputs: [logits]
compile: {optimizer: adam, loss: mse}
"""


def test_a_shared_call_sets_its_own_call_arguments():
    """Keras' emb(h, reverse=True) on a layer first called without: the entry that shares it gives `reverse`."""
    from dlcli.builder import build_model

    model = build_model(parse_config(TIED_LM, SRC))
    emb = model.graph.layers[0]
    assert [n.call_args["reverse"] for n in emb.nodes] == [False, True]
    assert model.graph.outputs[0].shape == (6, 20)
    assert model.get_config()["layers"][2] == {"name": "logits", "shares": "emb", "inputs": "h", "reverse": True}
    assert one_error(edit(TIED_LM, "reverse: true", "reverse: maybe")).startswith(
        f"{SRC}:8: model.layers.2.reverse: expected")
    assert one_error(edit(TIED_LM, "{name: h, type: Dense", "{name: h, type: Dense, units: 4, inputs: emb}\n"
                                   "    - {name: h2, shares: h, inputs: h, reverse: true}\n    - {name: hh, type: Dense"
                          )) == (f"{SRC}:8: model.layers.2.reverse: a layer that shares another's weights takes only "
                                 f"name, inputs, shares; found 'reverse'")


def test_functional_wiring_errors():
    text = edit(FUNCTIONAL, "inputs: [h2]", "inputs: [h3]")
    text = edit(text, "shares: h,", "shares: hh,")
    text = edit(text, "outputs: [cls, reg]", "outputs: [cls, rgt]")
    text = edit(text, "reg: 0.5", "regg: 0.5")
    found = errors(text)
    assert found[0].startswith(f"{SRC}:7: model.layers.1.shares: unknown layer 'hh' (did you mean 'h'?)")
    assert found[1].startswith(f"{SRC}:9: model.layers.3.inputs.0: unknown input or layer 'h3' (did you mean 'h'")
    assert found[2].startswith(f"{SRC}:10: model.outputs.1: unknown layer 'rgt' (did you mean 'reg'?)")
    assert len(found) == 3  # output-keyed compile entries are not checked against outputs that are wrong
    text = edit(FUNCTIONAL, "reg: 0.5", "regg: 0.5")
    assert one_error(text).startswith(f"{SRC}:14: compile.loss_weights.regg: unknown output 'regg' "
                                      f"(did you mean 'reg'?); outputs: cls, reg")


def test_functional_needs_inputs_and_outputs():
    text = edit(FUNCTIONAL, "  inputs: [{name: img, shape: [8]}]\n", "")
    found = errors(text)
    assert found[0].startswith(f"{SRC}:2: model: a functional model needs 'inputs'")


# --- several at once -----------------------------------------------------------------------------------------------
def test_every_error_is_reported_at_once_in_line_order():
    text = MLP.replace("name: mlp", "nme: mlp").replace("{type: Flatten}", "{type: Flaten}") \
        .replace("units: 512", "unit: 512").replace("units: 10,", "units: ten,") \
        .replace("[accuracy]", "[acuracy]").replace("epochs: 5", "epochs: -1")
    found = errors(text)
    lines = [int(m.split(":")[1]) for m in found]
    assert lines == [1, 6, 7, 8, 12, 14]
    assert "did you mean 'name'" in found[0] and "did you mean 'Flatten'" in found[1]
    assert "did you mean 'units'" in found[2] and "found 'ten'" in found[3]
    assert "did you mean 'accuracy'" in found[4] and ">= 1" in found[5]
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    assert info.value.message.startswith(f"invalid config {SRC} (6 errors):\n")


# --- --set overrides -----------------------------------------------------------------------------------------------
def test_overrides_are_typed_like_yaml():
    config = parse_config(MLP, SRC, ["train.epochs=1", "compile.optimizer.learning_rate=0.01",
                                     "model.layers.1.units=256", "data.limit=2000", "model.layers.-1.use_bias=false"])
    assert config.train.epochs == 1
    assert config.compile.optimizer["type"] == "rmsprop" and config.compile.optimizer["learning_rate"] == 0.01
    assert config.model.layers[1]["units"] == 256
    assert config.model.layers[2]["use_bias"] is False
    assert config.data == {"type": "mnist", "limit": 2000}


def test_override_replaces_a_whole_value():
    config = parse_config(MLP, SRC, ["compile.optimizer=adam", "model.input_shape=[784]",
                                     "model.layers.0={type: Reshape, target_shape: [784]}"])
    assert config.compile.optimizer == OPTIMIZERS.create("adam").get_config()
    assert config.model.input_shape == [784]
    assert config.model.layers[0] == {"type": "Reshape", "target_shape": [784]}


def test_override_promotes_a_named_optimizer():
    text = edit(MLP, "  optimizer: {type: rmsprop, learning_rate: 1e-3}", "  optimizer: rmsprop")
    config = parse_config(text, SRC, ["compile.optimizer.learning_rate=1e-4"])
    assert config.compile.optimizer == OPTIMIZERS.create({"type": "rmsprop", "learning_rate": 1e-4}).get_config()
    config = parse_config(text, SRC, ["compile.loss.from_logits=true"])
    assert config.compile.loss == {"type": "sparse_categorical_crossentropy", "from_logits": True}


def test_overridden_values_and_defaults_round_trip():
    config = parse_config(MLP, SRC, ["train.epochs=2", "compile.optimizer=sgd"])
    again = parse_config(dump_yaml(config.to_dict()), "runs/x/config.yaml")
    assert again == config and again.train.epochs == 2


def test_bad_override_path_suggests():
    assert one_error(MLP, ["trian.epochs=1"]).startswith(
        "--set trian.epochs=1: trian: unknown key 'trian' (did you mean 'train'?)")
    assert one_error(MLP, ["train.epocs=1"]).startswith(
        "--set train.epocs=1: train.epocs: unknown key 'epocs' (did you mean 'epochs'?)")
    assert one_error(MLP, ["model.layers.1.unit=3"]).startswith(
        "--set model.layers.1.unit=3: model.layers.1.unit: unknown key 'unit' for Dense (did you mean 'units'?)")


def test_override_structure_errors():
    assert one_error(MLP, ["model.layers.7.units=3"]) == \
        "--set model.layers.7.units=3: model.layers has 3 items (indices 0..2); index 7 is out of range"
    assert one_error(MLP, ["model.layers.last.units=3"]) == \
        "--set model.layers.last.units=3: model.layers is a list: use an index 0..2, not 'last'"
    assert one_error(MLP, ["train.epochs.max=3"]).startswith(
        "--set train.epochs.max=3: train.epochs is the int 5, not a mapping or list")
    assert one_error(MLP, ["train.epochs"]).startswith("--set train.epochs: expected key.path=value")
    assert one_error(MLP, ["train.epochs=[1"]).startswith("--set train.epochs=[1: the value '[1' is not valid YAML")


def test_errors_in_overridden_values_name_the_override():
    assert one_error(MLP, ["model.layers.1.units=abc"]) == \
        "--set model.layers.1.units=abc: model.layers.1.units: expected an integer, found 'abc'"
    assert one_error(MLP, ["compile.optimizer={type: adamm}"]).startswith(
        "--set compile.optimizer={type: adamm}: compile.optimizer.type: unknown optimizer 'adamm'")


def test_overrides_given_as_values_name_their_own_source():
    config = parse_config(MLP, SRC, [Override("seed", 7, "--seed 7"), Override("train.epochs", 2, "sweep trial 0")])
    assert (config.seed, config.train.epochs) == (7, 2)
    assert one_error(MLP, [Override("seed", -1, "--seed -1")]) == "--seed -1: seed: expected a value >= 0, found -1"
    assert one_error(MLP, [Override("name", "../x", "--name ../x")]).startswith("--name ../x: name: expected a plain")


def test_plain_data_is_validated_without_yaml_and_errors_name_the_override():
    config = parse_config(MLP, SRC)
    again = validate_config(config.to_dict(), "<mlp>", ["train.epochs=2"])
    assert again.train.epochs == 2 and again.model_copy(update={"train": config.train}) == config
    with pytest.raises(ConfigError) as e:
        validate_config(config.to_dict(), "<mlp>", ["model.layers.1.units=abc"])
    assert str(e.value).endswith("--set model.layers.1.units=abc: model.layers.1.units: expected an integer, "
                                 "found 'abc'")


def test_to_dict_is_computed_once_and_a_copy_gets_its_own():
    config = parse_config(MLP, SRC)
    assert config.to_dict() is config.to_dict()
    renamed = config.model_copy(update={"name": "other"})
    assert renamed.to_dict()["name"] == "other" and config.to_dict()["name"] == "mlp"


def test_file_and_override_errors_together():
    found = errors(edit(MLP, "units: 512", "unit: 512"), ["train.batch_size=0"])
    assert found[0].startswith(f"{SRC}:7: model.layers.1.unit:")
    assert found[1] == "--set train.batch_size=0: train.batch_size: expected a value >= 1, found 0"


def test_load_config_reads_files(tmp_path):
    path = tmp_path / "book.yaml"
    path.write_text(edit(MLP, "name: mlp\n", ""))
    config = load_config(path, ["train.epochs=1"])
    assert isinstance(config, Config) and config.name == "book" and config.train.epochs == 1
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text(edit(MLP, "units: 512", "units: x"))
    with pytest.raises(ConfigError, match=rf"{path}:7: model.layers.1.units"):
        load_config(path)


def test_activation_and_initializer_names_are_checked():
    text = """
data: {type: mnist}
model:
  input_shape: [4]
  layers:
    - {type: Dense, units: 3, activation: softmaxx, kernel_initializer: he_normall}
    - {type: Dense, units: 2, bias_initializer: {type: constant, valu: 1}}
compile: {loss: mse}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    message = info.value.message
    assert "c.yaml:6: model.layers.0.activation: unknown activation 'softmaxx' (did you mean 'softmax'?)" in message
    assert "unknown initializer 'he_normall' (did you mean 'he_normal'?)" in message
    assert "c.yaml:7: model.layers.1.bias_initializer.valu: unknown key 'valu'" in message


def test_parent_arguments_a_layer_passes_itself_are_not_required():
    # SimpleRNN passes Recurrent its recurrent_activation: a YAML SimpleRNN needs only units
    text = "data: {type: mnist}\nmodel:\n  input_shape: [5, 3]\n  layers:\n    - {type: SimpleRNN, units: 4}\n" \
           "compile: {loss: mse}\n"
    assert parse_config(text, "rnn.yaml").model.layers[0] == {"type": "SimpleRNN", "units": 4}


def test_recursive_and_exploding_aliases_are_errors_not_hangs():
    (message,) = errors(MLP + "extra: &a [1, *a]\n")
    assert message.startswith(f"{SRC}:16: ") and "refers to a node containing it" in message
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (message,) = errors(laughs)
    assert "expands to more than 200,000 values" in message


def test_unannotated_sizes_are_still_checked():
    """Conv2D's kernel_size has no annotation; a mapping there used to reach int() in the layer (found by fuzzing)."""
    text = edit(MLP, "{type: Flatten}", "{type: Conv2D, filters: 2, kernel_size: {k: 3}}")
    assert "model.layers.0.kernel_size: expected a positive integer" in one_error(text)


def test_dlcli_config_prints_int_sweep_bounds_as_integers():
    """Was: `dlcli config` printed an int parameter's bounds as 32.0 and 256.0 (issue 28)."""
    from typer.testing import CliRunner

    from dlcli.cli import app

    result = CliRunner().invoke(app, ["config", "configs/mnist_sweep.yaml"])
    assert result.exit_code == 0, result.output
    batch = load_yaml(result.output)["sweep"]["parameters"]["train.batch_size"]
    assert batch == {"type": "int", "low": 32, "high": 256, "step": 32} and "32.0" not in result.output
    rate = load_yaml(result.output)["sweep"]["parameters"]["compile.optimizer.learning_rate"]
    assert isinstance(rate["low"], float) and rate["log"] is True


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_resolves_to_a_config_that_parses_back_equal(name):
    """A resolved config names every optimizer argument (its get_config): each must parse back to the same Config,
    schedules included."""
    for extra in ("", ", learning_rate: {type: cosine_decay, initial_learning_rate: 0.01, decay_steps: 100}"):
        spec = f"{{type: {name}{extra}}}"
        if name == "MultiOptimizer":  # the rates are its inner optimizers'
            spec = f"{{type: {name}, optimizer_map: {{default_optimizer: {{type: adam{extra}}}, " \
                   f"optimizer_map: {{'dense/.*': {{type: sgd{extra}}}}}}}}}"
        config = parse_config(MLP, SRC, [f"compile.optimizer={spec}"])
        assert parse_config(dump_yaml(config.to_dict()), "runs/x/config.yaml") == config
