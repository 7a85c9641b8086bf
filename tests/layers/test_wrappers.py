import numpy as np
import pytest

from dlcli import layers
from dlcli.engine.graph import Graph, Input
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]], bool)

GRADIENT_CASES = {
    "Bidirectional": [({"layer": {"type": "LSTM", "units": 3}}, (4, 2), {}),
                      ({"layer": {"type": "GRU", "units": 2, "return_sequences": True}, "merge_mode": "sum"}, (4, 3), {}),
                      ({"layer": {"type": "SimpleRNN", "units": 2, "return_sequences": True}, "merge_mode": "mul"},
                       (4, 2), {}),
                      ({"layer": {"type": "LSTM", "units": 2, "dropout": 0.3}, "merge_mode": "ave"}, (4, 2),
                       {"training": True})],
    "TimeDistributed": [({"layer": {"type": "Dense", "units": 3, "activation": "tanh"}}, (4, 5), {})],
    # at inference (training normalises the kernel at every call, so central differences would see it move)
    "SpectralNormalization": [({"layer": {"type": "Dense", "units": 3}}, (4,), {}),
                              ({"layer": {"type": "Conv1D", "filters": 2, "kernel_size": 2}, "power_iterations": 2},
                               (5, 2), {})],
    "RNN": [({"cell": {"type": "LSTMCell", "units": 3}, "return_sequences": True}, (4, 2), {}),
            ({"cell": {"type": "GRUCell", "units": 2, "reset_after": False}, "go_backwards": True}, (4, 3),
             {"mask": MASK}),
            ({"cell": [{"type": "SimpleRNNCell", "units": 3}, {"type": "LSTMCell", "units": 2}],
              "go_backwards": True, "return_sequences": True}, (4, 2), {"mask": MASK})],
    "StackedRNNCells": [({"cells": [{"type": "GRUCell", "units": 3}, {"type": "SimpleRNNCell", "units": 2}]},
                         (4, 2), {})],
    "SimpleRNNCell": [({"units": 3, "activation": "relu"}, (4, 2), {})],
    "LSTMCell": [({"units": 2, "unit_forget_bias": False}, (4, 3), {})],
    "GRUCell": [({"units": 2}, (3, 2), {})]
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
@pytest.mark.parametrize("flags", [{"return_sequences": True}, {"return_state": True},
                                   {"return_sequences": True, "return_state": True}])
def test_bidirectional_gradients_with_masks(merge_mode, flags):
    layer = layers.Bidirectional(layers.LSTM(2, **flags), merge_mode=merge_mode)
    check_layer(layer, (4, 2), mask=MASK)


def test_bidirectional_is_forward_plus_reversed_backward():
    bi = layers.Bidirectional(layers.GRU(3, return_sequences=True), name="bi")
    x = np.random.default_rng(0).normal(0, 1, (2, 5, 4)).astype(np.float32)
    y = bi(x)
    assert y.shape == (2, 5, 6)
    assert bi.forward_layer.name.startswith("forward_gru") and bi.backward_layer.name.startswith("backward_gru")
    assert bi.backward_layer.go_backwards and not bi.forward_layer.go_backwards
    fwd = layers.GRU(3, return_sequences=True)
    bwd = layers.GRU(3, return_sequences=True, go_backwards=True)
    fwd(x), bwd(x)
    fwd.set_weights(bi.forward_layer.get_weights())
    bwd.set_weights(bi.backward_layer.get_weights())
    np.testing.assert_allclose(y[..., :3], fwd.forward(x), rtol=1e-6)
    np.testing.assert_allclose(y[..., 3:], bwd.forward(x)[:, ::-1], rtol=1e-6)


def test_bidirectional_weights_are_the_wrappers_in_keras_order():
    bi = layers.Bidirectional(layers.LSTM(3), name="bi")
    bi.ensure_built((5, 2), np.random.default_rng(1))
    assert list(bi.params) == ["forward/kernel", "forward/recurrent_kernel", "forward/bias",
                               "backward/kernel", "backward/recurrent_kernel", "backward/bias"]
    assert bi.params["forward/kernel"].path == "bi/forward/kernel"
    assert bi.count_params() == 2 * (2 * 12 + 3 * 12 + 12)
    assert bi.forward_layer.rng is bi.rng
    new = [np.full(w.shape, k, np.float32) for k, w in enumerate(bi.get_weights())]
    bi.set_weights(new)
    assert bi.backward_layer.kernel.value[0, 0] == 3  # the inner layers see the wrapper's weights


def test_bidirectional_shapes_masks_and_config_round_trip():
    lstm = {"type": "LSTM", "units": 4, "return_sequences": True, "return_state": True}
    assert layers.Bidirectional(lstm).output_shape((7, 3)) == [(7, 8), (4,), (4,), (4,), (4,)]
    assert layers.Bidirectional(dict(lstm, return_state=False), merge_mode=None).output_shape((7, 3)) == \
        [(7, 4), (7, 4)]
    assert layers.Bidirectional({"type": "GRU", "units": 4}, merge_mode="sum").output_shape((7, 3)) == (4,)
    mask = np.ones((2, 7), bool)
    assert layers.Bidirectional(dict(lstm, return_state=False)).compute_mask(None, mask) is mask
    assert layers.Bidirectional({"type": "GRU", "units": 4}).compute_mask(None, mask) is None
    bi = layers.Bidirectional(layers.GRU(5, return_sequences=True), merge_mode="ave", name="bi")
    config = bi.get_config()
    assert config["layer"]["type"] == "GRU" and config["layer"]["units"] == 5 and config["merge_mode"] == "ave"
    again = layers.Bidirectional(**{k: v for k, v in config.items() if k != "type"})
    assert again.get_config() == config
    with pytest.raises(ConfigError, match="merge_mode"):
        layers.Bidirectional(lstm, merge_mode="max")
    with pytest.raises(ConfigError, match="recurrent"):
        layers.Bidirectional({"type": "Dense", "units": 3})


def test_bidirectional_masked_sequence_outputs_zeros_at_padding():
    inp = Input((5,), dtype="int64")
    bi = layers.Bidirectional(layers.LSTM(3, return_sequences=True))
    graph = Graph([inp], [bi(layers.Embedding(10, 2, mask_zero=True)(inp))])
    (y,) = graph.forward([np.array([[4, 2, 7, 0, 0]])])
    np.testing.assert_array_equal(y[0, 3:], 0)  # Keras forces zero outputs at masked steps inside Bidirectional
    assert np.all(y[0, :3] != 0)


def test_time_distributed_dense_shapes_and_values():
    td = layers.TimeDistributed(layers.Dense(4), name="td")
    x = np.random.default_rng(2).normal(0, 1, (3, 5, 6)).astype(np.float32)
    y = td(x)
    assert y.shape == (3, 5, 4) and td.output_shape((5, 6)) == (5, 4)
    assert list(td.params) == ["kernel", "bias"]
    np.testing.assert_allclose(y[1, 2], x[1, 2] @ td.layer.kernel.value + td.layer.bias.value, rtol=1e-5, atol=1e-6)
    config = td.get_config()
    assert layers.TimeDistributed(**{k: v for k, v in config.items() if k != "type"}).get_config() == config
    with pytest.raises(ShapeError, match="rank >= 3"):
        td.output_shape((6,))


def test_time_distributed_conv2d_shape_inference():
    td = layers.TimeDistributed({"type": "Conv2D", "filters": 4, "kernel_size": 3})
    assert td.output_shape((5, 8, 8, 3)) == (5, 6, 6, 4)
    y = td(np.zeros((2, 5, 8, 8, 3), np.float32))
    assert y.shape == (2, 5, 6, 6, 4)


def test_spectral_normalization_brings_the_largest_singular_value_to_one():
    layer = layers.SpectralNormalization(layer={"type": "Dense", "units": 6}, power_iterations=1)
    layer.ensure_built((8,), np.random.default_rng(0))
    assert [p.name for p in layer.weights] == ["kernel", "bias", "vector_u"]
    assert [p.name for p in layer.trainable_weights] == ["kernel", "bias"]
    x = np.ones((2, 8), np.float32)
    before = layer.kernel.value.copy()
    layer.forward(x)
    np.testing.assert_array_equal(layer.kernel.value, before)  # inference leaves the kernel alone
    for _ in range(30):  # the power method converges over training steps, one iteration each
        layer.forward(x, training=True)
    assert np.linalg.svd(layer.kernel.value, compute_uv=False)[0] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ConfigError, match="neither a kernel nor embeddings"):
        layers.SpectralNormalization(layer={"type": "Activation", "activation": "relu"}).ensure_built((3,))


