"""dlcli generate: the key/value cache against the whole-sequence forward, the samplers, and the command."""
import gzip
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dlcli.cli import app
from dlcli.generation import CachedDecoder, Sampling, generate, sample_next
from dlcli.layers import LAYERS
from dlcli.models import Sequential
from tests.runs_fixture import train_text_run

runner = CliRunner()
VOCABULARY, STEPS = 50, 12


def _model(*specs):
    model = Sequential([LAYERS.create(s) for s in specs])
    model.build((STEPS,), rng=np.random.default_rng(0))
    model.graph.inputs[0].dtype = "int32"
    return model


def _gpt(normalize_first=False):
    return _model({"type": "TokenAndPositionEmbedding", "vocabulary_size": VOCABULARY, "sequence_length": STEPS,
                   "embedding_dim": 16},
                  *[{"type": "TransformerDecoder", "intermediate_dim": 24, "num_heads": 2, "dropout": 0.2,
                     "normalize_first": normalize_first}] * 2,
                  {"type": "Dense", "units": VOCABULARY, "activation": "softmax"})


def _attention_lm():
    return _model({"type": "Embedding", "input_dim": VOCABULARY, "output_dim": 8},
                  {"type": "MultiHeadAttention", "num_heads": 2, "key_dim": 4, "use_causal_mask": True,
                   "sliding_window": 3},
                  {"type": "LayerNormalization"}, {"type": "Dense", "units": VOCABULARY, "activation": "softmax"})


def _grouped_lm():
    return _model({"type": "Embedding", "input_dim": VOCABULARY, "output_dim": 8},
                  {"type": "RotaryEmbedding"},
                  {"type": "GroupQueryAttention", "head_dim": 2, "num_query_heads": 4, "num_key_value_heads": 2,
                   "use_causal_mask": True},
                  {"type": "Dense", "units": VOCABULARY, "activation": "softmax"})


def _tied_lm():
    """The logits are the embedding matrix's (ReversibleEmbedding called again with reverse=True), soft-capped."""
    from dlcli.engine.graph import Input
    from dlcli.models import Model

    tokens = Input((STEPS,), dtype="int32")
    emb = LAYERS.create({"type": "ReversibleEmbedding", "input_dim": VOCABULARY, "output_dim": 8,
                         "logit_soft_cap": 5.0})
    x = LAYERS.create({"type": "RotaryEmbedding"})(emb(tokens))
    x = LAYERS.create({"type": "TransformerDecoder", "intermediate_dim": 12, "num_heads": 2})(x)
    probabilities = LAYERS.create({"type": "Activation", "activation": "softmax"})(emb(x, reverse=True))
    return Model(inputs=tokens, outputs=probabilities)


@pytest.mark.parametrize("make", [_gpt, lambda: _gpt(True), _attention_lm, _grouped_lm, _tied_lm],
                         ids=["post-norm", "pre-norm", "mha", "rotary-gqa", "tied"])
def test_cached_steps_equal_the_whole_sequence_forward(make, kernel_path):
    model = make()
    tokens = np.random.default_rng(1).integers(1, VOCABULARY, (3, STEPS)).astype(np.int32)
    whole = model.graph.forward([tokens])[0]  # inference: dropout off
    decoder = CachedDecoder(model, STEPS)
    decoder.reset(3)
    prefix = decoder.feed(tokens[:, :5], all_positions=True)  # the prompt in one pass, then a token per step
    steps = [decoder.feed(tokens[:, i:i + 1]) for i in range(5, STEPS)]
    cached = np.concatenate([prefix, np.stack(steps, 1)], 1)
    assert cached.shape == whole.shape
    np.testing.assert_allclose(cached, whole, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.log(cached), np.log(whole), atol=1e-5, rtol=0)  # the logits up to a constant
    assert decoder.length == STEPS and all(c.length == STEPS for c in decoder.caches.values())
    with pytest.raises(Exception, match="exceed the model's context"):
        decoder.feed(tokens[:, :1])


