import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from dlcli.cli import app
from dlcli.data import dataset_type
from dlcli.data.inputs import image_geometry
from dlcli.errors import DlcliError
from dlcli.experiment import load_run_model
from tests.runs_fixture import CLASSES, train_text_run, train_tiny

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["predict", *[str(a) for a in args]], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("predict"), runner)


@pytest.fixture(scope="module")
def samples(run):
    return np.load(run.parent.parent / "tiny.npz")["x"][:5]


def test_npy_prints_top_k_with_class_names(run, samples, tmp_path):
    np.save(tmp_path / "x.npy", samples)
    result = invoke(run, tmp_path / "x.npy", "--top-k", "2")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "x.npy:" in line]
    assert len(rows) == 5 and all(sum(c in line for c in CLASSES) == 2 for line in rows)
    np.save(tmp_path / "one.npy", samples[0])  # a single sample without the batch axis
    assert "one.npy:0" in invoke(run, tmp_path / "one.npy").output


def test_outputs_agree_across_formats(run, samples, tmp_path):
    np.savez(tmp_path / "many.npz", a=samples[:2], b=samples)
    with open(tmp_path / "x.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"f{i}" for i in range(16)] + ["label"])
        writer.writerows([list(map(float, s.reshape(-1))) + [0] for s in samples])
    assert invoke(run, tmp_path / "many.npz").exit_code == 1  # several arrays, no 'x': asks for --key
    assert invoke(run, tmp_path / "many.npz", "--key", "b", "-o", tmp_path / "a.npy").exit_code == 0
    result = invoke(run, tmp_path / "x.csv", "-o", tmp_path / "b.csv")
    assert result.exit_code == 0, result.output
    probs = np.load(tmp_path / "a.npy", allow_pickle=False)
    assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    with open(tmp_path / "b.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["input", "predicted", "p_low", "p_mid", "p_high"]
    assert np.allclose([[float(r[f"p_{c}"]) for c in CLASSES] for r in table], probs, atol=1e-5)
    assert [r["predicted"] for r in table] == [CLASSES[i] for i in probs.argmax(1)]


def test_images_are_resized_and_grayscaled(run, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "b.jpg")
    result = invoke(run, tmp_path / "a.png", tmp_path / "b.jpg", "--invert", "--top-k", "1")
    assert result.exit_code == 0, result.output
    assert "a.png" in result.output and "b.jpg" in result.output
    assert image_geometry((28, 28)) == (28, 28, 1) and image_geometry((784,)) == (28, 28, 1)
    assert image_geometry((32, 32, 3)) == (32, 32, 3) and image_geometry((3072,)) == (32, 32, 3)
    with pytest.raises(DlcliError, match="not an image"):
        image_geometry((10,))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert "bad.png: not an image Pillow can read" in invoke(run, tmp_path / "bad.png").output
    from tests.data.test_image_folder import png_header

    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))
    result = invoke(run, tmp_path / "bomb.png")
    assert result.exit_code == 1 and "bomb.png: refused as a possible decompression bomb" in result.output


def test_errors_are_messages(run, tmp_path):
    (tmp_path / "t.txt").write_text("some words\n")
    assert "no vocabulary.json" in invoke(run, tmp_path / "t.txt").output
    assert "does not exist" in invoke(run, tmp_path / "missing.npy").output
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "without pickled objects" in invoke(run, tmp_path / "obj.npy").output
    (tmp_path / "x.xyz").write_text("")
    assert invoke(run, tmp_path / "x.xyz").exit_code == 2
    np.save(tmp_path / "scalar.npy", np.array(1.5))
    assert "scalar.npy: the array is a single value" in invoke(run, tmp_path / "scalar.npy").output
    np.save(tmp_path / "complex.npy", np.ones((2, 4, 4), np.complex64))
    result = invoke(run, tmp_path / "complex.npy")
    assert result.exit_code == 1 and "complex.npy: the array is complex64; expected real numbers" in result.output
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5)))
    assert "expects samples of shape" in invoke(run, tmp_path / "wrong.npy").output
    assert invoke(run, tmp_path / "wrong.npy", "--weights", "worst").exit_code == 2


