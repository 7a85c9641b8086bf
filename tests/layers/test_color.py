"""Colour augmentation layers (dlcli/layers/color.py); their Keras fixtures are compared in test_preprocessing.py,
RandAugment's and AugMix's here."""
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
    "RandAugment": [({"value_range": [-3, 3], "num_ops": 3, "factor": 0.4}, (5, 5, 3), {"training": True}),
                    ({}, (3, 3, 3), {})],
    "AugMix": [({"value_range": [-3, 3], "chain_depth": 2, "factor": 0.5}, (5, 5, 3), {"training": True}),
               ({"all_ops": False}, (3, 3, 1), {})],
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
    red = np.array([[[[0.9, 0.1, 0.1]]]], np.float32)
    hue = layers.RandomHue(1.0, value_range=[0, 1])
    hue.ensure_built(red.shape[1:])
    hue.draw = lambda n: np.full(n, 1 / 3)  # a third of the wheel: red becomes green
    np.testing.assert_allclose(hue(red, training=True), [[[[0.1, 0.9, 0.1]]]], atol=1e-6)  # float32's rounding
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


def test_rand_augment_builds_keras_parts_and_applies_the_picked_ones_in_order():
    x = _RGB.astype(np.float32)  # the layers' dtype: a call casts its input to it (Keras' autocast)
    augment = layers.RandAugment(value_range=[0, 1], num_ops=3, factor=0.6, seed=1)
    augment.ensure_built(x.shape[1:])
    parts = augment.parts
    assert list(parts) == list(layers.RandAugment.ORDER) and parts["random_contrast"].factor == (0.0, 0.6)
    assert parts["random_posterization"].factor == (1, 4) and parts["random_shear"].x_factor == (0.0, 0.6)
    drawn = augment.draw(3)
    drawn["layer_idxes"] = np.array([0, 9, 0])  # shear, AutoContrast, the same shear again (one draw per batch)
    shear = layers.RandomShear([0, 0.6], [0, 0.6], name="shear")  # the standalone layers, given the same draws
    shear.ensure_built(x.shape[1:])
    expected = shear.augment(x, drawn["random_shear"])
    contrast = layers.AutoContrast(value_range=[0, 1], name="contrast")
    expected = shear.augment(contrast(expected), drawn["random_shear"])
    np.testing.assert_allclose(augment.augment(x, drawn), expected, rtol=1e-12)


