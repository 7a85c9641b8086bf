"""Text from a language-model run (`dlcli generate`): the model run incrementally with a key/value cache, and
sampling with temperature, top-k and top-p (nucleus).

A language model here is a chain of layers from token ids (batch, steps) to next-token probabilities (batch,
steps, vocabulary) whose only position-mixing layers are causal self-attention (TransformerDecoder without
cross-attention, MultiHeadAttention with use_causal_mask) and position embeddings; every other layer works on each
position alone (Embedding, Dense, LayerNormalization, Dropout, Activation). Then a new token needs one position's
work in each layer, its attention reading the cached keys and values of the prefix, instead of a pass over the
whole prefix. The context is the run's training sequence_length: when it is full, the cache is rebuilt from the
last half of the tokens (positions start again at 0), one prefix pass per context / 2 tokens.

A step of one token per sequence, generate's inner loop, runs the attention layers and decoder blocks through
step functions prepared at reset: the query, key and value kernels fused into one GEMV (the query's scale folded
in), buffers allocated once, and the cached attention and each residual + layer norm one compiled call
(dlcli/kernels/attention.py; the NumPy twins below with DLCLI_KERNELS=numpy). At batch 1 the layers' general
forward spent most of a step in NumPy's per-call overhead.
"""
from dataclasses import dataclass

import numpy as np

from dlcli import kernels, run_files
from dlcli.engine.layer import autocast_inputs
from dlcli.errors import DlcliError
from dlcli.layers.attention import KeyValueCache, MultiHeadAttention, masked_softmax_
from dlcli.layers.core import Activation, Dense, Dropout
from dlcli.layers.embedding import Embedding
from dlcli.layers.normalization import LayerNormalization
from dlcli.layers.transformer import TransformerDecoder

POSITIONWISE = (Embedding, Dense, LayerNormalization, Dropout, Activation)


def _not_a_language_model(why: str) -> DlcliError:
    return DlcliError(f"not a language model: {why}; dlcli generate samples from a run trained on next tokens "
                      f"(data: {{type: imdb_lm}}, e.g. configs/imdb_gpt.yaml)", exit_code=2)


def decoder_layers(model) -> list:
    """The model's layer calls (graph nodes) in order, checked to be a chain that a key/value cache can run (one
    layer may be called twice: a ReversibleEmbedding's reverse call gives the logits)."""
    from dlcli.engine.graph import InputLayer

    nodes = [n for n in model.graph.nodes if not isinstance(n.layer, InputLayer)]
    if len(model.graph.inputs) != 1 or len(model.graph.outputs) != 1:
        raise _not_a_language_model("the model has several inputs or outputs")
    previous = model.graph.inputs[0]
    for node in nodes:
        if node.multi_input or node.multi_output or node.inputs[0] is not previous:
            raise _not_a_language_model(f"layer '{node.layer.name}' is not part of one chain of layers")
        previous = node.outputs[0]
        layer = node.layer
        if isinstance(layer, TransformerDecoder):
            if not layer.use_causal_mask:
                raise _not_a_language_model(f"TransformerDecoder '{layer.name}' has use_causal_mask: false")
        elif isinstance(layer, MultiHeadAttention):
            if not layer.use_causal_mask or layer.return_attention_scores:
                raise _not_a_language_model(f"MultiHeadAttention '{layer.name}' is not causal self-attention")
        elif not (hasattr(layer, "forward_at") or isinstance(layer, POSITIONWISE)):
            raise _not_a_language_model(f"layer '{layer.name}' ({type(layer).__name__}) mixes positions without "
                                        f"a key/value cache")
    return nodes


