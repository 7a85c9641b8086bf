"""KerasHub's blocks: central-difference gradients (padding masks, causal, cross-attention, dropout) and KerasHub's
own outputs and gradients from tests/fixtures/keras/attention.npz (make_attention_fixtures.py, real KerasHub)."""
import numpy as np
import pytest

from dlcli import layers
from dlcli.builder import build_model
from dlcli.config import parse_config
from dlcli.engine.graph import Graph, Input
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer
from tests.layers.test_attention import _fixture, _masked_forward, _run_and_compare, _weights, assert_matches

PADDING = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
ENCODER_PADDING = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], bool)

GRADIENT_CASES = {
    "PositionEmbedding": [({"sequence_length": 7}, (5, 3), {})],
    "SinePositionEncoding": [({}, (5, 4), {})],
    "RotaryEmbedding": [({}, (5, 4), {}), ({"max_wavelength": 100, "scaling_factor": 2.0}, (5, 2, 6), {}),
                        ({"sequence_axis": -1, "feature_axis": 1}, (4, 3, 5), {})],
    "TokenAndPositionEmbedding": [({"vocabulary_size": 9, "sequence_length": 6, "embedding_dim": 3,
                                    "mask_zero": True, "tie_weights": False}, (5,), {"int_high": 9})],
    "TransformerEncoder": [
        ({"intermediate_dim": 6, "num_heads": 2}, (5, 4), {"mask": PADDING}),
        ({"intermediate_dim": 6, "num_heads": 2, "normalize_first": True, "activation": "gelu", "dropout": 0.2},
         (5, 4), {"training": True}),
    ],
    "TransformerDecoder": [
        ({"intermediate_dim": 6, "num_heads": 2}, (5, 4), {"mask": PADDING}),
        ({"intermediate_dim": 5, "num_heads": 2, "normalize_first": True, "dropout": 0.2}, [(5, 4), (3, 4)],
         {"mask": [PADDING, ENCODER_PADDING], "training": True}),
    ],
}


