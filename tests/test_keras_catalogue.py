"""dlcli against Keras 3 itself: activations, losses, metrics, optimizers and schedules evaluated by real Keras
(tests/fixtures/keras/make_catalogue.py wrote the fixtures, with the case specs, which dlcli takes as they are)."""
import json
from pathlib import Path

import numpy as np
import pytest

from dlcli import losses
from dlcli.engine import activations

FIXTURES = Path(__file__).parent / "fixtures" / "keras"


def _cases(family):
    data = np.load(FIXTURES / f"catalogue_{family}.npz")
    spec = json.loads(str(data["spec"]))
    return [pytest.param(case, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")},
                         id=f"{i}-{case['type']}") for i, case in enumerate(spec)]


@pytest.mark.parametrize("spec,arrays", _cases("activations"))
def test_activation_matches_keras(spec, arrays):
    act = activations.get(dict(spec))
    y = act.forward(arrays["x"].copy())
    np.testing.assert_allclose(y, arrays["y"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(act.backward(arrays["r"]), arrays["grad"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec,arrays", _cases("losses"))
def test_loss_matches_keras(spec, arrays):
    loss = losses.get(dict(spec))
    per_sample, grad = loss.compute(arrays["y_true"], arrays["y_pred"].copy())
    assert per_sample.mean() == pytest.approx(float(arrays["value"]), rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(grad / len(grad), arrays["grad"], rtol=1e-6, atol=1e-9)
    if "per_sample" in arrays:
        np.testing.assert_allclose(per_sample, arrays["per_sample"], rtol=1e-6, atol=1e-9)


def test_sparsemax_follows_the_paper_not_keras_3_15():
    # keras-team/keras#23425: Keras 3.15 gives [0, 0, 0.25] for the first row; the projection onto the simplex is:
    y = activations.get("sparsemax").forward(np.array([[0.0, 0.5, 1.0, -3.0], [0.1, 0.2, 0.3, 0.4], [5, 0, 0, 0]]))
    np.testing.assert_allclose(y, [[0, 0.25, 0.75, 0], [0.1, 0.2, 0.3, 0.4], [1, 0, 0, 0]], atol=1e-12)
    z = np.random.default_rng(0).normal(0, 1, (50, 7))
    np.testing.assert_allclose(activations.get({"type": "sparsemax", "axis": 0}).forward(z).sum(0), 1, rtol=1e-12)


def test_activation_arguments_from_a_config_and_glu_halves_its_axis():
    from dlcli import layers

    layer = layers.LAYERS.get("Activation")(activation={"type": "glu"})
    assert layer.output_shape((3, 8)) == (3, 4)
    assert layer(np.ones((2, 3, 8), np.float32)).shape == (2, 3, 4)
    assert layer.get_config()["activation"] == {"type": "glu"}
    with pytest.raises(Exception, match="did you mean 'soft_shrink'"):
        activations.get("softshrink")
    with pytest.raises(Exception, match="has no argument 'treshold'.*did you mean 'threshold'"):
        activations.get({"type": "hard_shrink", "treshold": 1})