def test_text_input_uses_the_runs_vocabulary(tmp_path):
    from dlcli.data.text import encode_texts

    run_dir, vocabulary = train_text_run(tmp_path, runner)
    (tmp_path / "in.txt").write_text("good great\n\nawful words never seen\n")
    result = invoke(run_dir, tmp_path / "in.txt")
    assert result.exit_code == 0, result.output
    assert "in.txt:0" in result.output and "in.txt:1" in result.output and "in.txt:2" not in result.output
    # the predictions are the model's on the texts encoded with the run's vocabulary, not any other encoding
    assert invoke(run_dir, tmp_path / "in.txt", "-o", tmp_path / "p.npy").exit_code == 0
    _, model = load_run_model(run_dir)
    expected = model.predict(encode_texts(["good great", "awful words never seen"], vocabulary))
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), expected)
    assert not np.allclose(expected[0], expected[1])  # the two texts are told apart


def test_integer_arrays_get_the_training_scaling_and_floats_pass_through(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (96, 4, 4), dtype=np.uint8)
    run_dir = train_tiny(tmp_path, runner, x=x, data={"rescale": 1 / 255})
    scaled = x[:6].astype(np.float32) / np.float32(255)  # what the npz loader fed the model in training
    np.save(tmp_path / "raw.npy", x[:6])
    np.save(tmp_path / "scaled.npy", scaled)
    for name in ("raw", "scaled"):
        assert invoke(run_dir, tmp_path / f"{name}.npy", "-o", tmp_path / f"{name}-p.npy").exit_code == 0
    raw, done = np.load(tmp_path / "raw-p.npy"), np.load(tmp_path / "scaled-p.npy")
    _, model = load_run_model(run_dir)
    np.testing.assert_array_equal(raw, model.predict(scaled))
    np.testing.assert_array_equal(raw, done)
    assert raw.max() < 0.99  # unscaled 0-255 pixels saturate the softmax at 1.000 / 0.000
    assert "float arrays are taken as already preprocessed" in " ".join(invoke("--help").output.split())


def preprocess(x, spec):
    return dataset_type(spec).preprocess(x)


def test_one_preprocessing_rule_per_dataset():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 4, 4)
    mnist = preprocess(pixels, {"type": "mnist"})
    assert mnist.dtype == np.float32 and mnist.max() == np.float32(1.0)
    np.testing.assert_array_equal(mnist, pixels.astype(np.float32) / np.float32(255))  # the book recipe, bit for bit
    assert preprocess(pixels, {"type": "mnist", "normalize": False}).max() == 255.0
    words = np.array([[3, 1, 0]], np.int32)
    assert preprocess(words, {"type": "imdb"}).dtype == np.int32  # word indices stay indices
    assert preprocess(words, {"type": "npz"}).dtype == np.int32
    floats = np.full((2, 3), 0.5, np.float64)
    np.testing.assert_array_equal(preprocess(floats, {"type": "mnist"}), floats.astype(np.float32))  # as given
    assert preprocess(words, {"type": "csv"}).dtype == np.float32


