"""Colour augmentation layers (dlcli/layers/color.py); their Keras fixtures are compared in test_preprocessing.py."""
import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer

_RGB = np.random.default_rng(5).uniform(0.05, 0.95, (3, 4, 4, 3))

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
GRADIENT_CASES = {
    "Solarization": [({"threshold_factor": [0.4, 0.6], "value_range": [-2, 2]}, (3, 4, 2), {"training": True}),
                     ({}, (3, 3, 1), {})],
    # piecewise constant: zero almost everywhere, which the numerical check confirms
    "RandomPosterization": [({"factor": [2, 6], "value_range": [-3, 3]}, (3, 4, 2), {"training": True})],
    "RandomColorDegeneration": [({"factor": 0.6, "value_range": [-1.5, 1.5]}, (3, 4, 3), {"training": True}),
                                ({"factor": 0.6}, (3, 3, 3), {})],
    "AutoContrast": [({"value_range": [0, 1]}, (4, 3, 2), {}), ({"value_range": [-1, 1]}, (3, 4, 3),
                                                                {"training": True})],
    "Equalization": [({"bins": 8, "value_range": [-3, 3]}, (4, 3, 2), {"training": True}),
                     ({}, (3, 3, 1), {})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


def test_auto_contrast_stretches_each_channel_at_inference_too():
    x = _RGB.astype(np.float32)
    x[1, ..., 2] = 0.5  # a constant channel stays as it is
    y = layers.AutoContrast(value_range=[0, 1])(x)  # inference
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0].min((0, 1)), 0, atol=1e-6)
    np.testing.assert_allclose(y[0].max((0, 1)), 1, atol=1e-6)
    np.testing.assert_array_equal(y[1, ..., 2], 0.5)


def test_solarization_inverts_above_the_threshold_and_posterization_keeps_top_bits():
    x = np.array([10.0, 100.0, 200.0, 255.0]).reshape(1, 2, 2, 1)
    sol = layers.Solarization(threshold_factor=[0.5, 0.5])
    sol.ensure_built(x.shape[1:])
    sol.draw = lambda n: {"additions": np.zeros(n), "thresholds": np.full(n, 128.0)}
    np.testing.assert_array_equal(sol(x, training=True).ravel(), [10, 100, 55, 0])
    post = layers.RandomPosterization([2, 2])
    np.testing.assert_array_equal(post(x, training=True).ravel(), [0, 64, 192, 192])


def test_bad_arguments_name_the_layer():
    with pytest.raises(ConfigError, match=r"Solarization: threshold_factor must be a number or a pair in \[0, 1\]"):
        layers.Solarization(threshold_factor=1.5)
    with pytest.raises(ConfigError, match=r"RandomPosterization: factor must be a number or a pair in \[1, 8\]"):
        layers.RandomPosterization(9)
    with pytest.raises(ConfigError, match="Equalization: bins must be an integer >= 2"):
        layers.Equalization(bins=1)
    with pytest.raises(ConfigError, match="AutoContrast: value_range must be a pair"):
        layers.AutoContrast(value_range=255)
    with pytest.raises(ConfigError, match="RandomColorDegeneration: dlcli images are channels_last"):
        layers.RandomColorDegeneration(0.2, data_format="channels_first")
    with pytest.raises(ShapeError, match="needs 3 channels"):
        layers.RandomColorDegeneration(0.2)(np.zeros((1, 2, 2, 1)))
