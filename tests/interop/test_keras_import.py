"""`dlcli import-keras` on files saved by real Keras 3 (tests/fixtures/keras, made by make_fixtures.py): dlcli's
predictions match the outputs Keras recorded within 1e-5, the run directory works with every other command, and
each threat on the list (code through config.json, HDF5 external storage, links, zip bombs, path traversal) is
refused with nothing written."""
import base64
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

h5py = pytest.importorskip("h5py")

from dlcli.cli import app  # noqa: E402
from dlcli.experiment import load_run_model  # noqa: E402
from tests.runs_fixture import write_class_npz  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "keras"
KERAS_FILES = ["sequential_mlp", "sequential_convnet", "sequential_text", "sequential_sequence", "functional",
               "functional_shared", "functional_misc", "functional_attention",
               "functional_attention_layers", "sequential_transformer",
               "sequential_normalization", "functional_preprocessing", "sequential_core_layers",
               "functional_conv_layers", "sequential_spectral", "sequential_cells", "functional_convnext_layers",
               "functional_inception_resnet_layers",
               "sequential_augmentation", "functional_convlstm", "sequential_image_preprocessing",
               "functional_nested", "sequential_nested", "functional_reversible",
               "mobilenet", "mobilenet_v2"]  # the last two: keras.applications
runner = CliRunner()


def run_import(*args):
    return runner.invoke(app, ["import-keras", *map(str, args)])


def keras_outputs(name, model):
    """(inputs in the model's input order, Keras' recorded outputs in its output order)."""
    data = np.load(FIXTURES / f"{name}.npz")
    xs = [data["x"]] if "x" in data else [data[f"x_{n}"] for n in model.input_names]
    ys = [data["y"]] if "y" in data else [data[f"y_{n}"] for n in model.output_names]
    return xs, ys


def max_difference(run_dir, name):
    _, model = load_run_model(run_dir)
    xs, ys = keras_outputs(name, model)
    out = model.predict(xs if len(xs) > 1 else xs[0])
    return max(float(np.abs(a - b).max()) for a, b in zip(out if isinstance(out, list) else [out], ys))