class CachedDecoder:
    """A language model fed a few tokens at a time: `feed(tokens)` appends (batch, n) ids after those fed before and
    returns the model's outputs (next-token probabilities) at the new positions (or only the last one)."""

    def __init__(self, model, context: int):
        nodes, self.context = decoder_layers(model), int(context)
        self.layers, self.call_args = [n.layer for n in nodes], [n.call_args for n in nodes]
        mixing = [i for i, layer in enumerate(self.layers) if not isinstance(layer, POSITIONWISE)]
        self.last_mixing = mixing[-1] if mixing else -1
        self.caches = {}
        self.length = 0

    def reset(self, batch: int):
        """Empty caches for `batch` sequences, and the one-token step functions read from the current weights."""
        self.length = 0
        self.caches = {}
        self.steps = [None] * len(self.layers)
        compiled = kernels.compiled("attention")
        for i, layer in enumerate(self.layers):
            attention = layer.attention if isinstance(layer, TransformerDecoder) else layer
            if isinstance(attention, MultiHeadAttention):
                cache = KeyValueCache(batch, attention.num_heads, self.context, attention.key_dim,
                                      attention.value_dim, layer.dtype)
                self.caches[id(layer)] = cache
                self.steps[i] = (DecoderBlockStep(layer, cache, compiled) if attention is not layer
                                 else AttentionStep(attention, cache, compiled))

    def feed(self, tokens: np.ndarray, all_positions: bool = False) -> np.ndarray:
        x = np.asarray(tokens, np.int32)
        if self.length + x.shape[1] > self.context:
            raise DlcliError(f"{self.length + x.shape[1]} positions exceed the model's context of {self.context}")
        one = x.shape[1] == 1
        for i, layer in enumerate(self.layers):
            vars(layer).update(self.call_args[i])
            x = autocast_inputs(layer, [x])[0]  # as the graph gives each layer its input
            if one and self.steps[i] is not None:
                x = self.steps[i](x)
            elif id(layer) in self.caches:
                x = layer.forward_cached(x, self.caches[id(layer)])
            elif hasattr(layer, "forward_at"):
                x = layer.forward_at(x, self.length)
            else:
                x = layer.forward(x, False)
            if i == self.last_mixing and not all_positions:
                x = x[:, -1:]  # what follows works on each position alone: only the last one is needed
        self.length += tokens.shape[1]
        return x if all_positions else x[:, -1]


def attend_one_query(qkv, keys, values, position, first, context):
    """NumPy twin of kernels/attention.py's attend_one_query (its docstring says what it does)."""
    batch, heads, _, key_dim = keys.shape
    q = qkv[:, :heads * key_dim].reshape(batch, heads, 1, key_dim)
    keys[:, :, position] = qkv[:, heads * key_dim:2 * heads * key_dim].reshape(batch, heads, key_dim)
    values[:, :, position] = qkv[:, 2 * heads * key_dim:].reshape(batch, heads, -1)
    probs = masked_softmax_(q @ keys[:, :, first:position + 1].transpose(0, 1, 3, 2), None)
    context[:] = (probs @ values[:, :, first:position + 1]).reshape(batch, -1)


def add_layer_norm(x, residual, gamma, beta, epsilon, summed, out):
    """NumPy twin of kernels/attention.py's add_layer_norm: summed = x + residual (or x), out = its layer norm."""
    if residual.size:
        np.add(x, residual, out=summed)
    else:
        summed[:] = x
    centered = summed - summed.mean(-1, keepdims=True)
    variance = (centered * centered).mean(-1, keepdims=True)
    np.multiply(centered / np.sqrt(variance + x.dtype.type(epsilon)), gamma, out=out)
    out += beta


