"""MultiHeadAttention: central-difference gradients (masks, dropout, scores, attention axes) and Keras 3's own outputs
and gradients from tests/fixtures/keras/attention.npz (made by make_attention_fixtures.py with real Keras)."""
from pathlib import Path

import numpy as np
import pytest

from dlcli import layers
from dlcli.engine.graph import Graph, Input
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "keras" / "attention.npz"
PADDING = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)  # (batch 3, steps 5)

GRADIENT_CASES = {
    "MultiHeadAttention": [
        ({"num_heads": 2, "key_dim": 3}, (5, 4), {}),
        ({"num_heads": 2, "key_dim": 3, "value_dim": 2, "output_shape": [3]}, [(5, 4), (4, 6)], {}),
        ({"num_heads": 3, "key_dim": 2, "use_bias": False}, [(3, 4), (5, 2), (5, 3)], {}),
        ({"num_heads": 2, "key_dim": 2}, (5, 4), {"mask": PADDING}),  # query and value masks, as self-attention
        ({"num_heads": 2, "key_dim": 2, "use_causal_mask": True}, (5, 4), {"mask": PADDING}),
        ({"num_heads": 1, "key_dim": 3, "sliding_window": 2, "use_causal_mask": True}, (5, 4), {}),
        ({"num_heads": 2, "key_dim": 2, "dropout": 0.3}, (5, 4), {"training": True}),
        ({"num_heads": 2, "key_dim": 2, "return_attention_scores": True}, [(5, 4), (3, 4)],
         {"mask": [PADDING, PADDING[:, :3]]}),
        ({"num_heads": 2, "key_dim": 2, "attention_axes": [1, 2], "output_shape": [2, 2]}, (2, 3, 4), {}),
        ({"num_heads": 2, "key_dim": 2, "attention_axes": -2, "return_attention_scores": True},
         [(2, 3, 4), (2, 4, 3)], {}),
    ],
    "GroupQueryAttention": [
        ({"head_dim": 2, "num_query_heads": 4, "num_key_value_heads": 2}, (5, 4), {}),
        ({"head_dim": 3, "num_query_heads": 2, "num_key_value_heads": 1, "use_bias": False}, [(3, 4), (5, 4), (5, 3)],
         {}),
        ({"head_dim": 2, "num_query_heads": 2, "num_key_value_heads": 2, "use_causal_mask": True}, (5, 4),
         {"mask": PADDING}),
        ({"head_dim": 2, "num_query_heads": 4, "num_key_value_heads": 1, "dropout": 0.3,
          "return_attention_scores": True}, [(5, 4), (3, 4)], {"training": True}),
    ],
    "Attention": [
        ({}, [(5, 3), (4, 3)], {}),
        ({"use_scale": True}, [(5, 3), (4, 2), (4, 3)], {}),
        ({"score_mode": "concat", "use_scale": True}, [(5, 3), (4, 2), (4, 3)], {}),
        ({"score_mode": "concat"}, [(5, 3), (5, 3)], {"mask": [PADDING, PADDING]}),
        ({"use_causal_mask": True, "return_attention_scores": True}, [(5, 3), (5, 3)], {"mask": [PADDING, PADDING]}),
        ({"dropout": 0.3, "return_attention_scores": True}, [(5, 3), (4, 3)], {"training": True}),
    ],
    "AdditiveAttention": [
        ({}, [(5, 3), (4, 3)], {}),
        ({"use_scale": False}, [(5, 3), (4, 2), (4, 3)], {}),
        ({"use_causal_mask": True, "return_attention_scores": True}, [(5, 3), (5, 3)], {"mask": [PADDING, PADDING]}),
    ],
}


