import numpy as np
import pytest
from typer.testing import CliRunner

from dlcli import builder
from dlcli.builder import build_model
from dlcli.cli import app
from dlcli.config import Config, load_config
from dlcli.diagnostics import dead_fraction, first_batch, trace_batch
from tests.runs_fixture import write_tiny_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_grad_check_passes_and_catches_a_wrong_backward(tmp_path, monkeypatch):
    config = write_tiny_config(tmp_path)
    result = invoke("check", "grad", config)
    assert result.exit_code == 0, result.output
    assert "dense_1" in result.output and "input" in result.output and "passed" in result.output

    from dlcli.layers.core import Dense

    backward = Dense.backward

    def doubled_bias(self, grad):
        out = backward(self, grad)
        self.params["bias"].grad *= 2
        return out

    monkeypatch.setattr(Dense, "backward", doubled_bias)
    result = invoke("check", "grad", config, "--samples", "2", "--set", "model.layers.1.units=5")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "dense/bias" in result.output and "dense_1/bias" in result.output
    assert "dense/kernel" not in result.output.split("FAILED")[1]


def test_overfit_passes_then_fails_with_a_reason(tmp_path):
    config = write_tiny_config(tmp_path)
    result = invoke("check", "overfit", config, "--steps", "300")
    assert result.exit_code == 0, result.output
    assert "overfit passed" in result.output and "accuracy (inference mode)" in result.output
    result = invoke("check", "overfit", config, "--steps", "3", "--set", "compile.optimizer.learning_rate=1e-6")
    assert result.exit_code == 1 and "did not fall" in result.output
    result = invoke("check", "overfit", config, "--steps", "20", "--set", "compile.optimizer.learning_rate=1e9")
    assert result.exit_code == 1 and "training diverged" in result.output, result.output  # train_step's gate


def test_determinism_passes_and_catches_unseeded_initialisation(tmp_path, monkeypatch):
    config = write_tiny_config(tmp_path)
    result = invoke("check", "determinism", config, "--samples", "48")
    assert result.exit_code == 0, result.output
    assert "4 weight arrays identical" in result.output
    seeded = builder.model_from_config
    monkeypatch.setattr(builder, "model_from_config", lambda spec, rng: seeded(spec, np.random.default_rng()))  # unseeded
    result = invoke("check", "determinism", config, "--samples", "48")
    assert result.exit_code == 1 and "DIFFERS" in result.output and "dense/kernel" in result.output


def test_trace_reports_statistics_dead_relus_and_hints(tmp_path):
    assert dead_fraction(np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])) == 1 / 3
    config = write_tiny_config(tmp_path)
    cfg = load_config(config)
    model = build_model(cfg)
    model.get_layer("dense").params["bias"].value[:6] = -100.0  # 6 of 8 units can never fire
    xs, ys = first_batch(cfg, model, 16)
    report = trace_batch(model, xs, ys)
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["dense"]["dead"] == 0.75 and rows["dense_1"]["dead"] is None
    assert {p["name"] for p in rows["dense"]["params"]} == {"kernel", "bias"}
    assert any("75% of ReLU units are dead" in h for h in report["hints"])
    assert all(not p.grad.any() for p in model.trainable_weights)  # leaves no gradients behind

    result = invoke("inspect-shapes", config, "--trace")
    assert result.exit_code == 0, result.output
    assert "trace: one training batch of 16" in result.output and "|g w|" in result.output


def test_numeric_grad_perturbs_fortran_ordered_arrays():
    from tests.gradcheck import numeric_grad

    w = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    numeric = numeric_grad(lambda: float((w * np.arange(6.0).reshape(2, 3)).sum()), w)
    assert numeric == {i: pytest.approx(float(i)) for i in range(6)}


@pytest.mark.parametrize("layer", [{"type": "LSTM", "units": 3}, {"type": "GRU", "units": 3},
                                   {"type": "Bidirectional", "layer": {"type": "LSTM", "units": 2}}])
def test_gradient_check_passes_on_recurrent_models(layer):
    """The orthogonal recurrent kernel used to be Fortran-ordered: perturbing a reshape(-1) copy left the numeric
    gradient at 0 and `check grad` reported FAIL on every recurrent model."""
    from dlcli.diagnostics import gradient_check
    from dlcli.engine.initializers import INITIALIZERS

    assert INITIALIZERS.get("orthogonal")()((4, 12), np.random.default_rng(0)).flags.c_contiguous
    cfg = {"name": "rnn", "seed": 0, "data": {"type": "none"},
           "model": {"input_shape": [5, 2], "layers": [layer, {"type": "Dense", "units": 1}]},
           "compile": {"optimizer": "sgd", "loss": "mse"}}
    model = build_model(Config.model_validate(cfg))  # every default filled in
    rng = np.random.default_rng(0)
    rows = gradient_check(model, [rng.normal(size=(3, 5, 2))], [rng.normal(size=(3, 1))], entries=4)
    assert any("recurrent_kernel" in r["weight"] for r in rows)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
