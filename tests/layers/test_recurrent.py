import json
from pathlib import Path

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
    "ConvLSTM1D": [({"filters": 2, "kernel_size": 3}, (3, 6, 2), {}),
                   ({"filters": 3, "kernel_size": 2, "strides": 2, "padding": "same", "return_sequences": True,
                     "go_backwards": True}, (4, 5, 2), {}),
                   ({"filters": 2, "kernel_size": 3, "dilation_rate": 2, "activation": "relu",
                     "recurrent_activation": "tanh", "use_bias": False, "return_state": True}, (3, 7, 1), {}),
                   ({"filters": 2, "kernel_size": 2, "padding": "same", "dropout": 0.3, "recurrent_dropout": 0.4,
                     "return_sequences": True}, (3, 4, 2), {"training": True})],
    "ConvLSTM2D": [({"filters": 2, "kernel_size": 3, "padding": "same"}, (3, 4, 5, 2), {}),
                   ({"filters": 2, "kernel_size": (2, 3), "strides": (2, 1), "return_sequences": True,
                     "return_state": True}, (3, 5, 4, 3), {}),
                   ({"filters": 3, "kernel_size": 2, "dilation_rate": 2, "activation": "elu",
                     "unit_forget_bias": False}, (2, 5, 5, 1), {})],
    "ConvLSTM3D": [({"filters": 2, "kernel_size": 2, "padding": "same", "return_sequences": True}, (3, 3, 2, 3, 1), {}),
                   ({"filters": 2, "kernel_size": (2, 1, 2), "strides": 2}, (2, 4, 3, 4, 2), {})],
}

MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]], bool)  # post-padding, none, holes


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts, kernel_path):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


FLAGS = [{}, {"return_sequences": True}, {"go_backwards": True}, {"return_sequences": True, "go_backwards": True},
         {"return_state": True}, {"return_sequences": True, "return_state": True, "go_backwards": True},
         {"use_bias": False}]


@pytest.mark.parametrize("name", ["SimpleRNN", "LSTM", "GRU"])
@pytest.mark.parametrize("flags", FLAGS)
def test_gradients_with_masks_and_flags(name, flags, kernel_path):
    check_layer(layers.LAYERS.get(name)(3, **flags), (5, 2), mask=MASK)


@pytest.mark.parametrize("name,extra", [("SimpleRNN", {}), ("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False})])
def test_gradients_with_dropout_and_masks(name, extra):
    layer = layers.LAYERS.get(name)(3, dropout=0.4, recurrent_dropout=0.3, return_sequences=True, **extra)
    check_layer(layer, (5, 2), mask=MASK, training=True)
    check_layer(layers.LAYERS.get(name)(3, dropout=0.4, **extra), (5, 2), mask=MASK, training=True)


@pytest.mark.parametrize("name", ["SimpleRNN", "LSTM", "GRU"])
@pytest.mark.parametrize("flags", [{"return_sequences": True, "return_state": True, "go_backwards": True},
                                   {"dropout": 0.4, "recurrent_dropout": 0.3, "return_sequences": True}])
def test_gradients_over_parts_of_the_batch(name, flags, kernel_path, monkeypatch):
    """The batch in parts (layers/recurrent.batch_parts, one sample each here): each part's loop, its share of the
    weight gradients added in part order, the states and the input gradient put back together."""
    monkeypatch.setattr("dlcli.layers.recurrent.PART_SAMPLES", 1)
    layer = layers.LAYERS.get(name)(3, **flags)
    check_layer(layer, (5, 2), mask=MASK, training="dropout" in flags)
    assert len(layer.parts) == 3


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


@pytest.mark.parametrize("name", ["SimpleRNN", "LSTM", "GRU"])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("float64", 1e-13)])
def test_compiled_loops_equal_the_numpy_twins(name, flags, masked, dtype, tol, monkeypatch):
    """The compiled SimpleRNN, LSTM and GRU loops (dlcli/kernels/recurrent.py) against their NumPy twins: outputs,
    input and weight gradients within float32 (float64) rounding, with masks, go_backwards, sequences and state
    gradients."""
    from dlcli.layers import recurrent_cells

    mask = np.random.default_rng(3).random((6, 20)) > 0.3 if masked else None
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    assert recurrent_cells._compiled_loop("tanh", "sigmoid", None, np.dtype(dtype)) is not None  # the kernels run
    compiled = _trained_pass(name, "numba", dtype, mask, monkeypatch, **flags)
    twin = _trained_pass(name, "numpy", dtype, mask, monkeypatch, **flags)
    for a, b in zip(compiled, twin):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())



