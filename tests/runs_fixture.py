"""A tiny config on a small .npz and a finished run made from it, shared by the plot/runs/predict/check tests."""
import numpy as np
import yaml

from dlcli.cli import app

CLASSES = ["low", "mid", "high"]


def write_class_npz(path, samples: int, features: int = 8, *, test: int, seed: int = 0, threshold: float = 1.0,
                    held_out: bool = True):
    """The tests' tiny classification data: x ~ N(0, 1) of shape (samples, features), three classes
    y = (x0 > 0) + (x1 > threshold) that a small Dense net learns in a few epochs. The test set is the last `test`
    samples, held out of training (held_out), or the first `test` training samples again."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > threshold)
    if held_out:
        np.savez(path, x=x[:-test], y=y[:-test], x_test=x[-test:], y_test=y[-test:])
    else:
        np.savez(path, x=x, y=y, x_test=x[:test], y_test=y[:test])
    return path


def write_tiny_config(tmp_path, **train) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4, 4)).astype(np.float32)
    s = x.sum((1, 2))
    y = np.digitize(s, np.quantile(s, [1 / 3, 2 / 3]))
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    config = {
        "name": "tiny", "seed": 0,
        "data": {"type": "npz", "path": str(tmp_path / "tiny.npz"), "test_split": 0.25, "classes": CLASSES},
        "model": {"input_shape": [4, 4], "layers": [{"type": "Flatten"},
                                                      {"type": "Dense", "units": 8, "activation": "relu"},
                                                      {"type": "Dense", "units": 3, "activation": "softmax"}]},
        "compile": {"optimizer": {"type": "adam", "learning_rate": 0.01},
                    "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "train": {"epochs": 2, "batch_size": 16, "validation_split": 0.25, **train},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def train_tiny(tmp_path, runner, name="tiny", **train):
    config = write_tiny_config(tmp_path, **train)
    result = runner.invoke(app, ["train", config, "--runs-dir", str(tmp_path / "runs"), "--name", name, "-q"])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / result.output.strip().splitlines()[-1].split("/")[-1]