@pytest.mark.parametrize("name,args,shapes,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                   for a, s, o in cases])
def test_gradients(name, args, shapes, opts, kernel_path):
    check_layer(layers.LAYERS.get(name)(**args), shapes, **opts)


def _compare_behind_embedding(case, block):
    f = _fixture(case)
    tokens = Input(f["tokens"].shape[1:], dtype="int32")
    emb = layers.Embedding(12, 8, mask_zero=True)
    graph = Graph([tokens], [block(emb(tokens))])
    weights = _weights(f)
    emb.set_weights(weights[:1])
    block.set_weights(weights[1:])
    _run_and_compare(graph, [f["tokens"]], f, emb.weights + block.weights, 1)


@pytest.mark.parametrize("case,args", [
    ("hub_encoder", {}),
    ("hub_encoder_dropout_inference", {"dropout": 0.1, "activation": "gelu", "layer_norm_epsilon": 1e-3}),
    ("hub_encoder_normalize_first", {"dropout": 0.1, "normalize_first": True}),
])
def test_encoder_matches_keras_hub(case, args):
    _compare_behind_embedding(case, layers.TransformerEncoder(16, 2, **args))


def test_decoder_matches_keras_hub():
    f = _fixture("hub_decoder")
    x = Input(f["x"].shape[1:])
    dec = layers.TransformerDecoder(12, 2)
    graph = Graph([x], [dec(x)])
    dec.set_weights(_weights(f))
    _masked_forward(graph, dec, f["mask"])  # the padding mask Keras was given on the tensor
    grads = _run_and_compare(graph, [f["x"]], f, dec.weights, 1)
    assert_matches(grads[0], f["d_x"], "d/dx")


def test_decoder_with_cross_attention_matches_keras_hub():
    f = _fixture("hub_decoder_cross")
    x, encoder = Input(f["x"].shape[1:]), Input(f["encoder"].shape[1:])
    dec = layers.TransformerDecoder(12, 4, normalize_first=True)
    graph = Graph([x, encoder], [dec([x, encoder])])
    dec.set_weights(_weights(f))
    _masked_forward(graph, dec, [None, f["encoder_mask"]])
    grads = _run_and_compare(graph, [f["x"], f["encoder"]], f, dec.weights, 1)
    assert_matches(grads[0], f["d_x"], "d/dx")
    assert_matches(grads[1], f["d_encoder"], "d/dencoder")


def test_token_and_position_embedding_matches_keras_hub():
    f = _fixture("hub_token_and_position")
    layer = layers.TokenAndPositionEmbedding(12, 8, 6, tie_weights=False, mask_zero=True)
    tokens = Input(f["tokens"].shape[1:], dtype="int32")
    graph = Graph([tokens], [layer(tokens)])
    assert [p.name for p in layer.weights] == ["token_embedding/embeddings", "token_embedding/reverse_embeddings",
                                               "position_embedding/embeddings"]
    layer.set_weights(_weights(f))
    _run_and_compare(graph, [f["tokens"]], f, layer.weights, 1)
    np.testing.assert_array_equal(layer.compute_mask(f["tokens"], None), f["tokens"] != 0)


def test_sine_position_encoding_matches_keras_hub():
    f = _fixture("hub_sine_position")
    x = f["x"]
    np.testing.assert_allclose(layers.SinePositionEncoding(max_wavelength=100)(x) + x, f["out0"], atol=1e-6)


@pytest.mark.parametrize("case,args", [("hub_rotary", {"max_wavelength": 100, "scaling_factor": 2.0}),
                                       ("hub_rotary_axes", {"sequence_axis": -1, "feature_axis": 1,
                                                            "rope_type": "dynamic", "scaling_factor": 3.0})])
def test_rotary_embedding_matches_keras_hub(case, args):
    f = _fixture(case)
    layer = layers.RotaryEmbedding(**args)
    assert_matches(layer(f["x"]), f["out0"], "output")
    assert_matches(layer.backward(f["r0"]), f["d_x"], "d/dx")


def test_rotary_embedding_at_a_start_is_the_tail_of_the_whole_sequence():
    """forward_at(x[:, 3:], 3), KerasHub's start_index, is what the whole sequence gives at those positions."""
    x = np.random.default_rng(0).normal(size=(2, 7, 4)).astype(np.float32)
    layer = layers.RotaryEmbedding()
    np.testing.assert_allclose(layer.forward_at(x[:, 3:], 3), layer(x)[:, 3:], atol=1e-6)


def test_encoder_weights_in_keras_hub_order():
    enc = layers.TransformerEncoder(16, 2)
    enc.ensure_built((5, 8))
    assert [p.name for p in enc.weights] == [
        *[f"self_attention_layer/{p}/{w}" for p in ("query", "key", "value", "attention_output")
          for w in ("kernel", "bias")],
        "self_attention_layer_norm/gamma", "self_attention_layer_norm/beta", "feedforward_layer_norm/gamma",
        "feedforward_layer_norm/beta", "feedforward_intermediate_dense/kernel", "feedforward_intermediate_dense/bias",
        "feedforward_output_dense/kernel", "feedforward_output_dense/bias"]
    assert enc.weights[0].value.shape == (8, 2, 4)  # KerasHub's key_dim = features // num_heads


ISSUE_EXAMPLE = """
name: t
data: {type: none}
model:
  input_shape: [LENGTH]
  input_dtype: int32
  layers:
    - {type: TokenAndPositionEmbedding, vocabulary_size: 50, sequence_length: 16, embedding_dim: 8, mask_zero: true}
    - {type: TransformerEncoder, intermediate_dim: 16, num_heads: 2, dropout: 0.1}
    - {type: GlobalAveragePooling1D}
    - {type: Dense, units: 1, activation: sigmoid}
compile: {optimizer: adam, loss: binary_crossentropy, metrics: [accuracy]}
"""


def test_issue_sequential_example_masks_padding_and_trains():
    """The issue's Sequential list: the padding mask flows from the embedding through the encoder into the
    pooling, so sequences padded to 12 steps predict what the same 9 tokens do in a model of length 9."""
    padded = build_model(parse_config(ISSUE_EXAMPLE.replace("LENGTH", "12")))
    short = build_model(parse_config(ISSUE_EXAMPLE.replace("LENGTH", "9")))
    short.set_weights(padded.get_weights())
    rng = np.random.default_rng(0)
    x = rng.integers(1, 50, (8, 12))
    x[:, 9:] = 0
    before = padded.predict(x, verbose=0)
    np.testing.assert_allclose(before, short.predict(x[:, :9], verbose=0), rtol=1e-5)
    padded.fit(x, rng.integers(0, 2, (8, 1)).astype(np.float32), epochs=1, batch_size=8, verbose=0)
    assert not np.allclose(padded.predict(x, verbose=0), before)


def test_bad_input_names_the_layer():
    with pytest.raises(ShapeError, match="'pos'.*12 steps is longer than sequence_length=10"):
        layers.TokenAndPositionEmbedding(50, 10, 8, name="pos").ensure_built((12,))
    with pytest.raises(ShapeError, match="'enc'.*3 features cannot be split into num_heads=4"):
        layers.TransformerEncoder(8, 4, name="enc").ensure_built((5, 3))
    with pytest.raises(ConfigError, match="TransformerEncoder 'e2': num_heads"):
        layers.TransformerEncoder(8, 0, name="e2")


def test_activation_memory_counts_the_attention_probabilities():
    from dlcli import memory

    model = build_model(parse_config(ISSUE_EXAMPLE.replace("LENGTH", "16")))
    estimate = memory.estimate(model, 32)
    encoder = model.layers[1]
    assert estimate["attention"] == 4 * 32 * encoder.kept_size((16, 8)) > 0
    assert "of which attention" in memory.describe(estimate) and "sequence length squared" in memory.describe(estimate)
    mha = layers.MultiHeadAttention(4, 2)
    assert mha.kept_size((512, 8)) > 3.9 * mha.kept_size((256, 8))  # the (heads, T, T) probabilities dominate


def test_a_dropout_out_of_range_is_a_config_error_with_its_line():
    with pytest.raises(ConfigError, match=r"<config>:9: model.layers.1.dropout: expected a number in \[0, 1\), "
                                          r"found 1.5"):
        parse_config(ISSUE_EXAMPLE.replace("LENGTH", "12").replace("dropout: 0.1", "dropout: 1.5"))