def test_the_lstm_input_gradient_takes_blas_where_numba_does_not_compile_for_avx512(tmp_path):
    """Without AVX-512 (NUMBA_CPU_NAME: numba compiling for a generic CPU) the LSTM backward's input gradient takes
    dz.T copied and BLAS, where the block product reads it in place: the twin's values there too. In a process of
    its own."""
    import os
    import subprocess
    import sys

    code = ("import os, numpy as np\n"
            "from dlcli import layers\nfrom dlcli.kernels import gemm\n"
            "assert not gemm.AVX512\n"
            "rng = np.random.default_rng(0)\n"
            "x, g = rng.normal(size=(37, 9, 5)).astype(np.float32), rng.normal(size=(37, 6)).astype(np.float32)\n"
            "mask = rng.random((37, 9)) > 0.3\n"
            "out = []\n"
            "for path in ('numba', 'numpy'):\n"
            "    os.environ['DLCLI_KERNELS'] = path\n"
            "    lstm = layers.LSTM(6)\n"
            "    lstm.ensure_built((9, 5), np.random.default_rng(1))\n"
            "    lstm.input_mask = mask\n"
            "    lstm.forward(x, training=True)\n"
            "    out.append([lstm.backward(g), lstm.kernel.grad.copy()])\n"
            "for a, b in zip(*out):\n"
            "    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6 * np.abs(b).max())\n"
            "print('blas')\n")
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout == "blas\n", done.stderr

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


