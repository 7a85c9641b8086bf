import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
GRADIENT_CASES = {
    "SimpleRNN": [({"units": 3}, (5, 4), {}), ({"units": 3, "activation": "relu", "return_sequences": True}, (4, 2), {}),
                  ({"units": 2, "dropout": 0.3, "recurrent_dropout": 0.3}, (4, 3), {"training": True})],
    "LSTM": [({"units": 3}, (5, 4), {}), ({"units": 3, "return_sequences": True, "go_backwards": True}, (4, 2), {}),
             ({"units": 2, "activation": "relu", "recurrent_activation": "tanh", "use_bias": False}, (4, 3), {}),
             ({"units": 2, "dropout": 0.3, "recurrent_dropout": 0.3}, (4, 3), {"training": True})],
    "GRU": [({"units": 3}, (5, 4), {}), ({"units": 3, "reset_after": False, "return_sequences": True}, (4, 2), {}),
            ({"units": 2, "activation": "elu", "recurrent_activation": "tanh"}, (4, 3), {}),
            ({"units": 2, "dropout": 0.3, "recurrent_dropout": 0.3}, (4, 3), {"training": True})],
}

MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]], bool)  # post-padding, none, holes


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts, kernel_path):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


FLAGS = [{}, {"return_sequences": True}, {"go_backwards": True}, {"return_sequences": True, "go_backwards": True},
         {"return_state": True}, {"return_sequences": True, "return_state": True, "go_backwards": True}]


@pytest.mark.parametrize("name", ["SimpleRNN", "LSTM", "GRU"])
@pytest.mark.parametrize("flags", FLAGS)
def test_gradients_with_masks_and_flags(name, flags, kernel_path):
    check_layer(layers.LAYERS.get(name)(3, **flags), (5, 2), mask=MASK)


