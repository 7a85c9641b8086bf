"""KerasHub's Transformer building blocks with KerasHub's names, arguments, defaults and weight order:
PositionEmbedding, SinePositionEncoding, TokenAndPositionEmbedding, TransformerEncoder, TransformerDecoder.

The blocks own Keras layers (MultiHeadAttention, LayerNormalization, Dense, Dropout) as a wrapper owns its inner
layer: their weights appear under KerasHub's sub-layer names ("self_attention_layer/query/kernel",
"feedforward_layer_norm/gamma" ...) in KerasHub's order. Masks follow KerasHub: the encoder's attention gets the
incoming padding mask on queries and keys (as Keras' MultiHeadAttention takes it from its inputs); the decoder's
self-attention masks padded keys and the future (a causal mask), its cross-attention the encoder's padded steps.
"""
import numpy as np

from dlcli.engine import activations, initializers
from dlcli.engine.layer import Layer, format_shape, register
from dlcli.errors import ConfigError, ShapeError
from dlcli.registry import Size
from dlcli.layers.attention import MultiHeadAttention
from dlcli.layers.core import Dense, Dropout
from dlcli.layers.embedding import Embedding
from dlcli.layers.normalization import LayerNormalization
from dlcli.layers.wrappers import Wrapper


def _sequence_shape(layer, input_shape, what="(batch, steps, features)"):
    if isinstance(input_shape, list) or len(input_shape) < 2:
        raise ShapeError(f"{type(layer).__name__} '{layer.name}' expects input {what}; got "
                         f"{format_shape(input_shape)}")
    return tuple(input_shape)


def _check_length(layer, steps: int):
    if steps > layer.sequence_length:
        raise ShapeError(f"{type(layer).__name__} '{layer.name}': a sequence of {steps} steps is longer than "
                         f"sequence_length={layer.sequence_length}; raise sequence_length or cut the sequences "
                         f"(e.g. the dataset's maxlen)")


def _broadcast_onnx(g, x, table, name):
    """`table` (steps, features) broadcast to x's run-time shape (batch first), as forward does."""
    y = g.op("Expand", [g.const(table, f"{name}_table"), g.op("Shape", [x.name])], name)
    return g.value(y, x.rank)


def _keras_uniform(initializer):
    # KerasHub passes Keras' "uniform", which is RandomUniform(-0.05, 0.05): our random_uniform's default
    return initializers.get("random_uniform" if initializer == "uniform" else initializer)


@register("PositionEmbedding")
class PositionEmbedding(Layer):
    """A learned embedding per position, (sequence_length, features); the output is its first `steps` rows
    broadcast over the batch (it does not depend on the input's values, only its shape). No mask, as KerasHub."""

    keras_package = "keras_hub"

    def __init__(self, sequence_length: Size, initializer="glorot_uniform", **kw):
        super().__init__(**kw)
        self.sequence_length = int(sequence_length)
        self.initializer = _keras_uniform(initializer)

    def build(self, input_shape):
        shape = _sequence_shape(self, input_shape)
        _check_length(self, shape[-2])
        self.embeddings = self.add_weight("embeddings", (self.sequence_length, shape[-1]), self.initializer)

    def forward(self, x, training=False):
        self.in_shape = x.shape
        return np.broadcast_to(self.embeddings.value[:x.shape[-2]], x.shape).copy()

    def forward_at(self, x, start: int):
        """The rows of positions start, start + 1, ... (dlcli generate's steps after a prefix)."""
        table = self.embeddings.value[start:start + x.shape[-2]]
        return np.broadcast_to(table, x.shape).copy()

    def to_onnx(self, g, x, in_shape, mask):
        return _broadcast_onnx(g, g.last(x), self.embeddings.value[:in_shape[-2]], self.name)

    def backward(self, grad):
        if self.embeddings.grad is not None:
            steps = grad.shape[-2]
            self.embeddings.grad[:steps] += grad.reshape(-1, steps, grad.shape[-1]).sum(0)
        return np.zeros(self.in_shape, grad.dtype) if self.input_grad_needed else None


