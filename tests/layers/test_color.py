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
    # piecewise constant (each pixel's value is looked up by its integer bin): zero, as the numerical check finds
    "ContrastLimitedAdaptiveHistogramEqualization": [({"tile_grid_size": [2, 2], "value_range": [-3, 3]},
                                                      (6, 5, 2), {}), ({"clip_limit": 0}, (4, 4, 1),
                                                                       {"training": True})],
    "RandomSharpness": [({"factor": [0.0, 1.0], "value_range": [-1.5, 1.5]}, (4, 5, 2), {"training": True}),
                        ({"factor": 0.5}, (3, 3, 1), {})],
    "RandomGaussianBlur": [({"factor": [0.5, 1.0], "kernel_size": 5, "sigma": [0.5, 1.5],
                             "value_range": [-2.5, 2.5]}, (6, 5, 2), {"training": True}),
                           ({}, (3, 3, 1), {})],
    # RGB in [0.05, 0.95]: away from the pixels where the hue formula changes branch
    "RandomSaturation": [({"factor": [0.3, 0.6], "value_range": [0, 1]}, (4, 4, 3),
                          {"training": True, "inputs": [_RGB]}), ({"factor": 0.5}, (3, 3, 3), {})],
    "RandomHue": [({"factor": [0.2, 0.6], "value_range": [0, 1]}, (4, 4, 3), {"training": True, "inputs": [_RGB]}),
                  ({"factor": 0.5}, (3, 3, 3), {})],
    "RandomColorJitter": [({"value_range": [0, 1], "brightness_factor": 0.05, "contrast_factor": [0.2, 0.2],
                            "saturation_factor": [0.4, 0.6], "hue_factor": 0.2}, (4, 4, 3),
                           {"training": True, "inputs": [_RGB]}),
                          ({"brightness_factor": 0.3}, (3, 3, 1), {})],
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


def test_hue_turns_the_colour_wheel_and_saturation_zero_is_gray():
    red = np.array([[[[0.9, 0.1, 0.1]]]])
    hue = layers.RandomHue(1.0, value_range=[0, 1])
    hue.ensure_built(red.shape[1:])
    hue.draw = lambda n: np.full(n, 1 / 3)  # a third of the wheel: red becomes green
    np.testing.assert_allclose(hue(red, training=True), [[[[0.1, 0.9, 0.1]]]], atol=1e-12)
    saturation = layers.RandomSaturation([0.0, 0.0])
    np.testing.assert_allclose(saturation(red, training=True), [[[[0.9, 0.9, 0.9]]]], atol=1e-12)


def test_blur_of_a_constant_image_keeps_it_inside_and_darkens_the_border():
    x = np.full((1, 5, 5, 1), 100.0)
    blur = layers.RandomGaussianBlur(factor=[1.0, 1.0], sigma=[1.0, 1.0])
    y = blur(x, training=True)  # probability 1: always blurred; zero padding pulls the border down, as in Keras
    np.testing.assert_allclose(y[0, 2, 2, 0], 100.0)
    assert y[0, 0, 0, 0] < y[0, 0, 2, 0] < 100.0


def test_more_bad_arguments_name_the_layer():
    with pytest.raises(ConfigError, match="RandomGaussianBlur: kernel_size must be one odd integer"):
        layers.RandomGaussianBlur(kernel_size=4)
    with pytest.raises(ConfigError, match="RandomGaussianBlur: kernel_size must be one odd integer"):
        layers.RandomGaussianBlur(kernel_size=[3, 5])
    with pytest.raises(ConfigError, match="RandomErasing: fill_value must be a number, three numbers"):
        layers.RandomErasing(fill_value=[1, 2])
    with pytest.raises(ConfigError, match=r"RandomHue: factor must be a number or a pair in \[0.0, 1.0\]"):
        layers.RandomHue(2)
    with pytest.raises(ConfigError, match="RandomColorJitter: hue_factor: RandomHue: factor must be"):
        layers.RandomColorJitter(hue_factor=-2)
    with pytest.raises(ShapeError, match="RandomSaturation 'rs' needs 3 channels"):
        layers.RandomSaturation(0.5, name="rs")(np.zeros((1, 2, 2, 1)))


def test_clahe_with_one_tile_and_no_clip_is_histogram_equalization_and_acts_at_inference():
    rng = np.random.default_rng(8)
    x = rng.integers(40, 90, (2, 6, 7, 2)).astype(np.float32) + 0.25
    y = layers.ContrastLimitedAdaptiveHistogramEqualization(clip_limit=0, tile_grid_size=(1, 1))(x)  # inference
    for image, out in zip(np.moveaxis(x, -1, 1).reshape(4, -1), np.moveaxis(y, -1, 1).reshape(4, -1)):
        values = np.floor(image)
        cdf = (values[:, None] <= np.unique(values)[None]).sum(0)  # pixels at or below each value
        # Keras subtracts the smallest of all 256 bins' counts, 0 here (no pixel is 0), not the darkest pixel's
        expected = cdf * 255 / image.size
        np.testing.assert_allclose(out, expected[np.searchsorted(np.unique(values), values)], rtol=1e-5)
    assert y.dtype == np.float32 and y.max() == 255
    limited = layers.ContrastLimitedAdaptiveHistogramEqualization(clip_limit=1.0, tile_grid_size=(1, 1))(x)
    assert np.ptp(limited) < np.ptp(y)  # clipping the histogram limits the stretch
    with pytest.raises(ConfigError, match="tile_grid_size must be two integers >= 1"):
        layers.ContrastLimitedAdaptiveHistogramEqualization(tile_grid_size=(0, 2))