@pytest.mark.parametrize("name,args,shapes,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                   for a, s, o in cases])
def test_gradients(name, args, shapes, opts, kernel_path):
    check_layer(layers.LAYERS.get(name)(**args), shapes, **opts)


@pytest.mark.parametrize("keep_shape", [None, (2, 1, 5, 1), (1, 1, 5, 7), (2, 1, 1, 7)])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_softmax_dropout_kernels_equal_their_numpy_twins(monkeypatch, keep_shape, rate):
    """The fused masked softmax + dropout and its backward against the NumPy twins: the same dropout mask from the
    same generator (bit for bit), probabilities and score gradients within float32 rounding; rows with nothing to
    attend to are zeros."""
    from dlcli.layers.attention import dropped_probs, softmax_dropout_, softmax_dropout_backward_

    rng = np.random.default_rng(0)
    scores = rng.normal(0, 3, (2, 3, 5, 7)).astype(np.float32)
    keep = None if keep_shape is None else rng.random(keep_shape) < 0.7
    grad, extra = rng.normal(size=(2, *scores.shape)).astype(np.float32)
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        probs, dropped, attended = softmax_dropout_(scores.copy(), keep, rate, np.random.default_rng(5))
        again = dropped_probs(probs, dropped, rate)
        d_scores = softmax_dropout_backward_(grad.copy(), probs, dropped, rate, extra)
        results.append((probs, dropped, attended, again, d_scores))
    (probs, dropped, attended, again, d_scores), reference = results
    np.testing.assert_allclose(probs, reference[0], atol=1e-6, rtol=0)
    if rate:
        np.testing.assert_array_equal(dropped, reference[1])
        assert 0.1 < dropped.mean() < 0.5
    else:
        assert dropped is None is reference[1] and attended is probs
    np.testing.assert_allclose(attended, reference[2], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(again, attended)
    np.testing.assert_allclose(d_scores, reference[4], atol=1e-5, rtol=0)
    if keep is not None:
        hidden = ~np.broadcast_to(keep, scores.shape)
        assert (probs[hidden] == 0).all() and (d_scores[hidden] == 0).all()
        np.testing.assert_allclose(probs.sum(-1), np.broadcast_to(keep, scores.shape).any(-1), atol=1e-6)


def test_attention_mask_input_is_the_same_as_the_mask_it_spells():
    """A fourth input (batch, T, S) masks exactly as the causal mask it encodes; it gets no gradient."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 3))
    causal = np.broadcast_to(np.tril(np.ones((4, 4))), (2, 4, 4))
    a = layers.MultiHeadAttention(2, 2, use_causal_mask=True, dtype="float64")  # float64 x, compared to 1e-12
    b = layers.MultiHeadAttention(2, 2, dtype="float64")
    out_a = a(x)
    b([x, x, x, causal])
    b.set_weights(a.get_weights())
    out_b = b([x, x, x, causal])
    np.testing.assert_allclose(out_b, out_a, rtol=1e-12)
    grads = b.backward(np.ones_like(out_b))
    assert grads[3] is None
    np.testing.assert_allclose(sum(grads[:3]), a.backward(np.ones_like(out_a)), rtol=1e-10)


def test_fully_masked_query_attends_to_nothing():
    """Keras' Softmax(mask) zeroes the probabilities of a query with no key to attend to (not a uniform row)."""
    layer = layers.MultiHeadAttention(2, 2, return_attention_scores=True)
    layer.input_mask = PADDING[:2]
    _, scores = layer(np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32))
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores[1, :, 2:], 0)  # masked queries
    np.testing.assert_array_equal(scores[1, :, :2, 2:], 0)  # masked keys
    np.testing.assert_allclose(scores[1, :, :2].sum(-1), 1, rtol=1e-6)


def _fixture(case):  # committed with the script that made it: missing is a failure, not a skip
    with np.load(FIXTURES) as data:
        prefix = f"{case}/"
        return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def _weights(f):
    return [f[f"w{i}"] for i in range(len([k for k in f if k.startswith("w") and k[1:].isdigit()]))]


def assert_matches(got, want, what):
    """Within 1e-5, plus float32's rounding of the array's largest entries (a gradient summed over positions of
    magnitude 80 carries errors of about 1e-5 whichever framework sums it)."""
    np.testing.assert_allclose(got, want, atol=1e-5 + 1e-6 * float(np.abs(want).max(initial=0)), rtol=0,
                               err_msg=what)


def _run_and_compare(graph, feeds, f, params, n_out):
    outs = graph.forward(feeds)
    for i in range(n_out):
        keep = f.get("keep_rows") if i == 0 else None
        want, got = f[f"out{i}"], outs[i]
        if keep is not None:  # Keras' fused kernel: only unmasked queries are defined
            want, got = want[keep > 0], got[keep > 0]
        assert_matches(got, want, f"output {i}")
    for p in params:
        p.grad[...] = 0
    input_grads = graph.backward([f[f"r{i}"] for i in range(n_out)], need_input_grads=True)
    for i, p in enumerate(params):
        assert_matches(p.grad, f[f"dw{i}"], f"d/d{p.path}")
    return input_grads