@pytest.mark.parametrize("name,extra", [("SimpleRNN", {}), ("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False})])
def test_gradients_with_dropout_and_masks(name, extra):
    layer = layers.LAYERS.get(name)(3, dropout=0.4, recurrent_dropout=0.3, return_sequences=True, **extra)
    check_layer(layer, (5, 2), mask=MASK, training=True)
    check_layer(layers.LAYERS.get(name)(3, dropout=0.4, **extra), (5, 2), mask=MASK, training=True)


def _trained_pass(name, path, dtype, mask, monkeypatch, **flags):
    """Output, input gradient and weight gradients of one forward + backward on kernel path `path`."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    layer = layers.LAYERS.get(name)(16, dtype=dtype, **flags)
    layer.ensure_built((20, 8), np.random.default_rng(0))
    layer.input_mask = mask
    y = layer.forward(np.random.default_rng(1).normal(0, 1, (6, 20, 8)).astype(dtype), training=True)
    for p in layer.params.values():
        p.grad = np.zeros_like(p.value)
    ys = y if isinstance(y, list) else [y]
    rng = np.random.default_rng(2)
    dx = layer.backward([rng.normal(0, 1, o.shape).astype(dtype) for o in ys] if isinstance(y, list)
                        else rng.normal(0, 1, y.shape).astype(dtype))
    return [*ys, dx, *(p.grad for p in layer.params.values())]


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("float64", 1e-13)])
def test_compiled_loops_equal_the_numpy_twins(flags, masked, dtype, tol, monkeypatch):
    """The compiled LSTM backward (dlcli/kernels/recurrent.py) against its NumPy twin: outputs, input and weight
    gradients within float32 (float64) rounding, with masks, go_backwards, sequences and state gradients."""
    from dlcli.layers import recurrent_cells

    mask = np.random.default_rng(3).random((6, 20)) > 0.3 if masked else None
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    assert recurrent_cells._compiled_loop("tanh", "sigmoid", None) is not None  # the kernel path is taken
    compiled = _trained_pass("LSTM", "numba", dtype, mask, monkeypatch, **flags)
    twin = _trained_pass("LSTM", "numpy", dtype, mask, monkeypatch, **flags)
    for a, b in zip(compiled, twin):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


# --- reference steps written out (Keras 3 math and gate order) --------------------------------------------------
def sig(z):
    return 1 / (1 + np.exp(-z))


def run_reference(step, x, states, mask=None, go_backwards=False):
    """Loop over time with Keras' mask rule: a masked step keeps every state and repeats the last output."""
    if go_backwards:
        x = x[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    outputs = []
    for t in range(x.shape[1]):
        new = step(x[:, t], *states)
        if mask is not None:
            m = mask[:, t:t + 1]
            new = [np.where(m, n, s) for n, s in zip(new, states)]
        states = new
        outputs.append(states[0])
    return np.stack(outputs, axis=1), states


def lstm_step(W, U, b):
    u = U.shape[0]

    def step(x, h, c):
        z = x @ W + h @ U + b
        i, f, g, o = sig(z[:, :u]), sig(z[:, u:2 * u]), np.tanh(z[:, 2 * u:3 * u]), sig(z[:, 3 * u:])
        c = f * c + i * g
        return [o * np.tanh(c), c]
    return step


def gru_step(W, U, b, reset_after):
    u = U.shape[0]

    def step(x, h):
        if reset_after:
            xz = x @ W + b[0]
            inner = h @ U + b[1]
            z, r = sig(xz[:, :u] + inner[:, :u]), sig(xz[:, u:2 * u] + inner[:, u:2 * u])
            hh = np.tanh(xz[:, 2 * u:] + r * inner[:, 2 * u:])
        else:
            xz = x @ W + b
            inner = h @ U[:, :2 * u]
            z, r = sig(xz[:, :u] + inner[:, :u]), sig(xz[:, u:2 * u] + inner[:, u:])
            hh = np.tanh(xz[:, 2 * u:] + (r * h) @ U[:, 2 * u:])
        return [z * h + (1 - z) * hh]
    return step


def simple_step(W, U, b):
    return lambda x, h: [np.tanh(x @ W + h @ U + b)]


def _layer_and_step(name, units, features, **kw):
    layer = layers.LAYERS.get(name)(units, dtype="float64", **kw)
    layer.ensure_built((6, features), np.random.default_rng(3))
    rng = np.random.default_rng(4)
    layer.set_weights([rng.normal(0, 0.5, w.shape) for w in layer.get_weights()])
    W, U, b = layer.get_weights()
    step = {"LSTM": lambda: lstm_step(W, U, b), "SimpleRNN": lambda: simple_step(W, U, b),
            "GRU": lambda: gru_step(W, U, b, kw.get("reset_after", True))}[name]()
    n_states = 2 if name == "LSTM" else 1
    return layer, step, n_states


@pytest.mark.parametrize("name,kw", [("SimpleRNN", {}), ("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False})])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_outputs_match_reference_step(name, kw, go_backwards, masked):
    layer, step, n_states = _layer_and_step(name, 4, 3, return_sequences=True, return_state=True,
                                            go_backwards=go_backwards, **kw)
    x = np.random.default_rng(5).normal(0, 1, (3, 6, 3))
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 0, 1, 1, 0, 1]], bool) if masked else None
    layer.input_mask = mask
    seq, *states = layer.forward(x)
    ref_seq, ref_states = run_reference(step, x, [np.zeros((3, 4))] * n_states, mask, go_backwards)
    np.testing.assert_allclose(seq, ref_seq, rtol=1e-10, atol=1e-12)
    for s, r in zip(states, ref_states):
        np.testing.assert_allclose(s, r, rtol=1e-10, atol=1e-12)


def test_float32_fast_path_matches_reference():
    layer, step, _ = _layer_and_step("LSTM", 5, 3)
    x = np.random.default_rng(6).normal(0, 1, (4, 6, 3))
    ref, _ = run_reference(step, x, [np.zeros((4, 5))] * 2)
    layer.set_weights(layer.get_weights())
    for p in layer.params.values():
        p.value = p.value.astype(np.float32)
    y = layer.forward(x.astype(np.float32))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref[:, -1], rtol=1e-5, atol=1e-6)


# --- Keras layouts and behaviour -------------------------------------------------------------------------------
def test_keras_weight_layouts_and_initialisers():
    lstm, gru = layers.LSTM(4), layers.GRU(4)
    lstm.ensure_built((7, 3))
    gru.ensure_built((7, 3))
    assert [w.shape for w in lstm.get_weights()] == [(3, 16), (4, 16), (16,)]
    assert [w.shape for w in gru.get_weights()] == [(3, 12), (4, 12), (2, 12)]
    assert list(lstm.params) == ["kernel", "recurrent_kernel", "bias"]
    # unit_forget_bias: the forget quarter starts at one; orthogonal recurrent kernel per Keras
    np.testing.assert_array_equal(lstm.bias.value, np.r_[np.zeros(4), np.ones(4), np.zeros(8)])
    U = lstm.recurrent_kernel.value
    np.testing.assert_allclose(U @ U.T, np.eye(4), atol=1e-5)
    old = layers.GRU(4, reset_after=False)
    old.ensure_built((7, 3))
    assert old.bias.value.shape == (12,)


def test_output_shapes_masks_and_states():
    lstm = layers.LSTM(4, return_sequences=True, return_state=True)
    assert lstm.output_shape((7, 3)) == [(7, 4), (4,), (4,)]
    assert layers.GRU(4).output_shape((7, 3)) == (4,)
    assert layers.SimpleRNN(4, return_state=True).output_shape((7, 3)) == [(4,), (4,)]
    mask = np.ones((2, 7), bool)
    assert lstm.compute_mask(None, mask)[0] is mask and lstm.compute_mask(None, mask)[1:] == [None, None]
    assert layers.GRU(4).compute_mask(None, mask) is None
    with pytest.raises(ShapeError, match="timesteps, features"):
        layers.LSTM(4).output_shape((7,))


def test_masked_padding_equals_shorter_sequence():
    layer, _, _ = _layer_and_step("GRU", 3, 2)
    x = np.random.default_rng(7).normal(0, 1, (2, 6, 2))
    layer.input_mask = np.array([[1, 1, 1, 1, 0, 0]] * 2, bool)
    padded = layer.forward(x)
    layer.input_mask = None
    np.testing.assert_allclose(padded, layer.forward(x[:, :4]), rtol=1e-12)


def test_dropout_only_while_training_and_masks_fixed_per_sequence():
    layer = layers.LSTM(3, dropout=0.5, recurrent_dropout=0.5)
    x = np.random.default_rng(8).normal(0, 1, (4, 5, 2)).astype(np.float32)
    inference = layer(x)
    np.testing.assert_array_equal(inference, layer.forward(x, training=False))
    assert not np.allclose(layer.forward(x, training=True), inference)
    # one mask per gate (Keras' implementation 1 when recurrent_dropout > 0), shared by all time steps
    assert layer.dmask.shape == (4, 4, 2) and set(np.unique(layer.dmask)) <= {0.0, 2.0}
    layer = layers.GRU(3, dropout=0.5)
    layer(x)
    layer.forward(x, training=True)
    assert layer.dmask.shape == (1, 4, 2)


def test_config_round_trip_and_bad_arguments():
    lstm = layers.LSTM(8, return_sequences=True, dropout=0.1, kernel_regularizer="l2", name="enc")
    config = lstm.get_config()
    assert config["type"] == "LSTM" and config["units"] == 8 and config["unit_forget_bias"] is True
    again = layers.LSTM(**{k: v for k, v in config.items() if k != "type"})
    assert again.get_config() == config
    assert layers.GRU(2).get_config()["reset_after"] is True
    with pytest.raises(ConfigError, match="not available in recurrent"):
        layers.LSTM(4, activation="softmax")
    with pytest.raises(ConfigError, match="dropout"):
        layers.GRU(4, dropout=1.0)


def test_regularizers_reach_the_weights():
    layer = layers.SimpleRNN(3, kernel_regularizer="l2", recurrent_regularizer="l1", bias_regularizer="l2")
    layer.ensure_built((4, 2))
    assert all(p.regularizer is not None for p in layer.params.values())
    assert layer.regularization_loss() > 0