@pytest.mark.parametrize("name", KERAS_FILES)
def test_predictions_match_keras(tmp_path, name):
    result = run_import(FIXTURES / f"{name}.keras", "--output", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert max_difference(tmp_path / "run", name) <= 1e-5
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "imported" and meta["imported"]["keras_version"].startswith("3.")
    assert len(meta["imported"]["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "run" / "weights").iterdir()) == ["best.npz", "last.npz"]


@pytest.mark.parametrize("weights", ["mlp.weights.h5", "mlp_legacy.h5"])
def test_hdf5_weights_with_a_dlcli_config(tmp_path, weights):
    result = run_import(FIXTURES / weights, "--config", FIXTURES / "mlp.yaml", "--output", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert max_difference(tmp_path / "run", "sequential_mlp") <= 1e-5


def test_legacy_full_model_h5_carries_its_own_config(tmp_path):
    result = run_import(FIXTURES / "mlp_legacy.h5", "--output", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert max_difference(tmp_path / "run", "sequential_mlp") <= 1e-5


def test_weights_only_file_without_config_says_what_to_give(tmp_path):
    result = run_import(FIXTURES / "mlp.weights.h5", "--output", tmp_path / "run")
    assert result.exit_code == 2 and "--config" in result.output and not (tmp_path / "run").exists()


def test_config_that_does_not_match_the_weights_names_the_layer(tmp_path):
    config = (FIXTURES / "mlp.yaml").read_text().replace("units: 16", "units: 12")
    (tmp_path / "wrong.yaml").write_text(config)
    result = run_import(FIXTURES / "mlp.weights.h5", "--config", tmp_path / "wrong.yaml", "--output", tmp_path / "r")
    assert result.exit_code == 1 and "shape (8, 16) in the file but the model expects (8, 12)" in result.output
    assert not (tmp_path / "r").exists()


def test_imported_run_works_with_every_command(tmp_path):
    write_class_npz(tmp_path / "data.npz", 40, test=1, held_out=False)  # x_test unused: the run's test_split
    run = tmp_path / "run"
    result = run_import(FIXTURES / "sequential_mlp.keras", "--output", run, "--set", "data.type=npz",
                        "--set", f"data.path={tmp_path / 'data.npz'}", "--set", "data.test_split=0.5")
    assert result.exit_code == 0, result.output
    for args in (["inspect-shapes", run / "config.yaml"], ["evaluate", run],
                 ["predict", run, FIXTURES / "sequential_mlp.npz", "--key", "x"],
                 ["export", run, "--output", tmp_path / "mlp.onnx"],
                 ["train", run / "config.yaml", "--init-from", run, "--runs-dir", tmp_path / "runs", "-q"]):
        result = runner.invoke(app, list(map(str, args)))
        assert result.exit_code == 0, (args, result.output)
    assert "largest difference" in runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "b.onnx")]).output


def test_export_of_an_imported_model_without_data_checks_on_random_inputs(tmp_path):
    assert run_import(FIXTURES / "sequential_text.keras", "--output", tmp_path / "run").exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "seeded random inputs" in result.output
    evaluate = runner.invoke(app, ["evaluate", str(tmp_path / "run")])
    assert evaluate.exit_code == 2 and "no dataset" in evaluate.output


def test_existing_output_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    result = run_import(FIXTURES / "sequential_mlp.keras", "--output", tmp_path / "run")
    assert result.exit_code == 2 and "already exists" in result.output
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]


def test_missing_extra_names_the_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    result = run_import(FIXTURES / "sequential_mlp.keras", "--output", tmp_path / "run")
    assert result.exit_code == 1 and result.output.strip().endswith("pip install 'dlcli[keras]'")


# --- the threat list: one test each, on doctored copies of a real Keras file ------------------------------------------
def doctored(tmp_path, config=None, weights=None, members=()) -> Path:
    """sequential_mlp.keras with config.json / model.weights.h5 replaced and extra (ZipInfo, bytes) members."""
    source = zipfile.ZipFile(FIXTURES / "sequential_mlp.keras")
    out = tmp_path / "doctored.keras"
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("metadata.json", source.read("metadata.json"))
        z.writestr("config.json", config if isinstance(config, bytes) else json.dumps(config) if config is not None
                   else source.read("config.json"))
        if not isinstance(weights, zipfile.ZipInfo):
            z.writestr("model.weights.h5", weights if weights is not None else source.read("model.weights.h5"))
        for info, data in members:
            z.writestr(info, data)
    return out


def mlp_config():
    return json.loads(zipfile.ZipFile(FIXTURES / "sequential_mlp.keras").read("config.json"))


def refused(tmp_path, path, *needles):
    result = run_import(path, "--output", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert all(n in result.output for n in needles), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.*"))
    return result.output


def test_code_in_a_lambda_layer_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    code = compile(f"open({str(marker)!r}, 'w').write('x')", "<lambda>", "exec")
    import marshal

    config = mlp_config()
    config["config"]["layers"].insert(2, {"module": "keras.layers", "class_name": "Lambda", "registered_name": None,
                                          "config": {"name": "evil", "function": {
                                              "class_name": "__lambda__", "config": {
                                                  "code": base64.b64encode(marshal.dumps(code)).decode()}}}})
    refused(tmp_path, doctored(tmp_path, config), "layer 'evil' is a Keras Lambda", "never runs")
    assert not marker.exists()


@pytest.mark.parametrize("doctor, needle", [
    (lambda layer: layer.update(module="evil.layers", class_name="Backdoor"), "from module 'evil.layers'"),
    # a name that starts like Keras' is not Keras: the module must be `keras` or `keras.<something>`
    (lambda layer: layer.update(module="keras_evil.layers"),
     "class 'Dense' from module 'keras_evil.layers', outside Keras"),
    (lambda layer: layer.update(registered_name="MyPackage>Dense"), "registered as 'MyPackage>Dense'"),
    (lambda layer: layer["config"].update(kernel_initializer={"module": "os", "class_name": "system",
                                                              "config": {"command": "id"}}), "module 'os'"),
    (lambda layer: layer.update(class_name="TFSMLayer"), "Keras TFSMLayer, which dlcli does not have"),
    # KerasHub's module and registered name pass only for KerasHub layers dlcli has, with KerasHub's own name
    (lambda layer: layer.update(module="keras_hub.src.layers.modeling.dense", registered_name="keras_hub>Dense"),
     "from module 'keras_hub.src.layers.modeling.dense', outside Keras"),
    (lambda layer: layer.update(module="keras_hub.src.layers.modeling.transformer_encoder",
                                class_name="TransformerEncoder", registered_name="evil>TransformerEncoder"),
     "outside Keras"),
    (lambda layer: layer.update(module="keras_hub_evil.layers", class_name="TransformerEncoder",
                                registered_name="keras_hub>TransformerEncoder"), "outside Keras"),
    (lambda layer: layer.update(class_name="MixUp"), "is a Keras MixUp, which mixes labels as well as images: dlcli "
                                                     "applies it to training batches with train.mix"),
], ids=["foreign-module", "keras-lookalike-module", "custom-registered", "foreign-initializer", "unknown-class",
        "keras-hub-module-for-a-keras-layer", "keras-hub-layer-registered-elsewhere", "keras-hub-lookalike-module",
        "mix-up-in-a-model"])
def test_custom_and_foreign_objects_are_refused_by_name(tmp_path, doctor, needle):
    config = mlp_config()
    doctor(config["config"]["layers"][1])
    refused(tmp_path, doctored(tmp_path, config), needle)


def test_unsupported_argument_value_names_layer_and_argument(tmp_path):
    config = mlp_config()
    config["config"]["layers"][1]["config"]["quantization_config"] = {"mode": "int8"}
    refused(tmp_path, doctored(tmp_path, config), "argument 'quantization_config'")


def weights_file(change) -> bytes:
    """The fixture's weights, copied into a new in-memory HDF5 file, then changed by `change(file)`."""
    original = h5py.File(io.BytesIO(zipfile.ZipFile(FIXTURES / "sequential_mlp.keras").read("model.weights.h5")), "r")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for key in original:
            original.copy(original[key], f, key)
        change(f)
    return buffer.getvalue()


def test_hdf5_external_storage_reading_a_host_file_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    np.full((8, 16), 7.0, np.float32).tofile(secret)  # what an attacker would exfiltrate into the weights

    def external(f):
        del f["layers/dense/vars/0"]
        f["layers/dense/vars"].create_dataset("0", shape=(8, 16), dtype="f4", external=[(str(secret), 0, 512)])

    refused(tmp_path, doctored(tmp_path, weights=weights_file(external)), "external storage", str(secret))


@pytest.mark.parametrize("link, needle", [
    (lambda f, tmp: h5py.SoftLink("/layers/dense_1/vars/0"), "a soft link"),
    (lambda f, tmp: h5py.ExternalLink(str(tmp / "other.h5"), "/data"), "an external link"),
], ids=["soft", "external"])
def test_hdf5_links_are_refused(tmp_path, link, needle):
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["data"] = np.ones((8, 16), np.float32)

    def relink(f):
        del f["layers/dense/vars/0"]
        f["layers/dense/vars/0"] = link(f, tmp_path)

    refused(tmp_path, doctored(tmp_path, weights=weights_file(relink)), needle, "layers/dense/vars/0")


def test_hdf5_virtual_dataset_is_refused(tmp_path):
    with h5py.File(tmp_path / "source.h5", "w") as other:
        other["data"] = np.ones((8, 16), np.float32)

    def virtual(f):
        del f["layers/dense/vars/0"]
        layout = h5py.VirtualLayout(shape=(8, 16), dtype="f4")
        layout[:] = h5py.VirtualSource(str(tmp_path / "source.h5"), "data", shape=(8, 16))
        f["layers/dense/vars"].create_virtual_dataset("0", layout)

    refused(tmp_path, doctored(tmp_path, weights=weights_file(virtual)), "virtual dataset")


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    bomb = zipfile.ZipInfo("model.weights.h5")
    bomb.compress_type = zipfile.ZIP_DEFLATED
    path = doctored(tmp_path, weights=bomb, members=[(bomb, b"\0" * (64 << 20))])  # 64 MiB of zeros -> ~64 KiB
    assert zipfile.ZipFile(path).getinfo("model.weights.h5").compress_size < 1 << 20
    refused(tmp_path, path, "likely zip bomb", "model.weights.h5")


def test_member_over_its_size_limit_is_refused_at_any_compression_ratio(tmp_path, monkeypatch):
    """The size limit holds on its own: a stored (1:1) member over it is refused from the directory, whatever the
    ratio (the limit is lowered here so the test need not write a 16 MiB config.json)."""
    from dlcli.interop import keras_files

    path = doctored(tmp_path)
    size = zipfile.ZipFile(path).getinfo("config.json").file_size
    assert zipfile.ZipFile(path).getinfo("config.json").compress_type == zipfile.ZIP_STORED
    monkeypatch.setitem(keras_files.MEMBER_LIMITS, "config.json", size - 1)
    refused(tmp_path, path, f"member 'config.json' declares {size:,} bytes, over dlcli's limit of {size - 1:,}")


def test_hdf5_dataset_declaring_more_than_it_stores_is_refused(tmp_path):
    """A chunked dataset with no chunks written declares 64 MiB and stores nothing: HDF5 would hand out fill
    values for all of it (a decompression bomb in effect)."""
    def hollow(f):
        f["layers/dense/vars"].create_dataset("9", shape=(1 << 20, 16), dtype="f4", chunks=(1024, 16))

    refused(tmp_path, doctored(tmp_path, weights=weights_file(hollow)), "dataset '/layers/dense/vars/9' declares "
            f"{(1 << 20) * 16 * 4:,} bytes but stores 0", "decompression bomb")


@pytest.mark.parametrize("member", ["../../escaped.txt", "/tmp/dlcli-absolute.txt", "assets/../../x.txt"])
def test_path_traversal_members_are_refused_and_nothing_is_extracted(tmp_path, member, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = doctored(tmp_path, members=[(zipfile.ZipInfo(member), b"owned")])
    refused(tmp_path, path, f"unexpected archive member '{member}'")
    assert not list(tmp_path.parent.glob("escaped.txt")) and not Path("/tmp/dlcli-absolute.txt").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
def test_non_finite_weights_are_refused_naming_layer_and_variable(tmp_path, value):
    """Was: imported, and predict showed '0 (nan)' for every input (issue 28). 1e300 in float64 overflows float32."""
    def poisoned(f):
        kernel = f["layers/dense/vars/0"][()].astype(np.float64)
        kernel[2, 5] = value
        del f["layers/dense/vars/0"]
        f["layers/dense/vars"].create_dataset("0", data=kernel)

    refused(tmp_path, doctored(tmp_path, weights=weights_file(poisoned)),
            "weight 'dense/kernel' (/layers/dense/vars/0) holds 1 non-finite value (NaN or inf, the first at index "
            "(2, 5))")


def _lying_directory(path: Path, member: bytes, shrink: int):
    """Make the central directory declare `member` `shrink` bytes smaller than it stores."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at != -1:
        length = struct.unpack("<H", data[at + 28:at + 30])[0]
        if data[at + 46:at + 46 + length] == member:
            for offset in (20, 24):  # compressed and uncompressed size
                size = struct.unpack("<I", data[at + offset:at + offset + 4])[0]
                data[at + offset:at + offset + 4] = struct.pack("<I", size - shrink)
        at = data.find(b"PK\x01\x02", at + 1)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("member", [b"config.json", b"model.weights.h5"])
def test_a_zip_directory_lying_about_a_member_size_is_one_line(tmp_path, member):
    path = doctored(tmp_path)
    _lying_directory(path, member, 50)
    refused(tmp_path, path, f"member '{member.decode()}' does not match its directory entry")


def test_deeply_nested_json_is_one_line(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    refused(tmp_path, doctored(tmp_path, config=deep), "config.json nests JSON arrays or objects too deeply")


def test_weight_shape_is_checked_against_the_config_before_reading(tmp_path):
    def bigger(f):
        del f["layers/dense/vars/0"]
        f["layers/dense/vars"].create_dataset("0", data=np.zeros((8, 17), np.float32))

    result = run_import(doctored(tmp_path, weights=weights_file(bigger)), "--output", tmp_path / "run")
    assert result.exit_code == 1 and "shape (8, 17) in the file but the model expects (8, 16)" in result.output


@pytest.mark.parametrize("name", [n for n in KERAS_FILES if n != "functional_preprocessing"])  # FarmHash: below
def test_keras_to_onnx_matches_keras_in_onnxruntime(tmp_path, name):
    """The whole way round: a file saved by Keras, imported, exported, run by onnxruntime, against Keras' outputs."""
    pytest.importorskip("onnxruntime")
    from dlcli.interop.onnx_export import run_onnx, to_onnx

    assert run_import(FIXTURES / f"{name}.keras", "--output", tmp_path / "run").exit_code == 0
    _, model = load_run_model(tmp_path / "run")
    xs, ys = keras_outputs(name, model)
    got = run_onnx(to_onnx(model).SerializeToString(), dict(zip(model.input_names, xs)))
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ys)) <= 1e-5


def test_malformed_config_is_a_clear_error(tmp_path):
    config = mlp_config()
    config["config"]["layers"] = [{"class_name": "Dense", "config": "not a mapping"}]
    refused(tmp_path, doctored(tmp_path, config), "does not have the structure Keras writes")


def test_keras_operations_are_not_taken_for_layers(tmp_path):
    config = json.loads(zipfile.ZipFile(FIXTURES / "functional_misc.keras").read("config.json"))
    op = next(e for e in config["config"]["layers"] if e["class_name"] == "NotEqual")
    op["class_name"] = op["registered_name"] = "Maximum"  # keras.src.ops.numpy.Maximum: also a dlcli layer name
    refused(tmp_path, doctored(tmp_path, config), "an operation rather than a layer")
    op["class_name"] = op["registered_name"] = "Add"  # mapped, but only on tensors and numbers
    op["inbound_nodes"][0]["args"][1] = [1.0, 2.0]
    refused(tmp_path, doctored(tmp_path, config), "'not_equal' is keras.ops.add on", "two tensors, or on a tensor and")


def test_a_nested_functional_model_is_refused_as_what_it_is(tmp_path):
    config = json.loads(zipfile.ZipFile(FIXTURES / "functional_nested.keras").read("config.json"))
    head = next(e for e in config["config"]["layers"] if e["class_name"] == "Sequential" and e["name"] == "head")
    head["class_name"], head["module"] = "Functional", "keras.src.models.functional"
    refused(tmp_path, doctored(tmp_path, config), "layer 'head' is a Keras Functional model nested in another model")


def test_an_explicit_mask_other_than_maskings_is_refused(tmp_path):
    config = json.loads(zipfile.ZipFile(FIXTURES / "functional_misc.keras").read("config.json"))
    masking = next(e for e in config["config"]["layers"] if e["class_name"] == "Masking")
    masking["config"]["mask_value"] = 1.0  # the recorded mask (x != 0) is no longer the one Masking gives
    refused(tmp_path, doctored(tmp_path, config), "layer 'rnn' is called with mask")


def test_an_imported_runs_edited_config_is_refused(tmp_path):
    run = tmp_path / "run"
    assert run_import(FIXTURES / "sequential_mlp.keras", "--output", run).exit_code == 0
    text = (run / "config.yaml").read_text()
    assert "activation: relu" in text
    (run / "config.yaml").write_text(text.replace("activation: relu", "activation: tanh", 1))
    result = runner.invoke(app, ["predict", str(run), str(FIXTURES / "sequential_mlp.npz"), "--key", "x"])
    assert result.exit_code == 2 and "edited after the run was trained" in result.output, result.output


def test_a_dataset_that_does_not_fit_the_model_is_refused(tmp_path):
    from tests.conftest import require_dataset

    require_dataset("mnist")
    result = run_import(FIXTURES / "sequential_mlp.keras", "--output", tmp_path / "run", "--set", "data.type=mnist")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    assert "data.type mnist does not fit model" in result.output
    output = " ".join(result.output.split())
    assert "expects samples of shape (8,)" in output and "the data has (28, 28)" in output


def test_optimizer_and_initializer_arguments_reached_through_the_base_class_are_kept():
    """Bound through registry.parameters, as a config is: clipnorm (the Optimizer base class's) and a
    GlorotUniform's seed (VarianceScaling's) were dropped when only the class's own __init__ was read."""
    from dlcli.interop.keras_config import ConfigMapper

    mapper = ConfigMapper([])
    optimizer = {"module": "keras.optimizers", "class_name": "Adam",
                 "config": {"learning_rate": 0.01, "clipnorm": 1.0, "weight_decay": None}}
    compiled = mapper.compile({"optimizer": optimizer, "loss": "mean_squared_error"}, ["out"], ["linear"])
    assert compiled["optimizer"] == {"type": "adam", "learning_rate": 0.01, "clipnorm": 1.0}
    initializer = {"module": "keras.initializers", "class_name": "GlorotUniform", "config": {"seed": 7}}
    assert mapper._initializer(initializer, "kernel_initializer") == {"type": "glorot_uniform", "seed": 7}


def test_a_multi_optimizer_comes_with_its_map():
    """Keras 3.15's serialized MultiOptimizer (as model.save writes compile_config) becomes dlcli's spec; one mapping
    with a Python function cannot, and leaves rmsprop with a note."""
    from dlcli.interop.keras_config import _optimizer
    from dlcli.optimizers import get

    def keras(kind, **config):
        return {"module": "keras.optimizers", "class_name": kind, "config": config, "registered_name": None}

    saved = keras("MultiOptimizer", name="multi_optimizer", loss_scale_factor=None, optimizer_map=keras(
        "OptimizerMap", default_optimizer=keras("Adam", learning_rate=0.009999999776482582, beta_1=0.9),
        optimizer_map={"enc/.*": keras("SGD", learning_rate=0.10000000149011612, momentum=0.0)}))
    spec, missing = _optimizer(saved)
    assert missing is None and spec == {"type": "MultiOptimizer", "optimizer_map": {
        "default_optimizer": {"type": "adam", "learning_rate": 0.01, "beta_1": 0.9},
        "optimizer_map": {"enc/.*": {"type": "sgd", "learning_rate": 0.1, "momentum": 0.0}}}}
    assert get(spec).optimizer_map("enc/kernel").current_lr == 0.1
    saved["config"]["optimizer_map"] = {"class_name": "function", "config": "selector"}
    assert _optimizer(saved) == (None, "the MultiOptimizer maps weights with a Python function, not an OptimizerMap")
