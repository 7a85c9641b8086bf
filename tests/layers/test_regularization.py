"""Noise layers: gradient checks (the noise repeats under the checker's re-seeding), the identity at inference,
and Keras' moments of the noise."""
import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError
from tests.gradcheck import check_layer

GRADIENT_CASES = {
    "GaussianNoise": [({"stddev": 0.3}, (5,), {"training": True}), ({"stddev": 0.3}, (5,), {})],
    "GaussianDropout": [({"rate": 0.3}, (2, 4), {"training": True})],
    "ActivityRegularization": [({"l1": 0.1, "l2": 0.2}, (5,), {})],
    "AlphaDropout": [({"rate": 0.3}, (6,), {"training": True}),
                     ({"rate": 0.4, "noise_shape": [None, 1, None]}, (3, 4), {"training": True})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


@pytest.mark.parametrize("layer", [layers.GaussianNoise(0.5), layers.GaussianDropout(0.4), layers.AlphaDropout(0.2)])
def test_identity_at_inference_and_keras_moments_while_training(layer):
    x = np.random.default_rng(0).normal(0, 1, (400, 500)).astype(np.float32)
    layer.ensure_built((500,), np.random.default_rng(0))
    assert layer.forward(x) is x
    y = layer.forward(x, training=True)
    if isinstance(layer, layers.GaussianNoise):
        assert (y - x).std() == pytest.approx(0.5, rel=0.01)
    elif isinstance(layer, layers.GaussianDropout):
        assert (y / x).mean() == pytest.approx(1.0, abs=0.01) and (y / x).std() == pytest.approx(
            np.sqrt(0.4 / 0.6), rel=0.02)
    else:  # SELU's self-normalising inputs keep mean 0 and variance 1 through alpha dropout
        assert y.mean() == pytest.approx(0.0, abs=0.01) and y.std() == pytest.approx(1.0, abs=0.01)


def test_rates_are_checked():
    with pytest.raises(ConfigError, match="rate must be in"):
        layers.AlphaDropout(1.0)
    with pytest.raises(ConfigError, match="stddev cannot be negative"):
        layers.GaussianNoise(-1)


def test_activity_regularization_adds_keras_penalty_and_its_gradient_while_training():
    from tests.gradcheck import assert_close, numeric_grad

    layer = layers.ActivityRegularization(l1=0.1, l2=0.2)
    x = np.random.default_rng(0).normal(0, 1, (4, 3))
    assert layer.forward(x) is x and layer.regularization_loss() == 0.0 and layer.backward(x) is x
    layer.forward(x, training=True)
    # Keras 3: L1L2(l1, l2)(x) / batch size
    assert layer.regularization_loss() == pytest.approx((0.1 * np.abs(x).sum() + 0.2 * (x * x).sum()) / 4)
    r = np.random.default_rng(1).normal(0, 1, x.shape)

    def loss():
        return float((layer.forward(x, training=True) * r).sum() + layer.regularization_loss())

    assert_close(layer.backward(r), numeric_grad(loss, x), "d/dx")
