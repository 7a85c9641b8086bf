import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer

# a ragged batch of 4 sequences of 5 steps (Embedding mask_zero / Masking): statistics over the real steps only
_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], bool)

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
GRADIENT_CASES = {
    "Normalization": [({"mean": 1.0, "variance": 4.0}, (3,), {}), ({}, (2, 3), {}),
                      ({"axis": [1, 2], "mean": [[1, 2], [3, 4]], "variance": [[1, 2], [3, 4]], "invert": True},
                       (2, 2), {})],
    "GroupNormalization": [({"groups": 2}, (3, 4), {}), ({"groups": 3, "center": False}, (2, 2, 6), {}),
                           ({"groups": 1, "scale": False}, (5,), {"batch": 2})],
    "RMSNormalization": [({}, (5,), {}), ({"axis": [-2, -1], "epsilon": 0.1}, (2, 3, 4), {}),
                         ({"axis": 2}, (3, 4), {})],
    "UnitNormalization": [({}, (5,), {}), ({"axis": [1, 2]}, (2, 3), {})],
    "BatchNormalization": [({}, (4,), {"training": True, "batch": 5}),
                           ({}, (3, 4, 2), {"training": True}),
                           ({}, (3, 4, 2), {"training": False}),
                           ({"axis": 1}, (3, 2), {"training": True, "batch": 4}),
                           ({"center": False, "scale": False}, (5, 3), {"training": True}),
                           ({"scale": False}, (2, 3, 3), {"training": True}),
                           ({}, (5, 3), {"training": True, "batch": 4, "mask": _MASK})],
    "LayerNormalization": [({}, (5,), {}), ({}, (3, 4), {}), ({"axis": [1, 2]}, (3, 2, 2), {}),
                           ({"center": False}, (4, 3), {}), ({"scale": False, "epsilon": 1e-5}, (6,), {})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts, kernel_path):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


def test_batchnorm_keras_weights_and_defaults():
    bn = layers.BatchNormalization()
    bn(np.ones((2, 5, 5, 3), np.float32))
    assert [p.name for p in bn.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert [p.name for p in bn.trainable_weights] == ["gamma", "beta"]
    assert bn.moving_mean.grad is None and bn.moving_variance.grad is None
    assert bn.momentum == 0.99 and bn.epsilon == 1e-3 and bn.count_params() == 12
    assert all(w.shape == (3,) for w in bn.get_weights())


def test_batchnorm_updates_moving_statistics_only_while_training():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (64, 4, 4, 2)).astype(np.float32)
    bn = layers.BatchNormalization(momentum=0.9)
    y = bn(x)
    np.testing.assert_array_equal(bn.moving_mean.value, 0)  # inference leaves them alone
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)
    bn.forward(x, training=True)
    batch_mean, batch_var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(bn.moving_mean.value, 0.1 * batch_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.value, 0.9 + 0.1 * batch_var, rtol=1e-5)
    assert bn.moving_mean.value.dtype == np.float32


def test_batchnorm_inference_equals_training_when_statistics_match():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 3.0, (16, 3, 5)).astype(np.float64)
    bn = layers.BatchNormalization(dtype="float64")
    bn.ensure_built(x.shape[1:])
    bn.gamma.value, bn.beta.value = rng.normal(size=5), rng.normal(size=5)
    train = bn.forward(x, training=True)
    bn.moving_mean.value, bn.moving_variance.value = x.mean((0, 1)), x.var((0, 1))
    np.testing.assert_allclose(bn.forward(x, training=False), train, rtol=1e-10, atol=1e-12)
    # and the normalised output has zero mean / unit variance per channel before gamma/beta
    np.testing.assert_allclose(((train - bn.beta.value) / bn.gamma.value).mean((0, 1)), 0, atol=1e-10)


def test_frozen_batchnorm_runs_in_inference_mode():
    bn = layers.BatchNormalization(trainable=False)
    x = np.random.default_rng(2).normal(5, 1, (8, 3)).astype(np.float32)
    bn(x)
    y = bn.forward(x, training=True)
    np.testing.assert_array_equal(bn.moving_mean.value, 0)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)


def test_batchnorm_set_weights_restores_moving_statistics():
    bn = layers.BatchNormalization()
    x = np.random.default_rng(3).normal(2, 1, (32, 4)).astype(np.float32)
    bn(x)
    bn.forward(x, training=True)
    saved = bn.get_weights()
    other = layers.BatchNormalization()
    other(x)
    other.set_weights(saved)
    np.testing.assert_array_equal(other.forward(x), bn.forward(x))


def test_layernorm_normalises_each_sample_with_keras_epsilon():
    ln = layers.LayerNormalization()
    x = np.random.default_rng(4).normal(0, 2, (3, 7, 6)).astype(np.float32)
    y = ln(x)
    assert ln.epsilon == 1e-3 and [p.name for p in ln.weights] == ["gamma", "beta"]
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-3)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert y.dtype == np.float32