@pytest.mark.parametrize("wide", [1, 2], ids=["dense", "attention"])
def test_cached_decoder_casts_each_layers_input_to_its_dtype_as_the_graph(wide, kernel_path):
    """A float64 layer between float32 ones (Keras 3's autocast): the cached decoder gives each layer its input in
    the layer's dtype as the graph does, so its outputs are the whole forward's, in float32 (fails before: the
    float64 Dense's output reached the float32 layers after it, and the last Dense's output was float64)."""
    specs = [{"type": "Embedding", "input_dim": VOCABULARY, "output_dim": 8}, {"type": "Dense", "units": 8},
             {"type": "MultiHeadAttention", "num_heads": 2, "key_dim": 4, "use_causal_mask": True},
             {"type": "Dense", "units": VOCABULARY, "activation": "softmax"}]
    specs[wide] = {**specs[wide], "dtype": "float64"}
    model = _model(*specs)
    tokens = np.random.default_rng(1).integers(1, VOCABULARY, (2, STEPS)).astype(np.int32)
    whole = model.graph.forward([tokens])[0]
    decoder = CachedDecoder(model, STEPS)
    decoder.reset(2)
    prefix = decoder.feed(tokens[:, :5], all_positions=True)
    steps = [decoder.feed(tokens[:, i:i + 1]) for i in range(5, STEPS)]
    assert whole.dtype == prefix.dtype == steps[0].dtype == np.float32
    np.testing.assert_allclose(np.concatenate([prefix, np.stack(steps, 1)], 1), whole, atol=1e-6, rtol=0)


def test_generation_beyond_the_context_restarts_from_the_last_half_and_stays_reproducible():
    model = _gpt()
    decoder = CachedDecoder(model, STEPS)
    first = list(generate(decoder, [1, 5, 6], 30, np.random.default_rng(3), Sampling(1.0, 0, 1.0)))
    again = list(generate(decoder, [1, 5, 6], 30, np.random.default_rng(3), Sampling(1.0, 0, 1.0)))
    assert len(first) == 30 and first == again and 0 not in first
    assert decoder.length <= STEPS
    greedy = Sampling(1.0, 1, 1.0)  # top_k 1: the argmax, whatever the seed
    tokens = list(generate(decoder, [1, 5, 6], 4, np.random.default_rng(0), greedy))
    assert tokens == list(generate(decoder, [1, 5, 6], 4, np.random.default_rng(9), greedy))
    whole = [1, 5, 6]
    for _ in range(4):  # the same tokens from the uncached model, re-run on the whole prefix each time
        probs = model.graph.forward([np.asarray([whole], np.int32)])[0][0, -1]
        probs[0] = 0
        whole.append(int(probs.argmax()))
    assert whole[3:] == tokens


def test_samplers_follow_the_distribution_and_their_cuts():
    probs = np.array([[0.0, 0.1, 0.2, 0.3, 0.4]])
    rng = np.random.default_rng(0)
    draws = np.array([sample_next(probs.repeat(4000, 0), rng, Sampling(1.0, 0, 1.0))]).ravel()
    frequencies = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(frequencies, probs[0], atol=0.03)
    top2 = sample_next(probs.repeat(2000, 0), rng, Sampling(1.0, 2, 1.0))
    assert set(top2) == {3, 4} and abs((top2 == 4).mean() - 4 / 7) < 0.05
    nucleus = sample_next(probs.repeat(2000, 0), rng, Sampling(1.0, 0, 0.5))  # 0.4 + 0.3 reaches 0.5
    assert set(nucleus) == {3, 4}
    cold = sample_next(probs.repeat(2000, 0), rng, Sampling(0.1, 0, 1.0))  # p ** 10: 0.4 dominates
    assert (cold == 4).mean() > 0.9
    banned = sample_next(np.array([[0.97, 0.01, 0.01, 0.01, 0.0]]).repeat(500, 0), rng, Sampling())
    assert 0 not in banned and 4 not in banned