def test_rnn_of_a_cell_is_that_recurrent_layer():
    x = np.random.default_rng(0).normal(0, 1, (3, 5, 2)).astype(np.float32)
    for cell, layer in [({"type": "LSTMCell", "units": 4}, layers.LSTM(4, go_backwards=True, return_state=True)),
                        ({"type": "GRUCell", "units": 3}, layers.GRU(3, go_backwards=True, return_state=True))]:
        rnn = layers.RNN(cell, go_backwards=True, return_state=True)
        rnn.ensure_built((5, 2), np.random.default_rng(0))
        layer.ensure_built((5, 2), np.random.default_rng(0))
        assert [p.name for p in rnn.weights] == [p.name for p in layer.weights]
        layer.set_weights(rnn.get_weights())
        for a, b in zip(rnn.forward(x), layer.forward(x)):
            np.testing.assert_array_equal(a, b)
    stacked = layers.RNN([{"type": "SimpleRNNCell", "units": 3, "name": "a"},
                          {"type": "GRUCell", "units": 2, "name": "b"}])
    stacked.ensure_built((5, 2))
    assert [p.name for p in stacked.weights][:4] == ["a/kernel", "a/recurrent_kernel", "a/bias", "b/kernel"]
    assert stacked.keras_weight_groups == ["cell/cells/simple_rnn_cell/vars", "cell/cells/gru_cell/vars"]
    assert stacked.get_config()["cell"][0]["type"] == "SimpleRNNCell"
    with pytest.raises(ConfigError, match="return_state is available with one cell"):
        layers.RNN([{"type": "GRUCell", "units": 2}], return_state=True)
    with pytest.raises(ConfigError, match="a cell is SimpleRNNCell, LSTMCell or GRUCell"):
        layers.RNN({"type": "LSTM", "units": 2})
