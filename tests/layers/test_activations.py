"""Activation layers: gradient checks, Keras' argument checks and the mask. Keras' own outputs and gradients for
them are compared in tests/test_keras_catalogue.py."""
import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer

GRADIENT_CASES = {
    "ReLU": [({}, (6,), {}), ({"max_value": 1.0, "negative_slope": 0.1, "threshold": 0.3}, (2, 5), {}),
             ({"negative_slope": 0.2}, (6,), {})],
    "LeakyReLU": [({}, (2, 4), {}), ({"negative_slope": 1.5}, (5,), {})],
    "ELU": [({"alpha": 0.7}, (6,), {})],
    "Softmax": [({}, (5,), {}), ({"axis": 1}, (3, 4), {}), ({"axis": [1, 2]}, (3, 2), {}),
                ({}, (5,), {"mask": np.array([[1, 1, 0, 1, 0]] * 3, bool)})],
    "PReLU": [({}, (2, 3), {}), ({"shared_axes": [1, 2], "alpha_initializer": "ones"}, (3, 3, 2), {})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts, kernel_path):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


def test_keras_argument_checks_and_defaults():
    with pytest.raises(ConfigError, match="max_value cannot be negative"):
        layers.ReLU(max_value=-1)
    with pytest.raises(ConfigError, match="negative_slope cannot be negative"):
        layers.LeakyReLU(negative_slope=-0.1)
    assert layers.LeakyReLU().activation.negative_slope == 0.3  # the layer's default, not the function's 0.2
    prelu = layers.PReLU(shared_axes=[1, 2])
    prelu.ensure_built((4, 4, 3), np.random.default_rng(0))
    assert prelu.alpha.value.shape == (1, 1, 3) and not prelu.alpha.value.any()  # one zero slope per channel
    with pytest.raises(ShapeError, match="shared axis 4"):
        layers.PReLU(shared_axes=4).ensure_built((4, 4, 3), np.random.default_rng(0))


def test_softmax_mask_must_broadcast_and_zeroes_masked_positions():
    layer = layers.Softmax()
    layer.input_mask = np.array([[True, False, True]])
    y = layer(np.zeros((1, 3), np.float32))
    np.testing.assert_allclose(y, [[0.5, 0, 0.5]])
    layer.input_mask = np.ones((1, 4), bool)
    with pytest.raises(ShapeError, match="does not broadcast"):
        layer.forward(np.zeros((1, 3), np.float32))