@pytest.fixture
def lm_run(tmp_path):
    rows = [{"label": i % 2, "text": "this movie was great fun. " * (i + 4) if i % 2 else
             "this movie was bad and boring. " * (i + 4)} for i in range(12)]
    for split in ("train", "test"):
        with gzip.open(tmp_path / f"{split}.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load(open("configs/imdb_gpt.yaml"))
    config["data"].update(path=str(tmp_path), num_words=300, sequence_length=16, limit=None, test_limit=None)
    config["model"]["input_shape"] = [16]
    config["model"]["layers"][0].update(vocabulary_size=300, sequence_length=16, embedding_dim=16)
    for layer in config["model"]["layers"][1:3]:
        layer.update(intermediate_dim=16, num_heads=2)
    config["model"]["layers"][3]["units"] = 300
    config["train"].update(epochs=3, batch_size=8)
    config["compile"]["optimizer"]["learning_rate"] = 0.01
    (tmp_path / "gpt.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", str(tmp_path / "gpt.yaml"), "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    history = (next((tmp_path / "runs").iterdir()) / "history.csv").read_text()
    assert "perplexity" in history.splitlines()[0] and "val_perplexity" in history.splitlines()[0]
    return next((tmp_path / "runs").iterdir())


def test_generate_streams_reproducible_samples(lm_run):
    args = ["generate", str(lm_run), "--prompt", "this movie was", "--length", "40", "--samples", "2", "--seed", "0"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    lines = first.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("this movie was") for line in lines)
    assert "tokens/s" in first.stderr and "sample 2 of 2" in first.stderr
    other = runner.invoke(app, [*args[:-1], "1"])
    assert other.exit_code == 0 and other.stdout != first.stdout


@pytest.mark.parametrize("options, message", [
    (["--prompt", " "], "--prompt is empty"),
    (["--prompt", "a", "--temperature", "0"], "--temperature must be positive"),
    (["--prompt", "a", "--top-p", "1.5"], "--top-p must be in (0, 1]")])
def test_generate_bad_options_are_one_line(lm_run, options, message):
    result = runner.invoke(app, ["generate", str(lm_run), *options])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_generate_refuses_a_run_that_is_not_a_language_model(tmp_path):
    run_dir, _ = train_text_run(tmp_path, runner)
    result = runner.invoke(app, ["generate", str(run_dir), "--prompt", "good"])
    assert result.exit_code == 2 and "not a language model" in result.output
    assert len(result.output.strip().splitlines()) <= 2  # one paragraph (wrapped at most once)


def test_a_model_that_mixes_positions_otherwise_is_refused():
    model = _model({"type": "Embedding", "input_dim": VOCABULARY, "output_dim": 8},
                   {"type": "LSTM", "units": 8, "return_sequences": True},
                   {"type": "Dense", "units": VOCABULARY, "activation": "softmax"})
    with pytest.raises(Exception, match="'lstm' \\(LSTM\\) mixes positions without a key/value cache"):
        CachedDecoder(model, STEPS)
    encoder = _model({"type": "TokenAndPositionEmbedding", "vocabulary_size": VOCABULARY, "sequence_length": STEPS,
                      "embedding_dim": 8}, {"type": "TransformerEncoder", "intermediate_dim": 8, "num_heads": 2},
                     {"type": "Dense", "units": VOCABULARY, "activation": "softmax"})
    with pytest.raises(Exception, match="TransformerEncoder"):
        CachedDecoder(encoder, STEPS)


@pytest.mark.parametrize("first,position", [(0, 0), (0, 9), (4, 9)])
def test_the_step_kernels_equal_their_numpy_twins(first, position):
    from dlcli import generation
    from dlcli.kernels import attention as compiled

    rng = np.random.default_rng(position)
    batch, heads, key_dim, value_dim = 2, 3, 4, 5
    qkv = rng.standard_normal((batch, heads * (2 * key_dim + value_dim))).astype(np.float32)
    cache_keys = rng.standard_normal((batch, heads, 12, key_dim)).astype(np.float32)
    cache_values = rng.standard_normal((batch, heads, 12, value_dim)).astype(np.float32)
    cache_keys[:, :, position:] = cache_values[:, :, position:] = np.nan  # rows after the position are never read
    results = []
    for attend in (compiled.attend_one_query, generation.attend_one_query):
        keys, values = cache_keys.copy(), cache_values.copy()
        context = np.full((batch, heads * value_dim), np.nan, np.float32)
        attend(qkv, keys, values, position, first, context)
        results.append((keys, values, context))
    (keys, values, context), (keys_ref, values_ref, context_ref) = results
    np.testing.assert_array_equal(keys[:, :, position], qkv[:, heads * key_dim:2 * heads * key_dim]
                                  .reshape(batch, heads, key_dim))
    np.testing.assert_array_equal(keys, keys_ref)
    np.testing.assert_array_equal(values, values_ref)
    np.testing.assert_allclose(context, context_ref, atol=1e-6, rtol=0)
    assert not np.isnan(context).any()
    x, residual = rng.standard_normal((2, 2, 7)).astype(np.float32) * 3 + 1
    gamma, beta = rng.standard_normal((2, 7)).astype(np.float32)
    for r in (residual, np.empty((0, 0), np.float32)):
        (summed, out), (summed_ref, out_ref) = [[np.empty_like(x), np.empty_like(x)] for _ in range(2)]
        compiled.add_layer_norm(x, r, gamma, beta, 1e-5, summed, out)
        generation.add_layer_norm(x, r, gamma, beta, 1e-5, summed_ref, out_ref)
        np.testing.assert_array_equal(summed, summed_ref)
        np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=0)