@pytest.mark.parametrize("case,heads,key_dim", [("mha_self_padded", 2, 4), ("mha_self_padded_fused", 3, 2)])
def test_matches_keras_behind_a_masking_embedding(case, heads, key_dim):
    f = _fixture(case)
    scores = "out1" in f
    tokens = Input(f["tokens"].shape[1:], dtype="int32")
    emb = layers.Embedding(12, 8, mask_zero=True)
    mha = layers.MultiHeadAttention(heads, key_dim, return_attention_scores=scores)
    x = emb(tokens)
    out = mha(x)
    graph = Graph([tokens], out if scores else [out])
    for layer, n in ((emb, 1), (mha, None)):
        weights = _weights(f)
        layer.set_weights(weights[:1] if n else weights[1:])
    _run_and_compare(graph, [f["tokens"]], f, emb.weights + mha.weights, 2 if scores else 1)


@pytest.mark.parametrize("case,args,inputs", [
    ("mha_cross", {"num_heads": 3, "key_dim": 4, "value_dim": 2, "output_shape": [5], "use_causal_mask": True,
                   "return_attention_scores": True}, ["query", "value", "key", "attention_mask"]),
    ("mha_causal", {"num_heads": 2, "key_dim": 4, "use_causal_mask": True}, ["x"]),
    ("mha_axes", {"num_heads": 2, "key_dim": 3, "attention_axes": [1, 2], "use_bias": False, "output_shape": [2, 3],
                  "return_attention_scores": True}, ["x"]),
    ("mha_axes_inner", {"num_heads": 2, "key_dim": 3, "attention_axes": -2, "return_attention_scores": True},
     ["query", "value"]),
    ("mha_sliding_window", {"num_heads": 2, "key_dim": 2, "sliding_window": 3, "use_causal_mask": True}, ["x"]),
])
def test_matches_keras(case, args, inputs):
    f = _fixture(case)
    tensors = [Input(f[name].shape[1:], name=name) for name in inputs]
    mha = layers.MultiHeadAttention(**args)
    out = mha(tensors if len(tensors) > 1 else tensors[0])
    graph = Graph(tensors, out if isinstance(out, list) else [out])
    mha.set_weights(_weights(f))
    if "value_mask" in f:  # the masks Keras was given as call arguments, as a masking layer would propagate them
        mha.input_mask = None
        feeds_masks = [None, f["value_mask"], f["key_mask"], None]
        _masked_forward(graph, mha, feeds_masks)
    feeds = [f[name].astype(np.float32) for name in inputs]
    grads = _run_and_compare(graph, feeds, f, mha.weights, 2 if args.get("return_attention_scores") else 1)
    for name, g in zip(inputs, grads):
        if f"d_{name}" in f:
            assert_matches(g, f[f"d_{name}"], f"d/d{name}")


def _masked_forward(graph, layer, masks):
    """Give `layer` these input masks in every forward of `graph`, as a masking layer before it would."""
    forward = layer.forward

    def with_masks(x, training=False):
        layer.input_mask = masks
        return forward(x, training)

    layer.forward = with_masks


def test_output_carries_the_query_mask():
    tokens = Input((5,), dtype="int32")
    x = layers.Embedding(10, 4, mask_zero=True)(tokens)
    mha = layers.MultiHeadAttention(2, 2, return_attention_scores=True)
    out, scores = mha(x)
    pooled = layers.GlobalAveragePooling1D()(out)
    graph = Graph([tokens], [pooled, out, scores])
    pooled_value, out_value, _ = graph.forward([np.where(PADDING, 3, 0)])
    # the pooling after it averages the unmasked steps only, as it does behind a masking Embedding
    want = (out_value * PADDING[..., None]).sum(1) / PADDING.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled_value, want, rtol=1e-6)
    mask_out = mha.compute_mask(None, PADDING)
    assert mask_out[0] is PADDING and mask_out[1] is None


@pytest.mark.parametrize("args,shapes,match", [
    ({"num_heads": 2, "key_dim": 2}, [(5, 4), (3, 4), (4, 4)], "value and key must match"),
    ({"num_heads": 2, "key_dim": 2}, [(5, 4), (3, 4), (3, 4), (5, 4)],
     r"attention_mask must have shape \(batch, 5, 3\)"),
    ({"num_heads": 2, "key_dim": 2}, (4,), "at least one axis to attend over"),
    ({"num_heads": 2, "key_dim": 2, "attention_axes": [3]}, (2, 3, 4), "attention_axes"),
    ({"num_heads": 2, "key_dim": 2, "use_causal_mask": True}, (2, 3, 4), "use_causal_mask"),
])
def test_shape_errors_name_the_layer(args, shapes, match):
    layer = layers.MultiHeadAttention(name="att", **args)
    with pytest.raises(ShapeError, match=match) as info:
        layer.ensure_built(shapes)
    assert "'att'" in info.value.message


