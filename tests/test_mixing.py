"""train.mix: Keras' MixUp and CutMix on each training batch's inputs and targets (dlcli/mixing.py)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dlcli import mixing
from dlcli.cli import app

FIXTURE = Path(__file__).parent / "fixtures" / "keras" / "catalogue_mixing.npz"
runner = CliRunner()


def _cases():
    data = np.load(FIXTURE)
    return [pytest.param(case, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")},
                         id=case["type"]) for i, case in enumerate(json.loads(str(data["spec"])))]


@pytest.mark.parametrize("spec,arrays", _cases())
def test_mixing_matches_keras(spec, arrays):
    """Keras 3.15's transform_images and transform_labels given the same draw (make_catalogue.py mixing)."""
    mix = mixing.get(spec)
    draw = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("draw/")}
    if spec["type"] == "CutMix":
        draw = mix.boxes(arrays["x"].shape, draw["beta"], draw["x_position"], draw["y_position"],
                         draw["permutation"])
    mix.draw = lambda xs, rng: draw
    xs, ys, partner, _ = mix.mix([arrays["x"]], [arrays["labels"]], None, sparse=False)
    assert partner is None
    np.testing.assert_allclose(xs[0], arrays["y"], rtol=1e-12)
    np.testing.assert_allclose(ys[0], arrays["mixed_labels"], rtol=1e-12)


def test_cut_mix_draws_boxes_of_the_drawn_share():
    x = np.arange(4 * 8 * 8 * 1, dtype=np.float32).reshape(4, 8, 8, 1)
    mix, rng = mixing.CutMix(seed=0), np.random.default_rng(1)
    for _ in range(5):
        drawn = mix.draw([x], rng)
        moved = drawn["permutation"] != np.arange(4)  # an image drawn as its own partner keeps its pixels
        replaced = (mix.mix_inputs([x], drawn)[0] != x).mean((1, 2, 3))
        # the box's pixel share is its unrounded area, to within the pixels its edges cut
        assert np.all(np.abs(replaced - (1 - drawn["mix_weight"]))[moved] <= 2 * 8 / 64 + 1e-9)
        assert np.all(replaced[~moved] == 0)


def _write_config(tmp_path, name, labels, loss, mix, extra=None):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, 6, 6, 3)).astype(np.float32)
    y = (x[..., 0].mean((1, 2)) > 0.5).astype(np.int64) + (x[..., 1].mean((1, 2)) > 0.5)
    np.savez(tmp_path / f"{name}.npz", x=x, y=np.eye(3, dtype=np.float32)[y] if labels == "one-hot" else y)
    config = {
        "name": name, "seed": 0, "data": {"type": "npz", "path": str(tmp_path / f"{name}.npz")},
        "model": {"input_shape": [6, 6, 3], "layers": [
            {"type": "RandomFlip", "mode": "horizontal"}, {"type": "Conv2D", "filters": 4, "kernel_size": 3,
                                                           "activation": "relu"},
            {"type": "GlobalAveragePooling2D"}, {"type": "Dense", "units": 3, "activation": "softmax"}]},
        "compile": {"optimizer": {"type": "adam", "learning_rate": 0.01}, "loss": loss, "metrics": ["accuracy"]},
        "train": {"epochs": 2, "batch_size": 16, "validation_split": 0.25, "mix": mix, **(extra or {})},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(tmp_path, config):
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs"), "-q"])
    return result, (tmp_path / "runs" / result.output.strip().splitlines()[-1].split("/")[-1]
                    if result.exit_code == 0 else None)


def _history(run):
    with open(run / "history.csv") as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.parametrize("mix", [{"type": "MixUp", "alpha": 0.4}, {"type": "CutMix"}], ids=["MixUp", "CutMix"])
def test_class_labels_train_as_keras_mixed_one_hot_targets(tmp_path, mix):
    """The same data as one-hot targets (categorical_crossentropy: the targets mixed, as Keras mixes labels) and as
    class labels (sparse_categorical_crossentropy: the two labels' losses weighed w and 1 - w) trains to the same
    weights, loss and accuracy from the CLI: cross-entropy is linear in its target."""
    one_hot = _train(tmp_path, _write_config(tmp_path, "onehot", "one-hot", "categorical_crossentropy", mix))
    labels = _train(tmp_path, _write_config(tmp_path, "labels", "labels", "sparse_categorical_crossentropy", mix))
    plain = _train(tmp_path, _write_config(tmp_path, "plain", "labels", "sparse_categorical_crossentropy", None))
    for result, _ in (one_hot, labels, plain):
        assert result.exit_code == 0, result.output
    a, b, c = (_history(run) for _, run in (one_hot, labels, plain))
    for row_a, row_b in zip(a, b):
        for key in row_a:
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-5, abs=1e-6), key
    assert a[-1]["loss"] != pytest.approx(c[-1]["loss"], rel=1e-3)  # the mix changed training
    wa, wb = (np.load(run / "weights" / "last.npz") for _, run in (one_hot, labels))
    for key in wa.files:
        np.testing.assert_allclose(wa[key], wb[key], rtol=1e-4, atol=1e-6)
    saved = yaml.safe_load((labels[1] / "config.yaml").read_text())
    assert saved["train"]["mix"] == mix and "mix" not in yaml.safe_load((plain[1] / "config.yaml").read_text())["train"]


def test_bad_mix_fails_before_the_run_with_its_path(tmp_path):
    config = _write_config(tmp_path, "bad", "labels", "sparse_categorical_crossentropy", {"type": "MixUp", "alpha": 0})
    result, _ = _train(tmp_path, config)
    assert result.exit_code == 2 and "MixUp: alpha must be a number > 0" in result.output
    config = _write_config(tmp_path, "typo", "labels", "sparse_categorical_crossentropy", {"type": "Mixup"})
    result, _ = _train(tmp_path, config)
    assert result.exit_code == 2 and "train.mix.type" in result.output and "did you mean 'MixUp'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_cut_mix_needs_images(tmp_path):
    from tests.runs_fixture import write_tiny_config

    result = runner.invoke(app, ["train", write_tiny_config(tmp_path, mix="CutMix"), "--runs-dir",
                                 str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 2 and "CutMix cuts boxes out of images" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()