@register("SinePositionEncoding")
class SinePositionEncoding(Layer):
    """Vaswani et al.'s fixed encoding, KerasHub's formula: feature j of position p is sin(p * w_j) for even j and
    cos(p * w_j) for odd j, w_j = max_wavelength ** -(2 * (j // 2) / features). No weights; no mask."""

    keras_package = "keras_hub"

    def __init__(self, max_wavelength: float = 10000, **kw):
        super().__init__(**kw)
        self.max_wavelength = max_wavelength

    def build(self, input_shape):
        _sequence_shape(self, input_shape)

    def encoding(self, steps: int, features: int, dtype=np.float32) -> np.ndarray:
        dtype = np.dtype(dtype)
        timescales = np.power(dtype.type(1 / self.max_wavelength),
                              (2 * (np.arange(features) // 2)).astype(dtype) / dtype.type(features))
        angles = np.arange(steps, dtype=dtype)[:, None] * timescales[None, :]
        return np.where(np.arange(features) % 2 == 0, np.sin(angles), np.cos(angles)).astype(dtype)

    def forward(self, x, training=False):
        self.in_shape = x.shape
        encoding = self.encoding(x.shape[-2], x.shape[-1], x.dtype if x.dtype.kind == "f" else np.float32)
        return np.broadcast_to(encoding, x.shape).copy()

    def backward(self, grad):
        return np.zeros(self.in_shape, grad.dtype) if self.input_grad_needed else None

    def forward_at(self, x, start: int):
        encoding = self.encoding(start + x.shape[-2], x.shape[-1], x.dtype if x.dtype.kind == "f" else np.float32)
        return np.broadcast_to(encoding[start:], x.shape).copy()

    def to_onnx(self, g, x, in_shape, mask):
        return _broadcast_onnx(g, g.last(x), self.encoding(in_shape[-2], in_shape[-1]), self.name)


@register("RotaryEmbedding")
class RotaryEmbedding(Layer):
    """KerasHub's rotary position encoding (RoFormer): at position p the features' halves x1, x2 become
    x * cos(p * w) + concat(-x2, x1) * sin(p * w), w_j = max_wavelength ** -(2j / features) for each half (features:
    denominator_dim when given), divided by scaling_factor (rope_type linear) or by scaling_factor ** (features /
    (features - 2)) (dynamic); sequence_axis and feature_axis as KerasHub's (counting the batch axis). No weights;
    float32 arithmetic as KerasHub. KerasHub's start_index call argument is forward_at (dlcli generate's steps)."""

    keras_package = "keras_hub"
    ROPE_TYPES = ("linear", "dynamic")

    def __init__(self, max_wavelength: float = 10000, scaling_factor: float = 1.0, rope_type: str = "linear",
                 beta_fast: float = 32.0, beta_slow: float = 1.0, original_max_position_embeddings: int = 4096,
                 truncate: bool = True, sequence_axis: int = 1, feature_axis: int = -1,
                 denominator_dim: int | None = None, **kw):
        super().__init__(**kw)
        if not scaling_factor > 0:
            raise ConfigError(f"RotaryEmbedding '{self.name}': scaling_factor must be positive; got {scaling_factor}")
        if rope_type not in self.ROPE_TYPES:  # beta_*, original_max_position_embeddings, truncate: YaRN's only
            raise ConfigError(f"RotaryEmbedding '{self.name}': rope_type must be one of {', '.join(self.ROPE_TYPES)} "
                              f"(KerasHub's yarn is not implemented); got {rope_type!r}")
        self.max_wavelength, self.scaling_factor, self.rope_type = max_wavelength, float(scaling_factor), rope_type
        self.sequence_axis, self.feature_axis = int(sequence_axis), int(feature_axis)
        self.denominator_dim = denominator_dim

    def _axes(self, rank: int) -> tuple[int, int]:
        """(sequence, feature) axes of a batch of rank `rank`, non-negative."""
        return self.sequence_axis % rank, self.feature_axis % rank

    def build(self, input_shape):
        if isinstance(input_shape, list) or len(input_shape) < 2:
            raise ShapeError(f"RotaryEmbedding '{self.name}' expects (batch, steps, ..., features); got "
                             f"{format_shape(input_shape)}")
        rank = len(input_shape) + 1
        sequence, feature = (a if -rank <= a < rank else None for a in (self.sequence_axis, self.feature_axis))
        if sequence is None or feature is None or sequence % rank == 0 or feature % rank == 0 \
                or sequence % rank == feature % rank:
            raise ShapeError(f"RotaryEmbedding '{self.name}': sequence_axis {self.sequence_axis} and feature_axis "
                             f"{self.feature_axis} must be two different non-batch axes of {format_shape(input_shape)}")
        if input_shape[feature % rank - 1] % 2:
            raise ShapeError(f"RotaryEmbedding '{self.name}' rotates pairs of features: the feature axis needs an even "
                             f"size; got {format_shape(input_shape)}")

    def tables(self, steps: int, features: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the angles, (steps, features), KerasHub's float32 arithmetic."""
        f32 = np.float32
        exponent = np.arange(0, features, 2, dtype=f32) / f32(self.denominator_dim or features)
        inverse = np.power(f32(self.max_wavelength), -exponent)
        if self.rope_type == "linear":
            inverse /= f32(self.scaling_factor)
        else:  # dynamic
            inverse /= np.power(f32(self.scaling_factor), f32(features) / f32(max(1, features - 2)))
        positions = np.arange(steps, dtype=f32) + f32(start)
        angles = positions[:, None] * inverse[None, :]
        angles = np.concatenate([angles, angles], 1)
        return np.cos(angles), np.sin(angles)

    def _standard(self, x):
        """x with the sequence axis at 1 and the features last (KerasHub's moveaxis)."""
        sequence, feature = self._axes(x.ndim)
        return np.moveaxis(x, (feature, sequence), (-1, 1))

    def _restore(self, y, ndim):
        sequence, feature = self._axes(ndim)
        return np.moveaxis(y, (-1, 1), (feature, sequence))

    def _rotate(self, x, start: int):
        x = self._standard(x)
        cos, sin = self.tables(x.shape[1], x.shape[-1], start)
        shape = (1, x.shape[1], *[1] * (x.ndim - 3), x.shape[-1])
        self.cos, self.sin = cos.reshape(shape).astype(x.dtype), sin.reshape(shape).astype(x.dtype)
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * self.cos + rotated * self.sin

    def forward(self, x, training=False):
        return np.ascontiguousarray(self._restore(self._rotate(x, 0), x.ndim))

    def forward_at(self, x, start: int):
        return np.ascontiguousarray(self._restore(self._rotate(x, start), x.ndim))

    def backward(self, grad):
        g = self._standard(grad)
        half = g.shape[-1] // 2
        scaled = g * self.sin  # the transpose of concat(-x2, x1) is concat(g2, -g1)
        return np.ascontiguousarray(self._restore(
            g * self.cos + np.concatenate([scaled[..., half:], -scaled[..., :half]], -1), grad.ndim))

    def to_onnx(self, g, x, in_shape, mask):
        v = g.last(x)
        rank = len(in_shape) + 1
        sequence, feature = self._axes(rank)
        # the permutation np.moveaxis makes: axis i of size i + 2 tells where each axis went
        standard = [s - 2 for s in np.moveaxis(np.empty(tuple(range(2, rank + 2)), np.int8), (feature, sequence),
                                               (-1, 1)).shape]
        name = v.name if standard == list(range(rank)) else g.op("Transpose", [v.name], perm=standard)
        steps, features = in_shape[sequence - 1], in_shape[feature - 1]
        cos, sin = self.tables(steps, features)
        shape = (1, steps, *[1] * (rank - 3), features)
        first, second = g.split(name, [features // 2, features // 2], axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        y = g.op("Add", [g.op("Mul", [name, g.const(cos.reshape(shape), f"{self.name}_cos")]),
                         g.op("Mul", [rotated, g.const(sin.reshape(shape), f"{self.name}_sin")])])
        if standard != list(range(rank)):
            y = g.op("Transpose", [y], perm=[int(a) for a in np.argsort(standard)])
        return g.value(y, rank)


@register("TokenAndPositionEmbedding")
class TokenAndPositionEmbedding(Wrapper):
    """Token embedding + learned position embedding of integer sequences (batch, steps) -> (batch, steps,
    embedding_dim); with mask_zero, token 0 is padding and the output carries the mask. tie_weights=False adds
    KerasHub's `reverse_embeddings` (embedding_dim, vocabulary_size), which only its reverse projection reads."""

    keras_package = "keras_hub"
    keras_weight_groups = ("token_embedding/vars", "position_embedding/vars")

    def __init__(self, vocabulary_size: Size, sequence_length: Size, embedding_dim: Size, tie_weights: bool = True,
                 embeddings_initializer="uniform", mask_zero: bool = False, **kw):
        super().__init__(**kw)
        self.vocabulary_size, self.sequence_length = int(vocabulary_size), int(sequence_length)
        self.embedding_dim, self.tie_weights, self.mask_zero = int(embedding_dim), bool(tie_weights), bool(mask_zero)
        self.embeddings_initializer = embeddings_initializer
        self.token_embedding = Embedding(self.vocabulary_size, self.embedding_dim, embeddings_initializer,
                                         mask_zero=self.mask_zero, name="token_embedding")
        self.position_embedding = PositionEmbedding(self.sequence_length, embeddings_initializer,
                                                    name="position_embedding")

    def _inner(self):
        return [("token_embedding/", self.token_embedding), ("position_embedding/", self.position_embedding)]

    def build(self, input_shape):
        if isinstance(input_shape, list) or len(input_shape) != 1:
            raise ShapeError(f"TokenAndPositionEmbedding '{self.name}' expects token ids (batch, steps); got "
                             f"{format_shape(input_shape)}")
        _check_length(self, input_shape[0])
        self._build_inner(self.token_embedding, input_shape)
        self._build_inner(self.position_embedding, (*input_shape, self.embedding_dim))
        self._adopt_weights()
        if not self.tie_weights:  # KerasHub's order: token, reverse, position
            position = self.params.pop("position_embedding/embeddings")
            self.add_weight("token_embedding/reverse_embeddings", (self.embedding_dim, self.vocabulary_size),
                            _keras_uniform(self.embeddings_initializer))
            self.params[position.name] = position

    def output_shape(self, input_shape):
        return (*input_shape, self.embedding_dim)

    def forward(self, x, training=False):
        self._sync()
        tokens = self.token_embedding.forward(x, training)
        self.position_embedding.input_grad_needed = False
        return tokens + self.position_embedding.forward(tokens, training)

    def forward_at(self, x, start: int):
        self._sync()
        tokens = self.token_embedding.forward(x, False)
        return tokens + self.position_embedding.forward_at(tokens, start)

    def backward(self, grad):
        self.position_embedding.backward(grad)
        return self.token_embedding.backward(grad)

    def compute_mask(self, x, mask):
        return self.token_embedding.compute_mask(x, mask)

    def to_onnx(self, g, x, in_shape, mask):
        tokens = g.emit(self.token_embedding, x, in_shape, None)
        table = g.weight(self, self.position_embedding.embeddings.value[:in_shape[0]], "position_embeddings")
        return g.value(g.op("Add", [tokens.name, table], self.name), tokens.rank)

    def onnx_mask(self, g, x, mask):
        return self.token_embedding.onnx_mask(g, x, mask)


class _TransformerBlock(Wrapper):
    """What KerasHub's encoder and decoder share: arguments, the feed-forward sub-block, and the residual wiring
    x + f(norm(x)) (normalize_first) or norm(x + f(x))."""

    supports_masking = True
    keras_package = "keras_hub"

    def __init__(self, intermediate_dim: Size, num_heads: Size, dropout: float = 0, activation="relu",
                 layer_norm_epsilon: float = 1e-5, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 normalize_first: bool = False, **kw):
        super().__init__(**kw)
        for arg, value in (("intermediate_dim", intermediate_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{type(self).__name__} '{self.name}': {arg} must be a positive integer; got "
                                  f"{value!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"{type(self).__name__} '{self.name}': dropout must be in [0, 1); got {dropout}")
        self.intermediate_dim, self.num_heads, self.dropout = int(intermediate_dim), int(num_heads), float(dropout)
        self.activation = activations.get(activation)
        self.layer_norm_epsilon, self.normalize_first = float(layer_norm_epsilon), bool(normalize_first)
        self.kernel_initializer, self.bias_initializer = kernel_initializer, bias_initializer

    def _attention(self, name, features):
        key_dim = features // self.num_heads  # KerasHub: hidden_dim // num_heads
        if key_dim == 0:
            raise ShapeError(f"{type(self).__name__} '{self.name}': {features} features cannot be split into "
                             f"num_heads={self.num_heads} heads (KerasHub's key_dim = features // num_heads is 0)")
        return MultiHeadAttention(self.num_heads, key_dim, dropout=self.dropout,
                                  kernel_initializer=self.kernel_initializer,
                                  bias_initializer=self.bias_initializer, name=name)

    def _norm(self, name):
        return LayerNormalization(epsilon=self.layer_norm_epsilon, name=name)

    def _feedforward(self, features):
        self.intermediate = Dense(self.intermediate_dim, self.activation.name, name="feedforward_intermediate_dense",
                                  kernel_initializer=self.kernel_initializer, bias_initializer=self.bias_initializer)
        self.output_dense = Dense(features, name="feedforward_output_dense",
                                  kernel_initializer=self.kernel_initializer, bias_initializer=self.bias_initializer)
        self.feedforward_dropout = Dropout(self.dropout, name="feedforward_dropout")
        self.feedforward_norm = self._norm("feedforward_layer_norm")

    def _build_feedforward(self, shape):
        self._build_inner(self.intermediate, shape)
        self._build_inner(self.output_dense, (*shape[:-1], self.intermediate_dim))

    def _residual(self, norm, body, x):
        if self.normalize_first:
            return x + body(norm.forward(x))
        return norm.forward(x + body(x))

    def _residual_backward(self, norm, body_backward, grad):
        if self.normalize_first:
            return grad + norm.backward(body_backward(grad))
        grad = norm.backward(grad)
        return grad + body_backward(grad)

    def _feedforward_forward(self, x, training):
        h = self.output_dense.forward(self.intermediate.forward(x, training), training)
        return self.feedforward_dropout.forward(h, training)

    def _feedforward_backward(self, grad):
        return self.intermediate.backward(self.output_dense.backward(self.feedforward_dropout.backward(grad)))

    def kept_size(self, input_shape):
        """The attention layers' own, plus per sub-block the residual sum, the normalised values and the dropout
        scale (each a (steps, features) array), and the feed-forward's intermediate activations."""
        shapes = input_shape if isinstance(input_shape, list) else [input_shape]
        steps, features = shapes[0][-2], shapes[0][-1]
        calls = self._attention_calls(shapes)
        per_block = 3 * steps * features
        return (sum(layer.kept_size(shape) for layer, shape in calls) + per_block * (len(calls) + 1)
                + 2 * steps * self.intermediate_dim)

    def _onnx_residual(self, g, norm, body, x, shape):
        if self.normalize_first:
            y = body(g.last(g.emit(norm, x, shape, None)))
            return g.value(g.op("Add", [x.name, y.name]), x.rank)
        summed = g.value(g.op("Add", [x.name, body(x).name]), x.rank)
        return g.last(g.emit(norm, summed, shape, None))

    def _onnx_feedforward(self, g, x, shape):
        h = g.last(g.emit(self.intermediate, x, shape, None))
        return g.last(g.emit(self.output_dense, h, (*shape[:-1], self.intermediate_dim), None))

    def flops(self, input_shape):
        shapes = input_shape if isinstance(input_shape, list) else [input_shape]
        x = shapes[0]
        total = self.intermediate.flops(x) + self.output_dense.flops((*x[:-1], self.intermediate_dim))
        return total + sum(layer.flops(shape) for layer, shape in self._attention_calls(shapes))


@register("TransformerEncoder")
class TransformerEncoder(_TransformerBlock):
    """KerasHub's encoder block: self-attention (key_dim = features // num_heads) and a feed-forward network
    (Dense(intermediate_dim, activation), Dense(features)), each with dropout, a residual and LayerNormalization
    (after the residual, or before the sub-block with normalize_first). The incoming mask is the padding mask."""

    @property
    def keras_weight_groups(self):
        # KerasHub's attributes (_self_attention_layer ...) name the groups of a .keras file
        return [*[f"_self_attention_layer/{g}" for g in MultiHeadAttention.keras_weight_groups],
                "_self_attention_layer_norm/vars", "_feedforward_layer_norm/vars",
                "_feedforward_intermediate_dense/vars", "_feedforward_output_dense/vars"]

    def _inner(self):
        return [("self_attention_layer/", self.attention), ("self_attention_layer_norm/", self.attention_norm),
                ("feedforward_layer_norm/", self.feedforward_norm),
                ("feedforward_intermediate_dense/", self.intermediate),
                ("feedforward_output_dense/", self.output_dense), ("self_attention_dropout/", self.attention_dropout),
                ("feedforward_dropout/", self.feedforward_dropout)]

    def build(self, input_shape):
        shape = _sequence_shape(self, input_shape)
        self.attention = self._attention("self_attention_layer", shape[-1])
        self.attention_norm = self._norm("self_attention_layer_norm")
        self.attention_dropout = Dropout(self.dropout, name="self_attention_dropout")
        self._feedforward(shape[-1])
        self._build_inner(self.attention, shape)
        self._build_inner(self.attention_norm, shape)
        self._build_inner(self.feedforward_norm, shape)
        self._build_feedforward(shape)
        self._adopt_weights()

    def _attention_calls(self, shapes):
        return [(self.attention, shapes[0])]

    def forward(self, x, training=False):
        self._sync()
        self.attention.input_mask = self.input_mask  # queries and keys, as Keras' MHA takes the inputs' mask

        def attend(h):
            return self.attention_dropout.forward(self.attention.forward(h, training), training)

        x = self._residual(self.attention_norm, attend, x)
        return self._residual(self.feedforward_norm, lambda h: self._feedforward_forward(h, training), x)

    def backward(self, grad):
        grad = self._residual_backward(self.feedforward_norm, self._feedforward_backward, grad)
        return self._residual_backward(
            self.attention_norm, lambda g: self.attention.backward(self.attention_dropout.backward(g)), grad)

    def to_onnx(self, g, x, in_shape, mask):
        shape = tuple(in_shape)
        h = self._onnx_residual(g, self.attention_norm, lambda q: g.last(g.emit(self.attention, q, shape, mask)),
                                g.last(x), shape)
        return self._onnx_residual(g, self.feedforward_norm, lambda q: self._onnx_feedforward(g, q, shape), h, shape)


@register("TransformerDecoder")
class TransformerDecoder(_TransformerBlock):
    """KerasHub's decoder block: causal self-attention, then (called on [decoder_sequence, encoder_sequence])
    cross-attention to the encoder's sequence, then the feed-forward network; each with dropout, a residual and
    LayerNormalization. Padded decoder steps are masked as keys (KerasHub's padding mask), the encoder's padded
    steps in the cross-attention; `use_causal_mask` is KerasHub's call argument, here a layer argument."""

    def __init__(self, intermediate_dim: Size, num_heads: Size, dropout: float = 0, activation="relu",
                 layer_norm_epsilon: float = 1e-5, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 normalize_first: bool = False, use_causal_mask: bool = True, **kw):
        super().__init__(intermediate_dim, num_heads, dropout, activation, layer_norm_epsilon, kernel_initializer,
                         bias_initializer, normalize_first, **kw)
        self.use_causal_mask = bool(use_causal_mask)

    @staticmethod
    def keras_call(args, kwargs):
        """KerasHub's call(decoder_sequence, encoder_sequence=None, ..., use_causal_mask=True)."""
        tensors = [*args, *[kwargs.pop(k) for k in ("decoder_sequence", "encoder_sequence") if k in kwargs]]
        causal = kwargs.pop("use_causal_mask", True)
        return [t for t in tensors if t is not None], {} if causal else {"use_causal_mask": False}

    @property
    def keras_weight_groups(self):
        attention = [f"{{}}/{g}" for g in MultiHeadAttention.keras_weight_groups]
        groups = [g.format("_self_attention_layer") for g in attention] + ["_self_attention_layer_norm/vars"]
        if self.cross:
            groups += [g.format("_cross_attention_layer") for g in attention] + ["_cross_attention_layer_norm/vars"]
        return groups + ["_feedforward_intermediate_dense/vars", "_feedforward_output_dense/vars",
                         "_feedforward_layer_norm/vars"]

    def _inner(self):
        inner = [("self_attention/", self.attention), ("self_attention_layer_norm/", self.attention_norm)]
        if self.cross:
            inner += [("cross_attention/", self.cross_attention),
                      ("cross_attention_layer_norm/", self.cross_attention_norm)]
        inner += [("feedforward_intermediate_dense/", self.intermediate),
                  ("feedforward_output_dense/", self.output_dense), ("feedforward_layer_norm/", self.feedforward_norm),
                  ("self_attention_dropout/", self.attention_dropout),
                  ("feedforward_dropout/", self.feedforward_dropout)]
        return inner + ([("cross_attention_dropout/", self.cross_attention_dropout)] if self.cross else [])

    def build(self, input_shape):
        shapes = input_shape if isinstance(input_shape, list) else [input_shape]
        if len(shapes) > 2:
            raise ShapeError(f"TransformerDecoder '{self.name}' takes decoder_sequence or [decoder_sequence, "
                             f"encoder_sequence]; got {len(shapes)} inputs")
        shape = _sequence_shape(self, shapes[0])
        self.cross = len(shapes) == 2
        self.attention = self._attention("self_attention", shape[-1])
        self.attention.use_causal_mask = self.use_causal_mask
        self.attention_norm = self._norm("self_attention_layer_norm")
        self.attention_dropout = Dropout(self.dropout, name="self_attention_dropout")
        self._build_inner(self.attention, [shape, shape])
        self._build_inner(self.attention_norm, shape)
        if self.cross:
            encoder = _sequence_shape(self, shapes[1])
            self.cross_attention = self._attention("cross_attention", shape[-1])
            self.cross_attention_norm = self._norm("cross_attention_layer_norm")
            self.cross_attention_dropout = Dropout(self.dropout, name="cross_attention_dropout")
            self._build_inner(self.cross_attention, [shape, encoder])
            self._build_inner(self.cross_attention_norm, shape)
        self._feedforward(shape[-1])
        self._build_feedforward(shape)
        self._build_inner(self.feedforward_norm, shape)
        self._adopt_weights()

    def output_shape(self, input_shape):
        return tuple(input_shape[0] if isinstance(input_shape, list) else input_shape)

    def _attention_calls(self, shapes):
        calls = [(self.attention, [shapes[0], shapes[0]])]
        return calls + ([(self.cross_attention, [shapes[0], shapes[1]])] if self.cross else [])

    def compute_mask(self, x, mask):
        return mask[0] if isinstance(mask, list) else mask

    def forward(self, x, training=False):
        self._sync()
        xs = x if isinstance(x, list) else [x]
        masks = self.input_mask if isinstance(self.input_mask, list) else [self.input_mask, None]
        decoder = xs[0]
        self.attention.input_mask = [None, masks[0]]  # KerasHub: padded steps masked as keys only

        def attend(h):
            return self.attention_dropout.forward(self.attention.forward([h, h], training), training)

        h = self._residual(self.attention_norm, attend, decoder)
        if self.cross:
            encoder = xs[1]
            self.cross_attention.input_mask = [None, masks[1]]

            def cross(q):
                return self.cross_attention_dropout.forward(self.cross_attention.forward([q, encoder], training),
                                                            training)

            h = self._residual(self.cross_attention_norm, cross, h)
        return self._residual(self.feedforward_norm, lambda q: self._feedforward_forward(q, training), h)

    def forward_cached(self, x, cache):
        """forward (inference, no cross-attention) of new positions after those in the self-attention's cache."""
        self._sync()
        h = self._residual(self.attention_norm, lambda q: self.attention.forward_cached(q, cache), x)
        return self._residual(self.feedforward_norm, lambda q: self._feedforward_forward(q, False), h)

    def backward(self, grad):
        grad = self._residual_backward(self.feedforward_norm, self._feedforward_backward, grad)
        d_encoder = []
        if self.cross:
            def cross_backward(g):
                dq, dv = self.cross_attention.backward(self.cross_attention_dropout.backward(g))
                d_encoder.append(dv)
                return dq

            grad = self._residual_backward(self.cross_attention_norm, cross_backward, grad)

        def self_backward(g):
            dq, dv = self.attention.backward(self.attention_dropout.backward(g))
            return dq + dv

        grad = self._residual_backward(self.attention_norm, self_backward, grad)
        return [grad, d_encoder[0]] if self.cross else grad

    def to_onnx(self, g, x, in_shape, mask):
        xs = [g.last(v) for v in (x if isinstance(x, list) else [x])]
        shapes = [tuple(s) for s in (in_shape if isinstance(in_shape, list) else [in_shape])]
        masks = mask if isinstance(mask, list) else [mask, None]
        shape = shapes[0]

        def attend(q):
            return g.last(g.emit(self.attention, [q, q], [shape, shape], [None, masks[0]]))

        h = self._onnx_residual(g, self.attention_norm, attend, xs[0], shape)
        if self.cross:
            def cross(q):
                return g.last(g.emit(self.cross_attention, [q, xs[1]], shapes, [None, masks[1]]))

            h = self._onnx_residual(g, self.cross_attention_norm, cross, h, shape)
        return self._onnx_residual(g, self.feedforward_norm, lambda q: self._onnx_feedforward(g, q, shape), h, shape)

    def onnx_mask(self, g, x, mask):
        return self.compute_mask(x, mask)