# --- ConvLSTM ----------------------------------------------------------------------------------------------------
def conv_reference(x, w, strides, padding, dilation=None):
    """A direct convolution, position by position (channels_last x (N, *S, C), w (*k, C, out)); TF's 'same' pads."""
    rank = x.ndim - 2
    k, dilation = w.shape[:rank], dilation or (1,) * rank
    span = [(kk - 1) * d + 1 for kk, d in zip(k, dilation)]
    if padding == "same":
        out = [-(-n // s) for n, s in zip(x.shape[1:-1], strides)]
        total = [max((m - 1) * s + e - n, 0) for m, s, e, n in zip(out, strides, span, x.shape[1:-1])]
        x = np.pad(x, [(0, 0)] + [(t // 2, t - t // 2) for t in total] + [(0, 0)])
    out = [(n - e) // s + 1 for n, e, s in zip(x.shape[1:-1], span, strides)]
    y = np.zeros((x.shape[0], *out, w.shape[-1]))
    for pos in np.ndindex(*out):
        for tap in np.ndindex(*k):
            idx = tuple(p * s + t * d for p, s, t, d in zip(pos, strides, tap, dilation))
            y[(slice(None), *pos)] += x[(slice(None), *idx)] @ w[tap]
    return y


def convlstm_step(layer):
    W, U = layer.kernel.value, layer.recurrent_kernel.value
    b, F = layer.bias.value if layer.use_bias else 0, layer.filters

    def step(x, h, c):
        z = conv_reference(x, W, layer.strides, layer.padding, layer.dilation_rate) + b \
            + conv_reference(h, U, (1,) * layer.rank, "same")
        i, f, g, o = sig(z[..., :F]), sig(z[..., F:2 * F]), np.tanh(z[..., 2 * F:3 * F]), sig(z[..., 3 * F:])
        c = f * c + i * g
        return [o * np.tanh(c), c]
    return step


def run_reference_positions(step, x, states, mask=None, go_backwards=False):
    """run_reference with a mask of (batch, T) or per position (batch, T, *spatial), as Keras' RNN broadcasts it."""
    if go_backwards:
        x, mask = x[:, ::-1], None if mask is None else mask[:, ::-1]
    outputs = []
    for t in range(x.shape[1]):
        new = step(x[:, t], *states)
        if mask is not None:
            m = mask[:, t].reshape(mask[:, t].shape + (1,) * (states[0].ndim - mask[:, t].ndim))
            new = [np.where(m, n, s) for n, s in zip(new, states)]
        states = new
        outputs.append(states[0])
    return np.stack(outputs, axis=1), states


CONV_LSTM_CASES = [("ConvLSTM1D", {"kernel_size": 3, "strides": 2, "padding": "same"}, (5, 7, 2)),
                   ("ConvLSTM2D", {"kernel_size": (3, 2), "padding": "valid", "dilation_rate": (1, 2)}, (4, 5, 6, 2)),
                   ("ConvLSTM2D", {"kernel_size": 3, "padding": "same"}, (4, 4, 5, 3)),
                   ("ConvLSTM3D", {"kernel_size": 2, "padding": "same"}, (3, 3, 2, 3, 1))]


@pytest.mark.parametrize("name,kw,shape", CONV_LSTM_CASES)
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "steps", "positions"])
def test_conv_lstm_matches_reference_step(name, kw, shape, go_backwards, mask_kind):
    layer = layers.LAYERS.get(name)(filters=3, return_sequences=True, return_state=True, go_backwards=go_backwards,
                                    **kw)
    layer.dtype = "float64"
    rng = np.random.default_rng(9)
    layer.ensure_built(shape, rng)
    for p in layer.params.values():
        p.value = rng.normal(0, 0.4, p.value.shape)
    x = rng.normal(0, 1, (3, *shape))
    state_shape = layer.output_shape(shape)[1]
    mask = None
    if mask_kind == "steps":
        mask = np.array([[1] * (shape[0] - 2) + [0, 0], [1] * shape[0], [0, 1] * (shape[0] // 2) + [1] * (shape[0] % 2)],
                        bool)
    elif mask_kind == "positions":
        mask = rng.random((3, *shape[:-1])) > 0.3
    layer.input_mask = mask
    if mask_kind == "positions" and state_shape[:-1] != shape[1:-1]:  # Keras fails there too (shapes differ)
        with pytest.raises(ShapeError, match="a mask per position"):
            layer.forward(x)
        return
    seq, h, c = layer.forward(x)
    ref_seq, (ref_h, ref_c) = run_reference_positions(convlstm_step(layer), x, [np.zeros((3, *state_shape))] * 2,
                                                      mask, go_backwards)
    np.testing.assert_allclose(seq, ref_seq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, ref_h, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, ref_c, rtol=1e-10, atol=1e-12)
    assert layer.compute_mask(x, mask)[0] is mask


@pytest.mark.parametrize("flags", FLAGS)
def test_conv_lstm_gradients_with_masks(flags):
    steps = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], bool)
    check_layer(layers.ConvLSTM2D(2, 2, padding="same", **flags), (4, 3, 3, 2), mask=steps)
    positions = np.random.default_rng(3).random((3, 4, 5)) > 0.4
    check_layer(layers.ConvLSTM1D(2, 3, padding="same", **flags), (4, 5, 2), mask=positions)


def test_conv_lstm_gradients_with_dropout_and_masks():
    steps = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]], bool)
    check_layer(layers.ConvLSTM1D(2, 2, padding="same", dropout=0.4, recurrent_dropout=0.3, return_sequences=True),
                (4, 5, 2), mask=steps, training=True)


def test_conv_lstm_shapes_weights_config_and_errors():
    layer = layers.ConvLSTM2D(4, (3, 2), strides=(2, 1), return_sequences=True, return_state=True)
    assert layer.output_shape((None, 9, 6, 3)) == [(None, 4, 5, 4), (4, 5, 4), (4, 5, 4)]
    layer.ensure_built((7, 9, 6, 3), np.random.default_rng(0))
    assert [(n, w.shape) for n, w in zip(layer.params, layer.get_weights())] == [
        ("kernel", (3, 2, 3, 16)), ("recurrent_kernel", (3, 2, 4, 16)), ("bias", (16,))]
    np.testing.assert_array_equal(layer.bias.value, np.r_[np.zeros(4), np.ones(4), np.zeros(8)])  # unit_forget_bias
    assert layer.count_params() == 3 * 2 * 3 * 16 + 3 * 2 * 4 * 16 + 16
    # per step: 4 * 5 positions x 6 taps x (3 input + 4 recurrent channels) x 16 outputs, multiply and add
    assert layer.flops((7, 9, 6, 3)) == 2 * 7 * 20 * 6 * 7 * 16
    assert layers.ConvLSTM3D(2, 3).output_shape((5, 4, 4, 4, 1)) == (2, 2, 2, 2)
    config = layer.get_config()
    assert config["filters"] == 4 and config["kernel_size"] == [3, 2] and config["padding"] == "valid"
    assert layers.ConvLSTM2D(**{k: v for k, v in config.items() if k != "type"}).get_config() == config
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 5, 5, 2)).astype(np.float32)
    dropout = layers.ConvLSTM2D(2, 3, dropout=0.5, recurrent_dropout=0.5)
    np.testing.assert_array_equal(dropout(x), dropout.forward(x, training=False))
    dropout.forward(x, training=True)
    assert dropout.dmask.shape == (4, 2, 5, 5, 2)  # Keras' ConvLSTMCell: one mask per gate, every step
    with pytest.raises(ShapeError, match=r"ConvLSTM2D 'c' expects input \(batch, timesteps, dim1, dim2, channels\)"):
        layers.ConvLSTM2D(2, 3, name="c").output_shape((5, 5, 2))
    with pytest.raises(ShapeError, match="needs fixed dim1, dim2"):
        layers.ConvLSTM2D(2, 3).output_shape((None, None, 5, 2))
    with pytest.raises(ShapeError, match="larger than its input"):
        layers.ConvLSTM1D(2, 5).output_shape((3, 4, 2))
    masked = layers.ConvLSTM1D(2, 3, name="v")
    masked.ensure_built((3, 6, 2))
    masked.input_mask = np.ones((2, 3, 6), bool)
    with pytest.raises(ShapeError, match="ConvLSTM1D 'v': a mask per position"):
        masked.forward(np.ones((2, 3, 6, 2)))
    for kw, match in [({"filters": 0}, "ConvLSTM2D: filters must be a positive integer"),
                      ({"padding": "causal"}, "ConvLSTM2D: padding must be one of valid, same"),
                      ({"data_format": "channels_first"}, "ConvLSTM2D: dlcli is channels_last only"),
                      ({"strides": 2, "dilation_rate": 2}, "ConvLSTM2D: strides > 1 cannot be combined"),
                      ({"kernel_size": (3, 3, 3)}, "ConvLSTM2D: kernel_size must be"),
                      ({"recurrent_dropout": 1.0}, "recurrent_dropout must be in"),
                      ({"activation": "softmax"}, "not available in recurrent")]:
        with pytest.raises(ConfigError, match=match):
            layers.ConvLSTM2D(**{"filters": 2, "kernel_size": 3, **kw})