@pytest.mark.parametrize("args", [{"num_heads": 0, "key_dim": 2}, {"num_heads": 2, "key_dim": 2.5},
                                  {"num_heads": 2, "key_dim": 2, "dropout": 1.0}])
def test_bad_arguments(args):
    with pytest.raises(ConfigError, match="MultiHeadAttention"):
        layers.MultiHeadAttention(**args)


def test_config_round_trip_and_keras_weight_layout():
    layer = layers.MultiHeadAttention(4, 8, output_shape=6, name="att")
    config = layer.get_config()
    assert config["num_heads"] == 4 and config["output_shape"] == 6 and config["value_dim"] is None
    layer.ensure_built([(7, 16), (9, 12)])
    assert {p.name: p.value.shape for p in layer.weights} == {
        "query/kernel": (16, 4, 8), "query/bias": (4, 8), "key/kernel": (12, 4, 8), "key/bias": (4, 8),
        "value/kernel": (12, 4, 8), "value/bias": (4, 8), "attention_output/kernel": (4, 8, 6),
        "attention_output/bias": (6,)}
    assert layer.output_shape([(7, 16), (9, 12)]) == (7, 6)
    twin = layers.LAYERS.get(config.pop("type"))(**config)
    assert twin.get_config() == layer.get_config()


def test_keras_call_arguments_map_to_inputs_and_flags():
    """A .keras file's call mha(q, v, key=k, attention_mask=m, use_causal_mask=True) -> inputs [q, v, k, m] and the
    layer argument; an attention mask without a key reads the value as key, as Keras does."""
    kwargs = {"key": "k", "attention_mask": "m", "use_causal_mask": True, "training": None}
    assert layers.MultiHeadAttention.keras_call(["q", "v"], kwargs) == (["q", "v", "k", "m"], {"use_causal_mask": True})
    assert kwargs == {"training": None}  # left for the importer to judge
    assert layers.MultiHeadAttention.keras_call(["q", "v"], {"attention_mask": "m"}) == (["q", "v", "v", "m"], {})
    assert layers.TransformerDecoder.keras_call(["d"], {"encoder_sequence": "e", "use_causal_mask": False}) == (
        ["d", "e"], {"use_causal_mask": False})


@pytest.mark.parametrize("case,make", [
    ("attention_dot_causal_padded",
     lambda: layers.Attention(use_scale=True, use_causal_mask=True, return_attention_scores=True)),
    ("gqa_self_padded", lambda: layers.GroupQueryAttention(2, 4, 2, return_attention_scores=True)),
])
def test_attention_layers_match_keras_behind_a_masking_embedding(case, make):
    f = _fixture(case)
    tokens = Input(f["tokens"].shape[1:], dtype="int32")
    emb = layers.Embedding(12, 8, mask_zero=True)
    layer = make()
    x = emb(tokens)
    graph = Graph([tokens], layer([x, x]))
    weights = _weights(f)
    emb.set_weights(weights[:1])
    layer.set_weights(weights[1:])
    _run_and_compare(graph, [f["tokens"]], f, emb.weights + layer.weights, 2)


@pytest.mark.parametrize("case,make,inputs,masks", [
    ("attention_concat_key", lambda: layers.Attention(use_scale=True, score_mode="concat"),
     ["query", "value", "key"], ["query_mask", "value_mask", None]),
    ("additive_masked", lambda: layers.AdditiveAttention(return_attention_scores=True), ["query", "value"],
     ["query_mask", "value_mask"]),
    ("gqa_cross", lambda: layers.GroupQueryAttention(4, 3, 1, use_causal_mask=True, return_attention_scores=True),
     ["query", "value", "key", "attention_mask"], [None, "value_mask", "key_mask", None]),
    ("gqa_causal", lambda: layers.GroupQueryAttention(4, 2, 1, use_causal_mask=True), ["x"], None),
])
def test_attention_layers_match_keras(case, make, inputs, masks):
    f = _fixture(case)
    tensors = [Input(f[name].shape[1:], name=name) for name in inputs]
    layer = make()
    out = layer(tensors if len(tensors) > 1 else tensors[0])
    graph = Graph(tensors, out if isinstance(out, list) else [out])
    layer.set_weights(_weights(f))
    if masks:  # the masks Keras was given as call arguments, as a masking layer would propagate them
        _masked_forward(graph, layer, [None if m is None else f[m] for m in masks])
    feeds = [f[name].astype(np.float32) for name in inputs]
    grads = _run_and_compare(graph, feeds, f, layer.weights, 2 if "out1" in f else 1)
    for name, g in zip(inputs, grads):
        if f"d_{name}" in f:
            assert_matches(g, f[f"d_{name}"], f"d/d{name}")