class AttentionStep:
    """Causal self-attention (a MultiHeadAttention layer, or a decoder block's) of one new position per sequence:
    x (batch, 1, features) -> (batch, 1, *output). GroupQueryAttention's key and value kernels are repeated per
    query head, as its cache holds them."""

    def __init__(self, attention: MultiHeadAttention, cache: KeyValueCache, compiled):
        parts = [attention._onnx_weights(part) for part in ("query", "key", "value")]  # (kernel, bias or None)
        scales = (attention.scale, 1.0, 1.0)  # Keras scales the query: folded into its kernel and bias
        self.kernel = np.concatenate([k.reshape(k.shape[0], -1) * k.dtype.type(s) for (k, _), s in zip(parts, scales)],
                                     1)
        self.bias = np.concatenate([(np.zeros(k.shape[1:], k.dtype) if b is None else b).reshape(-1)
                                    * k.dtype.type(s) for (k, b), s in zip(parts, scales)])
        output = attention.params["attention_output/kernel"].value
        self.output_shape = output.shape[2:]
        self.output_kernel = output.reshape(attention.num_heads * attention.value_dim, -1)
        self.output_bias = (attention.params["attention_output/bias"].value.reshape(-1) if attention.use_bias
                            else np.zeros(self.output_kernel.shape[1], output.dtype))
        batch = cache.keys.shape[0]
        self.qkv = np.empty((batch, self.kernel.shape[1]), self.kernel.dtype)
        self.context = np.empty((batch, self.output_kernel.shape[0]), self.kernel.dtype)
        self.cache, self.window = cache, attention.sliding_window
        self.attend = compiled.attend_one_query if compiled else attend_one_query

    def __call__(self, x):
        position = self.cache.length
        np.matmul(x.reshape(len(x), -1), self.kernel, out=self.qkv)
        self.qkv += self.bias
        first = max(0, position + 1 - self.window) if self.window else 0
        self.attend(self.qkv, self.cache.keys, self.cache.values, position, first, self.context)
        self.cache.length = position + 1
        out = self.context @ self.output_kernel
        out += self.output_bias
        return out.reshape(len(x), 1, *self.output_shape)


class DecoderBlockStep:
    """A TransformerDecoder block (self-attention only, inference) for one new position per sequence, KerasHub's
    wiring: norm(x + attention(x)) then norm(h + feedforward(h)), or with normalize_first x + attention(norm(x))
    then h + feedforward(norm(h))."""

    def __init__(self, block: TransformerDecoder, cache: KeyValueCache, compiled):
        block._sync()
        self.attention = AttentionStep(block.attention, cache, compiled)
        self.normalize_first = block.normalize_first
        features = block.output_dense.units
        self.norms = [(*norm._affine_arrays((features,)), norm.epsilon)
                      for norm in (block.attention_norm, block.feedforward_norm)]
        self.dense = [(d.kernel.value, d.bias.value if d.use_bias else np.zeros(d.units, d.kernel.value.dtype))
                      for d in (block.intermediate, block.output_dense)]
        self.activation = block.intermediate.activation
        batch = cache.keys.shape[0]
        self.hidden = np.empty((batch, block.intermediate_dim), self.attention.kernel.dtype)
        self.buffers = [np.empty((batch, features), self.attention.kernel.dtype) for _ in range(3)]
        self.empty = np.empty((0, 0), self.attention.kernel.dtype)
        self.add_layer_norm = compiled.add_layer_norm if compiled else add_layer_norm

    def _norm(self, which, x, residual, summed, out):
        gamma, beta, epsilon = self.norms[which]
        self.add_layer_norm(x, self.empty if residual is None else residual, gamma, beta, epsilon, summed, out)
        return summed, out

    def _feedforward(self, x):
        (w1, b1), (w2, b2) = self.dense
        np.matmul(x, w1, out=self.hidden)
        self.hidden += b1
        h = self.activation.forward_(self.hidden)
        out = h @ w2
        out += b2
        return out

    def __call__(self, x):
        batch = len(x)
        x = x.reshape(batch, -1)
        first, second, third = self.buffers
        out = np.empty_like(first)  # the block's output is handed on: not a buffer the next step overwrites
        if self.normalize_first:
            _, h = self._norm(0, x, None, first, second)
            summed, h = self._norm(1, x, self.attention(h[:, None]).reshape(batch, -1), first, third)
            np.add(summed, self._feedforward(h), out=out)
        else:
            _, h = self._norm(0, x, self.attention(x[:, None]).reshape(batch, -1), first, second)
            self._norm(1, h, self._feedforward(h), third, out)
        return out[:, None]


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95

    def check(self):
        if not self.temperature > 0:
            raise DlcliError(f"--temperature must be positive; got {self.temperature}", exit_code=2)
        if self.top_k < 0:
            raise DlcliError(f"--top-k must be 0 (off) or positive; got {self.top_k}", exit_code=2)
        if not 0 < self.top_p <= 1:
            raise DlcliError(f"--top-p must be in (0, 1]; got {self.top_p}", exit_code=2)


