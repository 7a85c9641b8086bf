"""`dlcli export`: every shipped config agrees with dlcli in onnxruntime; the command checks, refuses and writes
nothing half-done."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dlcli.builder import build_model  # noqa: E402
from dlcli.cli import app  # noqa: E402
from dlcli.config import load_config  # noqa: E402
from dlcli.interop.onnx_export import max_difference, sample_inputs, to_onnx  # noqa: E402
from dlcli.layers.core import Dense  # noqa: E402
from tests.runs_fixture import CLASSES, train_tiny  # noqa: E402

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
runner = CliRunner()


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_agrees_with_dlcli(config):
    model = build_model(load_config(config))
    rng = np.random.default_rng(0)
    for p in model.weights:  # trained-looking weights: BatchNormalization statistics away from 0 and 1
        if "moving" in p.name:
            p.value = (np.abs(rng.normal(0, 0.5, p.value.shape)) + (0.5 if "variance" in p.name else 0)).astype(
                np.float32)
    proto = to_onnx(model)
    xs = sample_inputs(model, 16, seed=2)
    if model.inputs[0].dtype == "int32":  # padded reviews: zeros (masked) first, as the IMDB loader pads
        xs[0][:, :60] = 0
    diff = max_difference(proto.SerializeToString(), model, xs)
    assert diff <= 1e-5, f"{config.name}: {diff:.3g}"


def test_export_command_writes_checked_file_with_metadata(tmp_path):
    run = train_tiny(tmp_path, runner)
    result = runner.invoke(app, ["export", str(run), "--output", str(tmp_path / "tiny.onnx")])
    assert result.exit_code == 0, result.output
    assert "largest difference" in result.output and "test samples" in result.output
    model = onnx.load(str(tmp_path / "tiny.onnx"))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["dlcli.classes"]) == CLASSES and json.loads(props["dlcli.data"])["type"] == "npz"
    # the graph's inputs and outputs carry the model's names, which is what a deployment feeds and reads by
    assert [i.name for i in model.graph.input] == ["input_layer"]
    assert [o.name for o in model.graph.output] == ["dense_1"]
    assert "dlcli.pixel_scale" not in props and "dlcli.vocabulary" not in props  # float features, no text


def test_export_metadata_of_an_npz_run_with_rescale_gives_its_pixel_scale(tmp_path):
    run = train_tiny(tmp_path, runner, data={"rescale": 0.5})
    assert runner.invoke(app, ["export", str(run)]).exit_code == 0
    props = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert float(props["dlcli.pixel_scale"]) == 0.5 and json.loads(props["dlcli.data"])["rescale"] == 0.5
    assert "dlcli.vocabulary" not in props


def test_export_metadata_of_a_text_run_holds_its_vocabulary(tmp_path):
    for label, word in (("neg", "awful"), ("pos", "great")):
        (tmp_path / "texts" / label).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "texts" / label / f"{i}.txt").write_text(f"a {word} film number {i}", encoding="utf-8")
    config = tmp_path / "text.yaml"
    config.write_text(f"""\
name: reviews
data: {{type: text_folder, directory: {tmp_path / 'texts'}, output_mode: multi_hot, num_words: 12}}
model: {{input_shape: [12], layers: [{{type: Dense, units: 1, activation: sigmoid}}]}}
compile: {{optimizer: adam, loss: binary_crossentropy}}
train: {{epochs: 1, batch_size: 4}}
""")
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert runner.invoke(app, ["export", str(run)]).exit_code == 0
    props = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert json.loads(props["dlcli.vocabulary"]) == json.loads((run / "vocabulary.json").read_text())
    assert "great" in json.loads(props["dlcli.vocabulary"])["words"] and "dlcli.pixel_scale" not in props


def test_default_output_is_in_the_run(tmp_path):
    run = train_tiny(tmp_path, runner)
    result = runner.invoke(app, ["export", str(run), "--weights", "last", "--opset", "13"])
    assert result.exit_code == 0, result.output
    assert (run / "model.onnx").is_file()


def test_unmappable_layer_fails_naming_it_and_writes_nothing(tmp_path, monkeypatch):
    run = train_tiny(tmp_path, runner)
    monkeypatch.delattr(Dense, "to_onnx")
    result = runner.invoke(app, ["export", str(run), "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "layer 'dense' (Dense) has no ONNX mapping" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx*"))


def test_outputs_that_differ_from_dlcli_are_an_error_and_nothing_is_written(tmp_path, monkeypatch):
    run = train_tiny(tmp_path, runner)
    real = Dense.to_onnx

    def dense_without_bias(layer, g, x, in_shape, mask):
        layer.use_bias, saved = False, layer.use_bias
        try:
            return real(layer, g, x, in_shape, mask)
        finally:
            layer.use_bias = saved

    monkeypatch.setattr(Dense, "to_onnx", dense_without_bias)
    result = runner.invoke(app, ["export", str(run), "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "differ from dlcli's by up to" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_bad_opset_is_a_usage_error(tmp_path):
    run = train_tiny(tmp_path, runner)
    result = runner.invoke(app, ["export", str(run), "--opset", "7"])
    assert result.exit_code == 2 and "--opset must be between 13" in result.output


def test_missing_extra_names_the_pip_install(tmp_path, monkeypatch):
    run = train_tiny(tmp_path, runner)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    result = runner.invoke(app, ["export", str(run)])
    assert result.exit_code == 1
    assert result.output.strip().endswith("pip install 'dlcli[onnx]'") and len(result.output.strip().splitlines()) == 1


def test_exporting_a_run_still_training_warns(tmp_path):
    """Was silent (issue 28): the file holds whichever weights the run had saved when export read them."""
    run = train_tiny(tmp_path, runner)
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "status": "running", "end": None}))
    result = runner.invoke(app, ["export", str(run), "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert f"warning: {run} has not finished (meta.json says running: still training, or killed)" in \
        " ".join(result.output.split())
    assert (tmp_path / "m.onnx").is_file()