def _keras_conv_lstm_cases():
    data = np.load(Path(__file__).parents[1] / "fixtures" / "keras" / "catalogue_convlstm.npz")
    spec = json.loads(str(data["spec"]))
    return [pytest.param(case, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")},
                         id=f"{i}-{case['type']}") for i, case in enumerate(spec)]


@pytest.mark.parametrize("spec,arrays", _keras_conv_lstm_cases())
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conv_lstm_matches_keras(spec, arrays, dtype):
    """Keras 3.15.1 (torch backend, float64) wrote outputs and gradients (tests/fixtures/keras/make_catalogue.py):
    dlcli's float64 agrees to about 1e-15, its float32 within 6e-7 of each array's largest value."""
    layer = layers.LAYERS.get(spec["type"])(**{k: v for k, v in spec.items() if k != "type"})
    layer.dtype = dtype
    x = arrays["x"].astype(dtype)
    layer.ensure_built(x.shape[1:], np.random.default_rng(0))
    weights = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("weight/")}
    assert list(weights) == list(layer.params)  # Keras' order and names: kernel, recurrent_kernel[, bias]
    for name, value in weights.items():
        layer.params[name].value = value.astype(dtype)
        layer.params[name].grad = np.zeros_like(layer.params[name].value)
    layer.input_mask = arrays.get("mask")

    def close(actual, expected):
        assert actual.dtype == dtype
        scale = max(1.0, float(np.abs(expected).max()))
        tol = 1e-12 if dtype == "float64" else 1e-5
        np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)

    ys = layer.forward(x)
    ys = ys if isinstance(ys, list) else [ys]
    count = len([k for k in arrays if k.startswith("y/")])
    assert len(ys) == count
    for k, y in enumerate(ys):
        close(y, arrays[f"y/{k}"])
    rs = [arrays[f"r/{k}"].astype(dtype) for k in range(count)]
    close(layer.backward(rs if count > 1 else rs[0]), arrays["grad"])
    for name in weights:
        close(layer.params[name].grad, arrays[f"weight_grad/{name}"])