def test_normalization_axis_out_of_range_names_the_layer():
    with pytest.raises(ShapeError, match="'bn'.*axis"):
        layers.BatchNormalization(axis=3, name="bn").ensure_built((4, 2))


def test_batchnorm_statistics_skip_masked_steps_as_keras():
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 3.0, (4, 6, 3))
    mask = rng.random((4, 6)) > 0.4
    x[~mask] = 1000.0  # padding the statistics must not see
    bn = layers.BatchNormalization(momentum=0.0, dtype="float64")
    bn.ensure_built((6, 3))
    bn.input_mask = mask
    y = bn.forward(x, training=True)
    real = x[mask]
    np.testing.assert_allclose(bn.moving_mean.value, real.mean(0), rtol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.value, real.var(0), rtol=1e-6)
    np.testing.assert_allclose(y[mask], (real - real.mean(0)) / np.sqrt(real.var(0) + 1e-3), rtol=1e-6)
    bn.input_mask = np.zeros((4, 6), bool)  # everything masked: zeros, as Keras' sum / (weights + 1e-7)
    assert np.isfinite(bn.forward(x, training=True)).all() and np.all(bn.moving_mean.value == 0)


def test_channelwise_broadcast_equals_numpys_and_leaves_other_shapes_alone():
    from dlcli.layers.normalization import _channelwise

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5, 4)).astype(np.float32)
    per_channel = rng.normal(size=(1, 1, 1, 4)).astype(np.float32)
    per_sample = rng.normal(size=(4, 1, 1, 1)).astype(np.float32)  # as many samples as channels: not tiled
    for v in (per_channel, per_sample):
        for ufunc in (np.add, np.subtract, np.multiply):
            assert np.array_equal(_channelwise(ufunc, x, v), ufunc(x, v))
    out = x.copy()
    assert _channelwise(np.subtract, out, per_channel, out=out) is not None
    assert np.array_equal(out, x - per_channel)
    view = x[:, :, ::2]  # not contiguous: NumPy's own broadcast
    assert np.array_equal(_channelwise(np.multiply, view, per_channel), view * per_channel)


def test_normalization_adapts_like_keras_and_round_trips_its_config():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 4, 3)) * [1.0, 5.0, 0.2] + [0.0, 3.0, -1.0]).astype(np.float32)
    norm = layers.Normalization()
    norm.adapt(x, batch_size=64)  # in chunks: the sums are exact whatever the chunking
    np.testing.assert_allclose(norm.params["mean"].value, x.reshape(-1, 3).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.params["variance"].value, x.reshape(-1, 3).var(0), rtol=1e-5)
    assert int(norm.params["count"].value) == 2000
    y = norm(x)
    np.testing.assert_allclose(y.reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.reshape(-1, 3).std(0), 1, rtol=1e-4)
    inverse = layers.Normalization(mean=norm.params["mean"].value, variance=norm.params["variance"].value,
                                   invert=True)
    np.testing.assert_allclose(inverse(y), x, rtol=1e-4, atol=1e-4)
    assert layers.Normalization(adapt=True).get_config()["adapt"] is True
    with pytest.raises(ConfigError, match="both mean and variance"):
        layers.Normalization(mean=1.0)


def test_adapt_true_in_a_config_adapts_to_the_training_inputs_before_the_first_epoch(tmp_path):
    import dlcli

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(120, 3)) * [2.0, 0.5, 10.0] + [1.0, -2.0, 50.0]).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 2, 120))
    config = tmp_path / "c.yaml"
    config.write_text(f"""name: norm
data: {{type: npz, path: {tmp_path / 'd.npz'}, x: x, y: y}}
model:
  input_shape: [3]
  layers:
    - {{type: Normalization, adapt: true}}
    - {{type: Dense, units: 2, activation: softmax}}
compile: {{optimizer: sgd, loss: sparse_categorical_crossentropy}}
train: {{epochs: 1}}
""")
    run = dlcli.train(config, runs_dir=tmp_path / "runs")
    with np.load(run.dir / "weights" / "last.npz") as weights:
        mean = next(weights[k] for k in weights.files if k.endswith("/mean"))
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)  # stored in the run with the other weights


def test_rms_normalization_weights_and_axes():
    layer = layers.RMSNormalization()
    y = layer(np.full((2, 3, 4), 2.0, np.float32))
    assert [p.name for p in layer.weights] == ["scale"] and layer.scale.value.shape == (4,)
    np.testing.assert_allclose(y, 1.0, rtol=1e-6)  # 2 / sqrt(4 + 1e-6)
    with pytest.raises(ShapeError, match="must be the last axes"):
        layers.RMSNormalization(axis=1).ensure_built((3, 4))