def test_invert_flips_the_pixels_and_a_light_background_hints_at_it(run, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    ink = rng.integers(0, 60, (4, 4), dtype=np.uint8)
    ink[1:3, 1:3] = 250
    Image.fromarray(ink).save(tmp_path / "dark.png")  # light ink on black, as MNIST
    Image.fromarray(255 - ink).save(tmp_path / "paper.png")  # the same digit in dark ink on paper
    for args, out in (([tmp_path / "paper.png", "--invert"], "inv"), ([tmp_path / "dark.png"], "dark"),
                      ([tmp_path / "paper.png"], "paper")):
        assert invoke(run, *args, "-o", tmp_path / f"{out}.npy").exit_code == 0
    inverted, dark, paper = (np.load(tmp_path / f"{n}.npy") for n in ("inv", "dark", "paper"))
    np.testing.assert_array_equal(inverted, dark)
    assert not np.array_equal(inverted, paper)
    from dlcli.data.inputs import read_inputs

    _, model = load_run_model(run)
    with pytest.warns(UserWarning, match="--invert"):
        read_inputs([tmp_path / "paper.png"], run, {"type": "mnist"}, model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_inputs([tmp_path / "dark.png"], run, {"type": "mnist"}, model)
        read_inputs([tmp_path / "paper.png"], run, {"type": "mnist"}, model, invert=True)


@pytest.mark.slow
def test_uint8_mnist_arrays_predict_as_the_float_test_set(tmp_path):
    """The issue's reproduction: a uint8 .npy on an MNIST run used to skip the / 255 and print 1.000 / 0.000."""
    from tests.conftest import require_dataset

    require_dataset("mnist")
    result = runner.invoke(app, ["train", "configs/mnist.yaml", "--set", "data.limit=300", "--set", "train.epochs=1",
                                 "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "runs").iterdir())
    from dlcli.data import load_dataset

    x = load_dataset({"type": "mnist", "limit": 8, "test_limit": 8}).x_test
    np.save(tmp_path / "u8.npy", np.round(x * 255).astype(np.uint8))
    np.save(tmp_path / "f32.npy", x)
    for name in ("u8", "f32"):
        assert invoke(run_dir, tmp_path / f"{name}.npy", "-o", tmp_path / f"{name}-p.npy").exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "u8-p.npy"), np.load(tmp_path / "f32-p.npy"), atol=1e-6)


TWO_OUTPUTS = """
name: two-heads
seed: 0
data: {type: npz, path: heads.npz, y: {kind: y, big: y_big}}
model:
  type: functional
  inputs: [{name: x, shape: [8]}]
  layers:
    - {name: h, type: Dense, units: 8, activation: relu, inputs: x}
    - {name: kind, type: Dense, units: 3, activation: softmax, inputs: h}
    - {name: big, type: Dense, units: 1, activation: sigmoid, inputs: h}
  outputs: [kind, big]
compile:
  optimizer: adam
  loss: {kind: sparse_categorical_crossentropy, big: binary_crossentropy}
train: {epochs: 1, batch_size: 16}
"""


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    """A run whose model has two outputs: a softmax over 3 classes and one sigmoid unit."""
    folder = tmp_path_factory.mktemp("heads")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype(np.float32)
    np.savez(folder / "heads.npz", x=x, y=(x[:, 0] > 0) + (x[:, 1] > 0), y_big=(x[:, 2] > 0).astype(np.float32))
    (folder / "heads.yaml").write_text(TWO_OUTPUTS.replace("heads.npz", str(folder / "heads.npz")))
    result = runner.invoke(app, ["train", str(folder / "heads.yaml"), "--runs-dir", str(folder / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    np.save(folder / "x.npy", x[:5])
    _, model = load_run_model(next((folder / "runs").iterdir()))
    return next((folder / "runs").iterdir()), folder / "x.npy", model.predict(x[:5])


def test_every_output_is_written_as_keras_predict_returns_it(two_heads, tmp_path):
    run_dir, x, (kind, big) = two_heads
    assert kind.shape == (5, 3) and big.shape == (5, 1)
    result = invoke(run_dir, x, "-o", tmp_path / "p.npy")
    assert result.exit_code == 0, result.output
    # one sigmoid unit stays (N, 1), as Keras' predict gives it, not [1 - p, p]
    np.testing.assert_array_equal(np.load(tmp_path / "p_kind.npy"), kind)
    np.testing.assert_array_equal(np.load(tmp_path / "p_big.npy"), big)
    assert not (tmp_path / "p.npy").exists() and "p_kind.npy, " in result.output
    assert invoke(run_dir, x, "-o", tmp_path / "p.npz").exit_code == 0
    with np.load(tmp_path / "p.npz") as saved:
        assert saved.files == ["kind", "big"]
        np.testing.assert_array_equal(saved["big"], big)
    assert invoke(run_dir, x, "-o", tmp_path / "p.csv").exit_code == 0
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["input", "kind_predicted", "kind_p_0", "kind_p_1", "kind_p_2", "big_predicted",
                              "big_p_0", "big_p_1"]
    np.testing.assert_allclose([[float(r[f"kind_p_{j}"]) for j in range(3)] for r in table], kind, rtol=1e-5)
    np.testing.assert_allclose([float(r["big_p_1"]) for r in table], big[:, 0], rtol=1e-5)
    assert [int(r["big_predicted"]) for r in table] == (big[:, 0] > 0.5).astype(int).tolist()
    printed = invoke(run_dir, x).output
    assert "output kind" in printed and "output big" in printed


def test_single_output_npy_and_npz_hold_the_raw_outputs(run, samples, tmp_path):
    np.save(tmp_path / "x.npy", samples)
    assert invoke(run, tmp_path / "x.npy", "-o", tmp_path / "p.npz").exit_code == 0
    with np.load(tmp_path / "p.npz") as saved:
        (name,) = saved.files
        assert saved[name].shape == (5, 3)
    assert "must end in .csv, .npy, .npz" in invoke(run, tmp_path / "x.npy", "-o", tmp_path / "p.txt").output


def test_file_names_that_are_not_utf8_are_written_with_backslash_escapes(run, samples, tmp_path):
    import os

    name = os.fsdecode(b"caf\xe9.npy")  # Latin-1 bytes: not UTF-8, so Python holds the byte as a surrogate
    np.save(tmp_path / name, samples[:2])
    result = invoke(run, tmp_path / name, "-o", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "p.csv").read_text(encoding="utf-8").splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["caf\\xe9.npy:0", "caf\\xe9.npy:1"]
    result = invoke(run, tmp_path / name)
    assert result.exit_code == 0 and "caf\\xe9.npy:1" in result.output


def test_file_names_with_brackets_print_as_they_are(run, samples, tmp_path):
    np.save(tmp_path / "[red]x.npy", samples[:1])  # rich markup in a file name is text, not style
    result = invoke(run, tmp_path / "[red]x.npy")
    assert result.exit_code == 0 and "[red]x.npy:0" in result.output, result.output


CTC_CONFIG = """
name: ctc
seed: 0
data: {{type: npz, path: {path}, x: x, y: y, x_test: x, y_test: y}}
model:
  input_shape: [8, 5]
  layers:
    - {{type: Dense, units: 16, activation: tanh}}
    - {{type: Dense, units: 5}}
compile:
  optimizer: {{type: adam, learning_rate: 0.03}}
  loss: ctc
train: {{epochs: 25, batch_size: 16}}
"""


def test_a_ctc_run_trains_from_yaml_and_predict_prints_its_greedy_decode(tmp_path):
    """Sequences of 8 steps whose one-hot features name a label (1-4) or the blank (0) at each step; the labels
    are the named ones in order, padded with 0. After training, predict shows the greedy decode (and --output
    .csv writes it), which gives the labels back."""
    from typer.testing import CliRunner

    from dlcli.cli import app

    rng = np.random.default_rng(0)
    steps = np.zeros((96, 8), np.int64)
    steps[:, ::2] = rng.integers(1, 5, (96, 4))
    steps[:, 6] = 0  # three labels, blanks between them (repeats stay apart)
    x = np.eye(5, dtype=np.float32)[steps] + rng.normal(0, 0.1, (96, 8, 5)).astype(np.float32)
    y = np.zeros((96, 4), np.int64)
    y[:, :3] = steps[:, [0, 2, 4]]
    np.savez(tmp_path / "seq.npz", x=x, y=y)
    np.save(tmp_path / "few.npy", x[:3])
    config = tmp_path / "ctc.yaml"
    config.write_text(CTC_CONFIG.format(path=tmp_path / "seq.npz"))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    result = runner.invoke(app, ["predict", str(run), str(tmp_path / "few.npy")])
    assert result.exit_code == 0, result.output
    assert "decoded (CTC greedy)" in result.output
    for row in y[:3]:
        assert " ".join(map(str, row[:3])) in result.output
    result = runner.invoke(app, ["predict", str(run), str(tmp_path / "few.npy"), "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("input,decoded,output_0")
    assert [line.split(",")[1] for line in lines[1:]] == [" ".join(map(str, row[:3])) for row in y[:3]]