def test_a_conv_lstm_config_trains_shows_its_shapes_and_exports_from_the_cli(tmp_path):
    """The user's way: a YAML model with ConvLSTM2D on clips (npz), `train`, `inspect-shapes`, `export`."""
    pytest.importorskip("onnxruntime")
    import yaml
    from typer.testing import CliRunner

    from dlcli.cli import app
    from tests.runs_fixture import write_tiny_config

    config = yaml.safe_load(Path(write_tiny_config(tmp_path)).read_text())
    x = np.random.default_rng(0).normal(size=(96, 3, 5, 5, 1)).astype(np.float32)
    total = x.sum((1, 2, 3, 4))
    np.savez(config["data"]["path"], x=x, y=np.digitize(total, np.quantile(total, [1 / 3, 2 / 3])))
    config["model"] = {"input_shape": [3, 5, 5, 1], "layers": [
        {"type": "ConvLSTM2D", "filters": 3, "kernel_size": 3, "padding": "same", "return_sequences": True},
        {"type": "ConvLSTM2D", "filters": 2, "kernel_size": 2, "strides": 2, "dropout": 0.2},
        {"type": "Flatten"}, {"type": "Dense", "units": 3, "activation": "softmax"}]}
    path = tmp_path / "clips.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    shapes = runner.invoke(app, ["inspect-shapes", str(path)])
    assert shapes.exit_code == 0, shapes.output
    assert "(None, 3, 5, 5, 3)" in shapes.output and "(None, 2, 2, 2)" in shapes.output
    assert f"{3 * 3 * 1 * 12 + 3 * 3 * 3 * 12 + 12:,}" in shapes.output  # 444: Keras' count for ConvLSTM2D(3, 3)
    trained = runner.invoke(app, ["train", str(path), "--runs-dir", str(tmp_path / "runs"), "--name", "clips", "-q"])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / trained.output.strip().splitlines()[-1].split("/")[-1]
    exported = runner.invoke(app, ["export", str(run), "--output", str(tmp_path / "clips.onnx")])
    assert exported.exit_code == 0 and "largest difference" in exported.output, exported.output
    bad = runner.invoke(app, ["inspect-shapes", str(path), "--set", "model.layers.0.padding=full"])
    assert bad.exit_code == 2 and "ConvLSTM2D: padding must be one of valid, same" in bad.output
    assert "Traceback" not in bad.output
    # the argument ConvLSTM gives its parent itself (filters as units) is no config key: one line, not a TypeError
    bad = runner.invoke(app, ["inspect-shapes", str(path), "--set", "model.layers.0.units=4"])
    assert bad.exit_code == 2 and "unknown key 'units' for ConvLSTM2D" in bad.output


def test_arguments_a_layer_gives_its_parent_are_not_config_keys():
    from dlcli.registry import parameters

    assert "units" not in parameters(layers.ConvLSTM2D)[0] and "filters" in parameters(layers.ConvLSTM2D)[0]
    assert "recurrent_activation" not in parameters(layers.SimpleRNN)[0]  # SimpleRNN passes Recurrent "sigmoid"
    assert "return_sequences" in parameters(layers.LSTMCell)[0]  # set by RNN, reaches LSTM through **kw
