import numpy as np
import pytest

from dlcli import layers
from dlcli.engine.graph import Graph, Input
from dlcli.errors import DlcliError
from tests.gradcheck import assert_close, check_layer, numeric_grad

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
GRADIENT_CASES = {
    # int_high 4 over 15 indices: repeated rows must accumulate their gradients
    "Embedding": [({"input_dim": 4, "output_dim": 3}, (5,), {"int_high": 4}),
                  ({"input_dim": 6, "output_dim": 2, "mask_zero": True}, (2, 3), {"int_high": 6})],
    "Masking": [({}, (4, 3), {}), ({"mask_value": 0.5}, (4, 3), {})],
    "ReversibleEmbedding": [({"input_dim": 5, "output_dim": 3}, (4,), {"int_high": 5}),
                            ({"input_dim": 5, "output_dim": 3, "reverse": True, "logit_soft_cap": 0.7}, (4, 3), {}),
                            ({"input_dim": 4, "output_dim": 3, "reverse": True, "tie_weights": False}, (2, 2, 3), {})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


def test_embedding_lookup_shape_and_keras_init():
    emb = layers.Embedding(10, 4)
    x = np.array([[1, 2, 0], [9, 9, 3]])
    y = emb(x)
    assert y.shape == (2, 3, 4) and y.dtype == np.float32
    np.testing.assert_array_equal(y[1, 0], emb.embeddings.value[9])
    assert emb.output_shape((3,)) == (3, 4)
    assert np.abs(emb.embeddings.value).max() <= 0.05  # Keras' "uniform": RandomUniform(-0.05, 0.05)
    assert emb.backward(np.ones_like(y)) is None
    # row 9 appears twice, row 4 never
    assert emb.embeddings.grad[9, 0] == 2 and emb.embeddings.grad[4, 0] == 0


def test_embedding_accepts_whole_number_floats_and_rejects_out_of_range():
    emb = layers.Embedding(5, 2)
    assert emb(np.array([[1.0, 4.0]], np.float32)).shape == (1, 2, 2)
    with pytest.raises(DlcliError, match="outside"):
        emb.forward(np.array([[5]]))


def test_mask_zero_mask_flows_to_recurrent_layer():
    inp = Input((6,), dtype="int64")
    emb = layers.Embedding(20, 3, mask_zero=True)
    rnn = layers.LSTM(4)
    graph = Graph([inp], [rnn(emb(inp))])
    x = np.array([[5, 3, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    assert np.array_equal(emb.compute_mask(x, None), x != 0)
    (y,) = graph.forward([x])
    # padding with masked zeros gives the output of the unpadded sequence (run in a batch of the same size: the
    # LSTM's step GEMM sums a batch of one in another order)
    rnn.input_mask = None
    alone = rnn.forward(emb.forward(x[:, :3]))
    np.testing.assert_allclose(y[:1], alone[:1], rtol=1e-5)
    assert layers.Embedding(3, 2).compute_mask(x, None) is None


def test_masking_zeroes_and_masks_padded_steps():
    x = np.random.default_rng(0).normal(0, 1, (2, 4, 3)).astype(np.float32)
    x[0, 2:] = 0.0
    masking = layers.Masking()
    y = masking(x)
    mask = masking.compute_mask(x, None)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(y[0, 2:], 0)
    np.testing.assert_array_equal(y[1], x[1])
    assert masking.get_config()["mask_value"] == 0.0


def test_masking_backward_stops_the_gradient_at_masked_steps():
    """Inputs that really equal mask_value (gradient checks on random inputs never hit them)."""
    x = np.array([[[0.5, 0.5], [1.0, 0.5], [0.5, 0.5]]], np.float32)
    masking = layers.Masking(mask_value=0.5)
    masking.forward(x)
    g = masking.backward(np.ones_like(x))
    np.testing.assert_array_equal(g, [[[0, 0], [1, 1], [0, 0]]])


def tied_language_model(soft_cap=None):
    """tokens -> ReversibleEmbedding -> Dense(tanh) -> the same layer reversed: logits with the tied weights."""
    tokens = Input((5,), dtype="int64")
    emb = layers.ReversibleEmbedding(7, 3, logit_soft_cap=soft_cap)
    logits = emb(layers.Dense(3, activation="tanh")(emb(tokens)), reverse=True)
    return Graph([tokens], [logits]), emb


def test_reversible_embedding_shared_call_reverses_with_the_tied_matrix():
    graph, emb = tied_language_model()
    assert [n.call_args for n in emb.nodes] == [{"reverse": False}, {"reverse": True}]
    assert graph.outputs[0].shape == (5, 7)
    x = np.array([[1, 2, 0, 6, 6]])
    (logits,) = graph.forward([x])
    dense = graph.layers[1]
    hidden = np.tanh(emb.embeddings.value[x] @ dense.kernel.value + dense.bias.value)
    np.testing.assert_allclose(logits, hidden @ emb.embeddings.value.T, rtol=1e-6)


def test_reversible_embedding_gradients_through_both_calls():
    """d sum(r * logits) / d embeddings sums the lookup's scatter and the projection's product (tied weights)."""
    graph, emb = tied_language_model(soft_cap=0.8)
    for layer in graph.layers:
        layer.dtype = "float64"
        for p in layer.params.values():
            p.value = np.random.default_rng(1).normal(0, 1, p.value.shape)
    x = np.random.default_rng(2).integers(0, 7, (3, 5))
    r = np.random.default_rng(3).normal(size=(3, 5, 7))

    def loss():
        return float((graph.forward([x])[0] * r).sum())

    loss()
    for p in emb.params.values():
        p.grad = np.zeros_like(p.value)
    for layer in graph.layers[1:]:
        for p in layer.params.values():
            p.grad = np.zeros_like(p.value)
    graph.backward([r])
    assert_close(emb.embeddings.grad, numeric_grad(loss, emb.embeddings.value), "embeddings")


def test_reversible_embedding_reverse_call_checks_features():
    emb = layers.ReversibleEmbedding(7, 3)
    emb.ensure_built((5,))
    emb.reverse = True
    with pytest.raises(DlcliError, match="projects 3 features back to 7 logits"):
        emb.output_shape((5, 4))


def test_reversible_embedding_eager_calls_take_reverse_per_call():
    emb = layers.ReversibleEmbedding(7, 3)
    tokens = np.array([[1, 2, 6]])
    hidden = emb(tokens)
    assert emb(hidden, reverse=True).shape == (1, 3, 7)
    np.testing.assert_array_equal(emb(tokens), hidden)  # reverse is False again when not given, as in Keras


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_gradient_kernel_equals_its_numpy_twin(monkeypatch, dtype):
    """The compiled scatter-add adds each row in index order, as np.add.at: the same bits, repeated rows included."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 7, (6, 40)).astype(np.int32)
    x[:, ::3] = 0  # padding: row 0 gathers many
    grad = rng.standard_normal((6, 40, 5)).astype(dtype)
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        emb = layers.Embedding(7, 5, mask_zero=True, dtype=np.dtype(dtype).name)
        emb.build((40,))
        emb.embeddings.grad[...] = 0.25  # accumulates onto what is there
        emb.forward(x)
        emb.backward(grad)
        results.append(emb.embeddings.grad.copy())
    np.testing.assert_array_equal(*results)
