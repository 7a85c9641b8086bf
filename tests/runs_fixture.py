"""A tiny config on a small .npz and a finished run made from it, shared by the plot/runs/predict/check tests."""
import numpy as np
import yaml

from dlcli.cli import app

CLASSES = ["low", "mid", "high"]


def write_class_npz(path, samples: int, features: int = 8, *, test: int, seed: int = 0, threshold: float = 1.0,
                    held_out: bool = True, scale: float = 1.0):
    """The tests' tiny classification data: x ~ N(0, 1) of shape (samples, features), three classes
    y = (x0 > 0) + (x1 > threshold) that a small Dense net learns in a few epochs, then x times `scale`. The test set
    is the last `test` samples, held out of training (held_out), or the first `test` training samples again."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > threshold)
    x *= scale
    if held_out:
        np.savez(path, x=x[:-test], y=y[:-test], x_test=x[-test:], y_test=y[-test:])
    else:
        np.savez(path, x=x, y=y, x_test=x[:test], y_test=y[:test])
    return path


def class_config(data, features: int = 8, units: int = 8, **sections) -> dict:
    """The tests' tiny classifier on write_class_npz's data (`data` its path, the test split its x_test/y_test):
    Dense(units, relu) -> Dense(3, softmax) on `features` inputs, adam at 0.01, sparse categorical cross-entropy and
    accuracy, 3 epochs of batches of 16 with a quarter held out for validation. `sections` replace top-level keys."""
    return {"name": "tiny", "seed": 0,
            "data": {"type": "npz", "path": str(data), "x_test": "x_test", "y_test": "y_test"},
            "model": {"input_shape": [features], "layers": [{"type": "Dense", "units": units, "activation": "relu"},
                                                            {"type": "Dense", "units": 3, "activation": "softmax"}]},
            "compile": {"optimizer": {"type": "adam", "learning_rate": 0.01},
                        "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
            "train": {"epochs": 3, "batch_size": 16, "validation_split": 0.25}, **sections}


def write_yaml(path, config: dict):
    path.write_text(yaml.safe_dump(config))
    return path


def write_tiny_config(tmp_path, x=None, data=None, **train) -> str:
    """tiny.yaml on 96 samples of shape (4, 4) (`x`, else N(0, 1) floats) in three classes by their sum, flattened
    into class_config's network; `data` adds keys to the data section, `train` to the train section."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4, 4)).astype(np.float32) if x is None else x
    s = x.sum((1, 2))
    y = np.digitize(s, np.quantile(s, [1 / 3, 2 / 3]))
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    config = class_config(tmp_path / "tiny.npz", train={"epochs": 2, "batch_size": 16, "validation_split": 0.25,
                                                        **train})
    config["data"] = {"type": "npz", "path": str(tmp_path / "tiny.npz"), "test_split": 0.25, "classes": CLASSES,
                      **(data or {})}
    config["model"] = {"input_shape": [4, 4], "layers": [{"type": "Flatten"}, *config["model"]["layers"]]}
    return str(write_yaml(tmp_path / "tiny.yaml", config))


def train_tiny(tmp_path, runner, name="tiny", x=None, data=None, **train):
    config = write_tiny_config(tmp_path, x, data, **train)
    result = runner.invoke(app, ["train", config, "--runs-dir", str(tmp_path / "runs"), "--name", name, "-q"])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / result.output.strip().splitlines()[-1].split("/")[-1]


def train_text_run(tmp_path, runner):
    """A finished run on integer-encoded texts (Embedding, pooling, softmax) with its vocabulary.json, as
    train_run stores it for text datasets; returns (run directory, vocabulary)."""
    from dlcli import run_files
    from dlcli.data.text import build_vocabulary, encode_texts, tokenize

    texts = ["good great fine", "bad awful poor", "great good", "poor bad"] * 6
    vocabulary = build_vocabulary([tokenize(t) for t in texts], num_words=20, maxlen=5)
    np.savez(tmp_path / "t.npz", x=encode_texts(texts, vocabulary), y=np.array([1, 0, 1, 0] * 6))
    config = {"name": "words", "seed": 0, "data": {"type": "npz", "path": str(tmp_path / "t.npz")},
              "model": {"input_shape": [5], "input_dtype": "int32",
                        "layers": [{"type": "Embedding", "input_dim": 20, "output_dim": 4},
                                   {"type": "GlobalAveragePooling1D"},
                                   {"type": "Dense", "units": 2, "activation": "softmax"}]},
              "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
              "train": {"epochs": 1, "batch_size": 8}}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", str(tmp_path / "w.yaml"), "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "runs").iterdir())
    run_files.atomic_write_json(run_files.RunDir(run_dir).vocabulary, vocabulary)
    return run_dir, vocabulary
