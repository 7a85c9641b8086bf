import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ShapeError
from dlcli.engine import activations
from tests.gradcheck import assert_close, check_layer, numeric_grad

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
# tests/layers/test_coverage.py asserts the tables together cover every registered layer.
GRADIENT_CASES = {
    "Dense": [({"units": 4}, (5,), {}), ({"units": 3, "activation": "tanh"}, (2, 5), {}),
              ({"units": 3, "use_bias": False, "activation": "softmax"}, (4,), {})],
    "Activation": [({"activation": "elu"}, (6,), {})],
    "Flatten": [({}, (2, 3, 2), {})],
    "Identity": [({}, (2, 3), {})],
    "Reshape": [({"target_shape": [3, -1]}, (2, 3, 2), {})],
    "EinsumDense": [({"equation": "ab,bc->ac", "output_shape": 4, "bias_axes": "c"}, (3,), {}),
                    ({"equation": "abc,cd->abd", "output_shape": [None, 4], "activation": "tanh"}, (5, 3), {}),
                    ({"equation": "abc,cde->abde", "output_shape": [None, 2, 3], "bias_axes": "de"}, (4, 5), {}),
                    ({"equation": "abcd,cde->abe", "output_shape": [None, 3], "bias_axes": "e"}, (2, 2, 3), {}),
                    ({"equation": "abc,cd->abd", "output_shape": [5, 4], "bias_axes": "b"}, (5, 3), {}),
                    ({"equation": "abc,bd->ad", "output_shape": 2}, (3, 4), {}),
                    ({"equation": "...b,bc->...c", "output_shape": 4, "bias_axes": "c"}, (2, 3), {}),
                    ({"equation": "ab...,bc->ac...", "output_shape": 4, "bias_axes": "c"}, (3, 2), {})],
    "Dropout": [({"rate": 0.5}, (8,), {"training": True}), ({"rate": 0.3}, (8,), {}),
                ({"rate": 0.5, "noise_shape": [None, 1, 4]}, (3, 4), {"training": True})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


# Activations whose arguments have no default in Keras (threshold) or are worth checking away from the default.
ACTIVATION_ARGS = {"threshold": {"threshold": 0.1, "default_value": -0.5}, "squareplus": {"b": 2.0},
                   "celu": {"alpha": 0.7}, "soft_shrink": {"threshold": 0.3}, "glu": {"axis": 1}}


def _activation(name):
    return activations.get({"type": name, **ACTIVATION_ARGS.get(name, {})})


@pytest.mark.parametrize("name", activations.ACTIVATIONS.names())
def test_activation_gradients(name):
    act = _activation(name)
    z = np.random.default_rng(1).normal(0, 2, (4, 6))
    y = act.forward(z)
    assert y.shape[1:] == act.output_shape(z.shape[1:])
    r = np.random.default_rng(2).normal(0, 1, y.shape)
    g = act.backward(r)
    num = numeric_grad(lambda: float((_activation(name).forward(z) * r).sum()), z)
    assert_close(g, num, name, rtol=1e-5 if name != "gelu" else 1e-3)


@pytest.mark.parametrize("name", [n for n in activations.ACTIVATIONS.names()
                                  if activations.ACTIVATIONS.get(n).output_derivative is not None])
def test_output_derivative_matches_backward_and_fills_out(name):
    act = activations.get(name)
    z = np.random.default_rng(1).normal(0, 2, (4, 5))
    y = act.forward(z)
    expected = act.backward(np.ones_like(z))
    np.testing.assert_allclose(act.output_derivative(y), expected, rtol=1e-12)
    out = np.full_like(y, np.nan)
    assert act.output_derivative(y, out) is out
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_dense_matches_keras_layout_and_shapes():
    d = layers.Dense(3, input_shape=(5,))
    y = d(np.ones((2, 5), np.float32))
    assert d.kernel.value.shape == (5, 3) and d.bias.value.shape == (3,)
    assert y.dtype == np.float32 and y.shape == (2, 3)
    assert [w.shape for w in d.get_weights()] == [(5, 3), (3,)]
    # glorot_uniform bound sqrt(6 / (fan_in + fan_out)), zero bias (Keras' defaults)
    assert np.abs(d.kernel.value).max() <= np.sqrt(6 / 8) and not d.bias.value.any()


def test_dropout_keeps_expectation_and_is_identity_at_inference():
    drop = layers.Dropout(0.5)
    x = np.ones((1000, 100), np.float32)
    assert np.array_equal(drop(x), x)
    y = drop.forward(x, training=True)
    assert abs(y.mean() - 1) < 0.02 and set(np.unique(y)) <= {0.0, 2.0}


def test_get_config_round_trips():
    d = layers.Dense(7, activation="relu", kernel_initializer="he_normal", name="hidden")
    config = d.get_config()
    assert config["type"] == "Dense" and config["units"] == 7 and config["activation"] == "relu"
    args = {k: v for k, v in config.items() if k != "type"}
    again = layers.Dense(**args)
    assert again.get_config() == config


def test_reshape_rejects_impossible_target():
    from dlcli.errors import ShapeError

    with pytest.raises(ShapeError, match="cannot reshape"):
        layers.Reshape([5, 5]).output_shape((2, 3))



def test_dropout_noise_shape_is_keras_one_entry_per_axis_batch_included():
    drop = layers.Dropout(0.5, noise_shape=[None, 1, 1, 1])  # EfficientNet's drop_connect: one draw per sample
    drop.ensure_built((2, 2, 3), np.random.default_rng(0))
    y = drop.forward(np.ones((6, 2, 2, 3), np.float32), training=True)
    assert all(len(np.unique(sample)) == 1 for sample in y) and set(np.unique(y)) == {0.0, 2.0}
    with pytest.raises(ShapeError, match="one entry per axis of the input, batch included"):
        layers.Dropout(0.5, noise_shape=[1, 3]).forward(np.ones((2, 2, 3), np.float32), training=True)


@pytest.mark.parametrize("equation,output_shape,bias_axes,shape,kernel,bias,out", [
    ("ab,bc->ac", 4, "c", (3,), (3, 4), (4,), (4,)),
    ("abc,cde->abde", [None, 2, 3], "de", (5, 4), (4, 2, 3), (2, 3), (5, 2, 3)),
    ("abcd,cde->abe", [None, 6], "e", (5, 2, 3), (2, 3, 6), (6,), (5, 6)),
    ("abc,cd->abd", [5, 4], "b", (5, 3), (3, 4), (5, 1), (5, 4)),
    ("ab...,bc->ac...", 4, "c", (3, 2), (3, 4), (4, 1), (4, 2))])
def test_einsum_dense_sizes_its_weights_as_keras(equation, output_shape, bias_axes, shape, kernel, bias, out):
    layer = layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    layer.ensure_built(shape)
    assert (layer.kernel.value.shape, layer.bias.value.shape, layer.output_shape(shape)) == (kernel, bias, out)
    assert layer.get_config()["output_shape"] == output_shape


def test_einsum_dense_fans_are_the_kernels_input_and_output_axes():
    # Keras: glorot_uniform on a (64, 8, 16) projection kernel has fans 64 and 128, not a convolution's 8*64 ...
    layer = layers.EinsumDense("abc,cde->abde", [None, 8, 16])
    layer.ensure_built((10, 64), np.random.default_rng(0))
    limit = np.sqrt(6 / (64 + 128))
    assert np.abs(layer.kernel.value).max() <= limit and np.abs(layer.kernel.value).max() > 0.99 * limit


@pytest.mark.parametrize("equation,output_shape,shape,needle", [
    ("ab,bc", 4, (3,), "not of the form"), ("abc,cd->abd", [None, 4], (3,), "does not fit"),
    ("ab,bc->ac", [4, 2], (3,), "gives 2 output axes"), ("abc,cd->abd", [6, 4], (5, 3), "output_shape says 6"),
    ("ab,bc->ad", 4, (3,), "in neither the input nor the kernel")])
def test_einsum_dense_bad_equations_name_the_problem(equation, output_shape, shape, needle):
    with pytest.raises(ShapeError, match=needle):
        layers.EinsumDense(equation, output_shape).output_shape(shape)
    with pytest.raises(ShapeError, match="bias_axes 'z'"):
        layers.EinsumDense("ab,bc->ac", 4, bias_axes="z").output_shape((3,))