def sample_next(probs: np.ndarray, rng: np.random.Generator, sampling: Sampling, banned=(0,)) -> np.ndarray:
    """One token per row of next-token probabilities (batch, vocabulary): p ** (1 / temperature), then the top_k
    most likely, then the smallest set whose probability reaches top_p (Holtzman et al.; HuggingFace's order),
    renormalised. `banned` ids (padding) are never drawn."""
    logp = np.log(np.maximum(np.asarray(probs, np.float64), 1e-300)) / sampling.temperature
    logp[:, list(banned)] = -np.inf
    if 0 < sampling.top_k < logp.shape[1]:
        kth = np.partition(logp, -sampling.top_k, axis=1)[:, -sampling.top_k][:, None]
        logp[logp < kth] = -np.inf
    p = np.exp(logp - logp.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, 1)
        before = np.cumsum(sorted_p, 1) - sorted_p  # mass of the likelier tokens: keep while it is short of top_p
        np.put_along_axis(p, order, np.where(before < sampling.top_p, sorted_p, 0), 1)
        p /= p.sum(1, keepdims=True)
    cumulative = np.cumsum(p, 1)
    u = rng.random((len(p), 1)) * cumulative[:, -1:]
    return np.minimum((cumulative <= u).sum(1), p.shape[1] - 1)


def generate(decoder: CachedDecoder, prompt: list[int], length: int, rng: np.random.Generator, sampling: Sampling,
             stop: int | None = None):
    """Yield up to `length` sampled token ids continuing `prompt`, one at a time (a stream); `stop` (a review's
    START) ends the sample without being yielded. A full context restarts from its last half."""
    tokens = list(prompt)[-decoder.context:]
    decoder.reset(1)
    probs = decoder.feed(np.asarray([tokens]))
    for _ in range(length):
        token = int(sample_next(probs, rng, sampling)[0])
        if token == stop:
            return
        yield token
        tokens.append(token)
        if decoder.length == decoder.context:
            tokens = tokens[-(decoder.context // 2):]
            decoder.reset(1)
            probs = decoder.feed(np.asarray([tokens]))
        else:
            probs = decoder.feed(np.asarray([[token]]))


def load_language_model(run_dir, weights: str = "best", allow_config_change: bool = False):
    """(CachedDecoder, TextCodec) of a run trained as a language model; anything else is refused in one line."""
    from dlcli.data.language import TextCodec
    from dlcli.experiment import load_run_model

    run_dir = run_files.require_run_dir(run_dir)
    vocabulary_file = run_files.RunDir(run_dir).vocabulary
    vocabulary = run_files.read_json(vocabulary_file) if vocabulary_file.is_file() else {}
    if not vocabulary.get("language_model"):
        meta = run_files.RunDir(run_dir).meta
        config = run_files.read_json(meta).get("config", {}) if meta.is_file() else {}
        data = (config.get("data") or {}).get("type", "unknown")
        raise _not_a_language_model(f"{run_dir} was trained on data type '{data}', not next-token windows")
    _, model = load_run_model(run_dir, weights, allow_config_change)
    decoder = CachedDecoder(model, vocabulary["sequence_length"])
    codec = TextCodec(vocabulary)
    if model.outputs[0].shape[-1] < codec.size:
        raise _not_a_language_model(f"its output has {model.outputs[0].shape[-1]} units for a vocabulary of "
                                    f"{codec.size} tokens")
    return decoder, codec
