import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError
from tests.gradcheck import check_layer

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
# With the layer RNG re-seeded per forward each augmentation is a fixed linear map, so its gradient is checkable.
GRADIENT_CASES = {
    "Rescaling": [({"scale": 1 / 255}, (3, 4, 2), {}), ({"scale": 2.0, "offset": -1.0}, (5,), {})],
    "RandomFlip": [({}, (3, 4, 2), {"training": True}), ({"mode": "horizontal"}, (2, 3, 1), {"training": True}),
                   ({}, (3, 3, 1), {})],
    "RandomTranslation": [({"height_factor": 0.3, "width_factor": 0.3}, (5, 4, 2), {"training": True}),
                          ({"height_factor": 0.4, "width_factor": [0.1, 0.3], "fill_mode": "constant",
                            "interpolation": "nearest"}, (4, 5, 1), {"training": True}),
                          ({"height_factor": 0.2, "width_factor": 0.2}, (3, 3, 1), {})],
    "RandomRotation": [({"factor": 0.2}, (5, 5, 2), {"training": True}),
                       ({"factor": 0.3, "fill_mode": "wrap", "interpolation": "nearest"}, (4, 6, 1),
                        {"training": True}),
                       ({"factor": 0.5, "fill_mode": "constant", "fill_value": 0.5}, (4, 4, 1), {"training": True})],
    "Resizing": [({"height": 3, "width": 5}, (5, 4, 2), {}), ({"height": 4, "width": 4, "interpolation": "nearest",
                                                                "crop_to_aspect_ratio": True}, (5, 7, 1), {})],
    "CenterCrop": [({"height": 2, "width": 3}, (4, 5, 2), {}), ({"height": 5, "width": 3}, (3, 4, 1), {})],
    "RandomBrightness": [({"factor": 0.3, "value_range": [-1, 1]}, (3, 4, 2), {"training": True}),
                         ({"factor": 0.3}, (3, 3, 1), {})],
    "RandomContrast": [({"factor": [0.5, 0.5], "value_range": [-1.5, 1.5]}, (3, 4, 2), {"training": True}),
                       ({"factor": 0.4}, (3, 3, 1), {})],
    "RandomGrayscale": [({"factor": 0.7}, (3, 4, 3), {"training": True}), ({}, (3, 3, 1), {"training": True})],
    "RandomInvert": [({"value_range": [0, 1]}, (3, 4, 2), {"training": True}), ({}, (3, 3, 1), {})],
    "RandomCrop": [({"height": 3, "width": 2}, (5, 4, 2), {"training": True}), ({"height": 4, "width": 3},
                                                                                (5, 4, 2), {"training": True}),
                   ({"height": 3, "width": 5}, (4, 4, 1), {})],
    "RandomErasing": [({"scale": [0.2, 0.5]}, (5, 6, 2), {"training": True}),
                      ({"fill_value": [1, 2, 3]}, (4, 4, 3), {"training": True}), ({}, (3, 3, 1), {})],
    "RandomShear": [({"x_factor": 0.3, "y_factor": 0.3}, (5, 4, 2), {"training": True}),
                    ({"x_factor": [0.1, 0.4], "fill_mode": "constant", "fill_value": 0.5, "interpolation": "nearest"},
                     (4, 5, 1), {"training": True}), ({"y_factor": 0.2}, (3, 3, 1), {})],
    "RandomPerspective": [({"factor": [1.0, 1.0], "scale": 0.5}, (5, 6, 2), {"training": True}),
                          ({"interpolation": "nearest", "fill_value": 0.5}, (4, 4, 1), {"training": True}),
                          ({}, (3, 3, 1), {})],
    "RandomElasticTransform": [({"value_range": [-5, 5]}, (8, 7, 2), {"training": True}),
                               ({"fill_mode": "constant", "fill_value": 0.5, "interpolation": "nearest",
                                 "value_range": [-5, 5]}, (6, 6, 1), {"training": True}),
                               ({"fill_mode": "mirror", "value_range": [-5, 5]}, (5, 9, 1), {"training": True}),
                               ({}, (3, 3, 1), {})],
    "RandomZoom": [({"height_factor": 0.3}, (5, 4, 1), {"training": True}),
                   ({"height_factor": [-0.3, -0.1], "width_factor": 0.2, "fill_mode": "nearest"}, (4, 4, 2),
                    {"training": True})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


# seeded: unseeded, RandomFlip leaves all 4 images as they are once in 256 runs
@pytest.mark.parametrize("layer", [layers.RandomFlip(seed=0), layers.RandomTranslation(0.2, 0.2, seed=0),
                                   layers.RandomRotation(0.1, seed=0), layers.RandomZoom(0.2, seed=0),
                                   layers.RandomBrightness(0.3, value_range=[0, 1], seed=0),
                                   layers.RandomContrast(0.5, value_range=[0, 1], seed=0),
                                   layers.RandomGrayscale(0.9, seed=0), layers.RandomInvert(value_range=[0, 1], seed=0),
                                   layers.Solarization(value_range=[0, 1], seed=0),
                                   layers.RandomPosterization(4, value_range=[0, 1], seed=0),
                                   layers.RandomColorDegeneration(0.5, value_range=[0, 1], seed=0),
                                   layers.Equalization(value_range=[0, 1]),
                                   layers.RandomSharpness(0.9, value_range=[0, 1], seed=0),
                                   layers.RandomGaussianBlur([1.0, 1.0], value_range=[0, 1], seed=0),
                                   layers.RandomSaturation([0.1, 0.9], value_range=[0, 1], seed=0),
                                   layers.RandomHue(0.8, value_range=[0, 1], seed=0),
                                   layers.RandomErasing(value_range=[0, 1], seed=0),
                                   layers.RandomColorJitter([0, 1], 0.2, 0.3, [0.3, 0.7], 0.2, seed=0),
                                   layers.RandomShear(0.3, 0.3, seed=0),
                                   layers.RandomPerspective([1.0, 1.0], seed=0),
                                   layers.RandomElasticTransform([1.0, 1.0], value_range=[0, 1], seed=0),
                                   layers.RandAugment(value_range=[0, 1], seed=0),
                                   layers.AugMix(value_range=[0, 1], seed=0)],
                         ids=lambda layer: type(layer).__name__)
def test_augmentation_is_identity_at_inference_and_float32(layer):
    x = np.random.default_rng(0).random((4, 6, 6, 3), dtype=np.float32)
    assert layer(x) is x
    y = layer.forward(x, training=True)
    assert y.shape == x.shape and y.dtype == np.float32 and not np.array_equal(y, x)


def test_random_flip_flips_whole_images():
    x = np.random.default_rng(1).random((64, 3, 4, 1), np.float32)
    y = layers.RandomFlip("horizontal", seed=3)(x, training=True)
    kept = (y == x).all((1, 2, 3))
    flipped = (y == x[:, :, ::-1]).all((1, 2, 3))
    assert (kept | flipped).all() and 10 < flipped.sum() < 54


def test_quarter_turn_rotation_matches_rot90_counter_clockwise():
    x = np.random.default_rng(2).random((2, 5, 5, 1))
    rot = layers.RandomRotation((0.25, 0.25), interpolation="nearest")
    np.testing.assert_allclose(rot(x, training=True), np.rot90(x, 1, axes=(1, 2)), atol=1e-12)


def test_integer_translation_shifts_down_and_reflects():
    x = np.arange(5.0)[None, :, None, None] * np.ones((1, 5, 2, 1))
    t = layers.RandomTranslation((0.4, 0.4), (0, 0))  # exactly 2 rows down
    y = t(x, training=True)
    np.testing.assert_allclose(y[0, :, 0, 0], [1, 0, 0, 1, 2])  # reflect: (d c b a | a b c d)
    t = layers.RandomTranslation((0.4, 0.4), (0, 0), fill_mode="constant")
    np.testing.assert_allclose(t(x, training=True)[0, :, 0, 0], [0, 0, 0, 1, 2])


def test_seeded_augmentation_repeats_and_bad_arguments_fail():
    x = np.random.default_rng(3).random((4, 5, 5, 1))
    a = layers.RandomRotation(0.3, seed=7)(x, training=True)
    b = layers.RandomRotation(0.3, seed=7)(x, training=True)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="fill_mode"):
        layers.RandomZoom(0.1, fill_mode="mirror")
    with pytest.raises(ConfigError, match="mode"):
        layers.RandomFlip("diagonal")


def _keras_cases(family="images"):
    import json
    from pathlib import Path

    data = np.load(Path(__file__).parents[1] / "fixtures" / "keras" / f"catalogue_{family}.npz")
    spec = json.loads(str(data["spec"]))
    return [pytest.param(case, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")},
                         id=f"{i}-{case['type']}") for i, case in enumerate(spec)]


@pytest.mark.parametrize("spec,arrays", _keras_cases())
def test_image_preprocessing_matches_keras(spec, arrays):
    """Keras 3.15 (torch backend) outputs and input gradients (tests/fixtures/keras/make_catalogue.py); the random
    layers are given Keras' draw, so what is compared is what they do with it."""
    args = {k: v for k, v in spec.items() if k != "type"}
    layer = layers.LAYERS.get(spec["type"])(**args)
    layer.dtype = "float64"
    x = arrays["x"]
    layer.ensure_built(x.shape[1:], np.random.default_rng(0))
    if "draw" in arrays:
        layer.draw = lambda n: arrays["draw"]
    y = layer.forward(x.copy(), training=True)
    # within 1e-7 of the value range: Keras' contrast output near 0 carries float32-sized rounding (2e-8 relative)
    low, high = spec.get("value_range", [0, 255])
    np.testing.assert_allclose(y, arrays["y"], rtol=1e-6, atol=1e-7 * (high - low))
    np.testing.assert_allclose(layer.backward(arrays["r"]), arrays["grad"], rtol=1e-6, atol=1e-9)


def test_resizing_and_center_crop_are_always_on_and_check_their_arguments():
    x = np.random.default_rng(0).random((2, 6, 8, 3), dtype=np.float32)
    crop = layers.CenterCrop(2, 4)
    np.testing.assert_array_equal(crop(x), x[:, 2:4, 2:6])  # inference too: not an augmentation
    assert layers.Resizing(3, 4)(x).shape == (2, 3, 4, 3) and layers.Resizing(3, 4)(x).dtype == np.float32
    np.testing.assert_allclose(layers.Resizing(3, 4)(x[:, ::2, ::2].repeat(2, 1).repeat(2, 2)),
                               layers.Resizing(3, 4)(x[:, ::2, ::2].repeat(2, 1).repeat(2, 2)), rtol=0)
    with pytest.raises(ConfigError, match="interpolation must be one of bilinear, nearest"):
        layers.Resizing(3, 4, interpolation="bicubic")
    with pytest.raises(ConfigError, match="pad_to_aspect_ratio: true is not implemented"):
        layers.Resizing(3, 4, pad_to_aspect_ratio=True)
    with pytest.raises(ConfigError, match="height must be an integer >= 1"):
        layers.CenterCrop(0, 4)
    with pytest.raises(ConfigError, match=r"factor must be a number or a pair in \[0.0, 1.0\]"):
        layers.RandomContrast(1.5)


@pytest.mark.parametrize("spec,arrays", _keras_cases("augmentations") + _keras_cases("images_jax"))
def test_augmentations_match_keras(spec, arrays):
    """Keras 3.15 outputs and input gradients of the augmentation layers in catalogue_augmentations.npz (torch
    backend) and catalogue_images_jax.npz (JAX), each random one given Keras' draw (`draw/` is what dlcli's
    layer.draw returns; RandomElasticTransform's includes the noise Keras' backend would draw)."""
    layer = layers.LAYERS.get(spec["type"])(**{k: v for k, v in spec.items() if k != "type"})
    layer.dtype = "float64"
    x = arrays["x"]
    layer.ensure_built(x.shape[1:], np.random.default_rng(0))
    draw = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("draw/")}
    if draw:
        layer.draw = lambda n: draw[""] if "" in draw else draw
    y = layer.forward(x.copy(), training=True)
    # Keras' RandomHue maps to 0..1 in float32 whatever the dtype (_transform_value_range's default): 4e-6 apart;
    # RandomColorJitter's parts compute in float32 (Keras builds them without the jitter's dtype); both solve
    # RandomPerspective's homography in float32, with different solvers (7e-6 apart); CLAHE computes in float32
    float32 = ("RandomHue", "RandomColorJitter", "RandomPerspective", "ContrastLimitedAdaptiveHistogramEqualization")
    rtol, atol = (1e-5, 1e-6) if spec["type"] in float32 else (1e-6, 1e-9)
    np.testing.assert_allclose(y, arrays["y"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(layer.backward(arrays["r"]), arrays["grad"], rtol=rtol, atol=atol)


def test_random_crop_is_one_window_per_batch_and_smart_resizes_otherwise():
    x = np.random.default_rng(4).random((3, 6, 8, 2), dtype=np.float32)
    crop = layers.RandomCrop(3, 4, seed=1)
    y = crop(x, training=True)
    windows = {(t, left) for t in range(4) for left in range(5) if np.array_equal(y, x[:, t:t + 3, left:left + 4])}
    assert len(windows) == 1 and y.dtype == np.float32
    seen = {tuple(crop.draw(3)) for _ in range(200)}
    assert len(seen) == 20  # every one of the 4 x 5 positions
    smart = layers.Resizing(3, 4, crop_to_aspect_ratio=True)
    np.testing.assert_allclose(crop(x), smart(x), rtol=1e-6)  # inference
    small = layers.RandomCrop(8, 4)  # not larger on both axes: resized in training too
    np.testing.assert_allclose(small(x, training=True), layers.Resizing(8, 4, crop_to_aspect_ratio=True)(x),
                               rtol=1e-6)
    with pytest.raises(ConfigError, match="RandomCrop: height must be an integer >= 1"):
        layers.RandomCrop(0, 3)
    with pytest.raises(ConfigError, match=r"RandomShear: y_factor must be a number in \[0, 1\] or a pair in"):
        layers.RandomShear(0.2, -0.1)
    assert layers.RandomShear([-0.2, 0.2]).x_factor == (-0.2, 0.2)  # how Keras saves x_factor 0.2
    with pytest.raises(ConfigError, match=r"RandomPerspective: scale must be a number in \[0, 1\]"):
        layers.RandomPerspective(scale=2)
    with pytest.raises(ConfigError, match="RandomShear: fill_mode must be one of"):
        layers.RandomShear(0.2, fill_mode="mirror")


def test_elastic_transform_moves_by_keras_field_size_with_probability_factor_and_repeats_when_seeded():
    # a ramp across the columns: output - input is each pixel's column displacement, alpha * blur(noise * sigma),
    # whose spread is alpha * sigma * sum(k^2) for the normalised 1-D Gaussian k (sigma 4.8 and alpha 9.6 here)
    x = np.broadcast_to(np.arange(96, dtype=np.float32)[None, None, :, None], (4, 96, 96, 1)).copy()
    layer = layers.RandomElasticTransform([1.0, 1.0], scale=[1.0, 1.0], fill_mode="nearest", value_range=[-50, 150],
                                          seed=3)
    moved = (layer(x, training=True) - x)[:, 20:-20, 20:-20]  # away from the zero-padded borders of the blur
    size = int(6 * 4.8) | 1
    kernel = np.exp(-0.5 * ((np.arange(size) - size // 2) / 4.8) ** 2)
    expected = 9.6 * 4.8 * ((kernel / kernel.sum()) ** 2).sum()
    assert 0.7 * expected < moved.std() < 1.3 * expected and abs(moved.mean()) < 0.5 * expected
    some = layers.RandomElasticTransform([0.3, 0.3], value_range=[0, 1], seed=4)
    images = np.random.default_rng(5).random((400, 8, 8, 1), np.float32)
    changed = (some(images, training=True) != images).any((1, 2, 3))
    assert 0.22 < changed.mean() < 0.38
    first, second = (layers.RandomElasticTransform(value_range=[0, 1], seed=6)(images, training=True)
                     for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert layers.RandomElasticTransform(scale=0.0)(images, training=True) is images  # Keras draws nothing
    with pytest.raises(ConfigError, match="RandomElasticTransform: fill_mode must be one of reflect, wrap, "
                                          "nearest, constant, mirror"):
        layers.RandomElasticTransform(fill_mode="symmetric")