def test_rand_augment_picks_uniformly_and_repeats_when_seeded():
    augment = layers.RandAugment(num_ops=1, value_range=[0, 1], seed=2)
    augment.ensure_built((4, 4, 3))
    counts = np.bincount([augment.draw(1)["layer_idxes"][0] for _ in range(2200)], minlength=11)
    assert counts.min() > 140 and counts.max() < 260  # 200 each
    x = _RGB.astype(np.float32)
    first, second = (layers.RandAugment(value_range=[0, 1], seed=3)(x, training=True) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    with pytest.raises(ConfigError, match="RandAugment: num_ops must be an integer >= 0"):
        layers.RandAugment(num_ops=-1)


def test_aug_mix_mixes_its_chains_with_keras_weights():
    x = _RGB.astype(np.float32)  # the layers' dtype: a call casts its input to it (Keras' autocast)
    mix = layers.AugMix(value_range=[0, 1], chain_depth=2, factor=0.5, seed=4)
    mix.ensure_built(x.shape[1:])
    drawn = mix.draw(3)
    drawn["chain_transforms"] = [[("random_rotation", mix.draw_part("random_rotation", 3))], [],
                                 [("equalization", None), ("solarization", mix.draw_part("solarization", 3))]]
    rotation = layers.RandomRotation([0, 0.5], name="rotation")
    rotation.ensure_built(x.shape[1:])
    solarization = layers.Solarization([0, 0.5], [0, 0.5], value_range=[0, 1], name="solarization")
    chains = [rotation.augment(x, drawn["chain_transforms"][0][0][1]), x,
              solarization.augment(layers.Equalization(value_range=[0, 1])(x, training=True),
                                   drawn["chain_transforms"][2][1][1])]
    w, share = drawn["chain_mixing_weights"], drawn["weight_sample"]
    expected = np.clip(share * x + (1 - share) * sum(wi * c for wi, c in zip(w, chains)), 0, 1)
    np.testing.assert_allclose(mix.augment(x, drawn), expected, rtol=1e-6)  # float32 mixing, float64 weights here


def test_aug_mix_draws_dirichlet_weights_and_chains_up_to_depth_and_repeats_when_seeded():
    mix = layers.AugMix(value_range=[0, 1], chain_depth=3, all_ops=False, seed=5)
    mix.ensure_built((4, 4, 1))
    draws = [mix.draw(2) for _ in range(600)]
    weights = np.array([d["chain_mixing_weights"] for d in draws])
    np.testing.assert_allclose(weights.sum(1), 1)
    assert abs(weights.mean() - 1 / 3) < 0.03 and 0.45 < np.mean([d["weight_sample"] for d in draws]) < 0.55
    lengths = [len(chain) for d in draws for chain in d["chain_transforms"]]
    assert set(lengths) == {0, 1, 2, 3} and abs(np.mean(lengths) - 3 * 7 / 8) < 0.1  # a slot is empty 1 in 8
    assert {key for d in draws for chain in d["chain_transforms"] for key, _ in chain} == set(mix.parts)
    x = np.random.default_rng(6).random((3, 5, 5, 1), dtype=np.float32)
    no_ops = layers.AugMix(value_range=[0, 1], chain_depth=0, all_ops=False, seed=7)
    np.testing.assert_allclose(no_ops(x, training=True), x, rtol=1e-6)  # w x + (1 - w) x, rounded in float32
    first, second = (layers.AugMix(value_range=[0, 1], all_ops=False, seed=8)(x, training=True) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    with pytest.raises(ConfigError, match="AugMix: alpha must be a number > 0"):
        layers.AugMix(alpha=0)


def test_a_layer_rand_augment_runs_twice_steps_back_through_both_runs():
    augment = layers.RandAugment(value_range=[-3, 3], num_ops=2, factor=0.5)
    draw = augment.draw
    augment.draw = lambda n: {**draw(n), "layer_idxes": np.array([2, 2])}  # the same rotation twice
    check_layer(augment, (5, 5, 3), training=True)


def _keras_compositions():
    import json
    from pathlib import Path

    data = np.load(Path(__file__).parents[1] / "fixtures" / "keras" / "catalogue_compositions.npz")
    return [pytest.param(case, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")},
                         id=f"{i}-{case['type']}") for i, case in enumerate(json.loads(str(data["spec"])))]



def _unflatten(arrays, prefix):
    """The arrays under prefix as the nested dicts their `/`-joined keys name; an empty array stands for None."""
    tree = {}
    for key, value in arrays.items():
        if key.startswith(prefix):
            *path, last = key[len(prefix):].split("/")
            node = tree
            for part in path:
                node = node.setdefault(part, {})
            node[last] = None if value.size == 0 else value
    return tree


@pytest.mark.parametrize("spec,arrays", _keras_compositions())
def test_rand_augment_and_aug_mix_match_keras(spec, arrays):
    """Keras 3.15's RandAugment and AugMix (JAX, float64; tests/fixtures/keras/make_catalogue.py compositions) given
    the draw Keras made from the layer's seed, saved as dlcli's: what is compared is the parts' math, applied in
    Keras' order, and AugMix's mixing. Keras rounds its translations and rotation angles to float32: outputs 2e-7
    of the value range apart at most, gradients 1.2e-6."""
    layer = layers.LAYERS.get(spec["type"])(**{k: v for k, v in spec.items() if k != "type"})
    layer.dtype = "float64"
    x = arrays["x"]
    layer.ensure_built(x.shape[1:], np.random.default_rng(0))
    drawn = _unflatten(arrays, "draw/")
    if spec["type"] == "AugMix":  # chain c's step s as draw/chain/<c>/<s>/<part>; an empty chain has no key
        chains = drawn.pop("chain", {})
        drawn["chain_transforms"] = [
            [next(iter(step.items())) for _, step in sorted(chains.get(str(c), {}).items(), key=lambda t: int(t[0]))]
            for c in range(len(drawn["chain_mixing_weights"]))]
    layer.draw = lambda n: drawn
    y = layer.forward(x.copy(), training=True)
    low, high = spec.get("value_range", [0, 255])
    np.testing.assert_allclose(y, arrays["y"], rtol=0, atol=1e-5 * (high - low))
    np.testing.assert_allclose(layer.backward(arrays["r"]), arrays["grad"], rtol=1e-5, atol=1e-5)
