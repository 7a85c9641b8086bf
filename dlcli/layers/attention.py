"""MultiHeadAttention as Keras 3 defines it: arguments, defaults, weight layouts and mask rules.

Weights (Keras' EinsumDense layouts and order): query/kernel (d_query, num_heads, key_dim), query/bias (num_heads,
key_dim), key/... (d_key, num_heads, key_dim), value/... (d_value, num_heads, value_dim), attention_output/kernel
(num_heads, value_dim, *output_shape) and its bias (*output_shape). Every projection is one GEMM on the flattened
positions, the attention itself two batched GEMMs over (batch, heads); the softmax, masks and dropout work in place
on the one (batch, heads, T, S) array the backward pass needs.

Called on one tensor it is self-attention (query = value = key); on [query, value] or [query, value, key] as Keras'
`mha(query, value, key)`; a fourth tensor is the `attention_mask` (batch, T, S), 1 where a query may attend. Masks
follow Keras: the query's mask and the value's (and key's) masks, as an `Embedding(mask_zero=True)` propagates them,
combine with the attention mask, the causal mask and the sliding window by AND; the output carries the query's mask.
`use_causal_mask` and `return_attention_scores` are Keras call arguments; a YAML graph has no call arguments, so here
they are constructor arguments (a .keras file's call kwargs map onto them).
"""
import math

import numpy as np

from dlcli import kernels
from dlcli.engine import initializers
from dlcli.engine.layer import Layer, format_shape, register
from dlcli.errors import ConfigError, ExportError, ShapeError
from dlcli.registry import Size, Sizes

_MASKED = -1e9  # Keras' Softmax puts -1e9 (float32) where the mask is False, then zeroes those probabilities


def masked_softmax_(scores: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """Softmax over the last axis, in place; `keep` (broadcastable bool) as Keras' Softmax(mask): masked scores
    become -1e9 and their probabilities 0, so a query with nothing to attend to gets all zeros (not uniform)."""
    if keep is not None:
        np.copyto(scores, scores.dtype.type(_MASKED), where=~keep)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    if keep is not None:
        np.copyto(scores, scores.dtype.type(0), where=~keep)
    return scores


def softmax_backward_(grad: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """d(scores) = p * (g - sum(g * p)) over the last axis, written into `grad` (the row sums via einsum: no
    second (batch, heads, T, S) temporary). Masked entries have p = 0, so they get no gradient."""
    row = np.einsum("...s,...s->...", grad, probs)[..., None]
    grad -= row
    grad *= probs
    return grad


def softmax_dropout_(scores: np.ndarray, keep: np.ndarray | None, rate: float, rng: np.random.Generator):
    """(probs, dropped, attended) of (n, heads, T, S) scores: the probabilities in place of the scores
    (masked_softmax_); with rate > 0 the dropout mask drawn as rng.random(shape, dtype=float32) < rate and the
    probabilities after inverted dropout (a new array), else None and the probabilities themselves. The compiled
    kernels draw the same mask from the same generator."""
    compiled = kernels.compiled("attention")
    if compiled is None:
        probs = masked_softmax_(scores, keep)
        if not rate:
            return probs, None, probs
        dropped = rng.random(probs.shape, dtype=np.float32) < rate
        return probs, dropped, np.where(dropped, probs.dtype.type(0), probs / probs.dtype.type(1 - rate))
    keep = np.broadcast_to(np.True_ if keep is None else keep, scores.shape)
    compiled.mask_and_shift(scores, keep)
    np.exp(scores, out=scores)
    dropped = np.empty(scores.shape if rate else (0,) * 4, bool)
    attended = np.empty_like(scores) if rate else scores
    compiled.normalise_and_drop(scores, keep, rng, float(rate), dropped, attended)
    return scores, dropped if rate else None, attended


def dropped_probs(probs: np.ndarray, dropped: np.ndarray | None, rate: float) -> np.ndarray:
    """The probabilities after the forward pass' dropout again (a new array; the probabilities when none)."""
    if dropped is None:
        return probs
    scale = probs.dtype.type(1 / (1 - rate))
    compiled = kernels.compiled("attention")
    if compiled is None:
        return np.where(dropped, probs.dtype.type(0), probs * scale)
    out = np.empty_like(probs)
    compiled.apply_dropout(probs, dropped, scale, out)
    return out


def softmax_dropout_backward_(grad: np.ndarray, probs: np.ndarray, dropped: np.ndarray | None, rate: float,
                              extra: np.ndarray | None = None) -> np.ndarray:
    """d(scores) from grad = d(probabilities after dropout), in place: the dropout's mask and scale, plus `extra`
    (the gradient of returned scores), then softmax_backward_."""
    scale = grad.dtype.type(1 / (1 - rate))
    compiled = kernels.compiled("attention")
    if compiled is not None:
        empty = np.empty((0,) * 4, bool)
        compiled.softmax_dropout_backward(grad, probs, empty if dropped is None else dropped, scale,
                                          np.empty((0,) * 4, grad.dtype) if extra is None else extra)
        return grad
    if dropped is not None:
        np.copyto(grad, 0, where=dropped)
        grad *= scale
    if extra is not None:
        grad += extra
    return softmax_backward_(grad, probs)


def causal_mask(t: int, s: int) -> np.ndarray:
    """Keras' _compute_causal_mask: query i may attend to key j <= i (lower triangle of (t, s))."""
    return np.arange(t)[:, None] >= np.arange(s)[None, :]


def sliding_window_mask(t: int, s: int, window: int) -> np.ndarray:
    """Keras' _compute_sliding_window_mask: |i - j| < window (a symmetric band)."""
    return np.abs(np.arange(t)[:, None] - np.arange(s)[None, :]) < window


class KeyValueCache:
    """One self-attention layer's keys and values of the positions seen so far, (batch, heads, capacity, dim) arrays
    filled from the front."""

    def __init__(self, batch: int, heads: int, capacity: int, key_dim: int, value_dim: int, dtype=np.float32):
        self.keys = np.zeros((batch, heads, capacity, key_dim), dtype)
        self.values = np.zeros((batch, heads, capacity, value_dim), dtype)
        self.length = 0

    def append(self, keys, values):
        """Store the new positions' keys and values (batch, heads, n, dim); return all of them so far."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"key/value cache full: {end} positions, capacity {self.keys.shape[2]}")
        self.keys[:, :, self.length:end], self.values[:, :, self.length:end] = keys, values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


@register("MultiHeadAttention")
class MultiHeadAttention(Layer):
    """Keras' multi-head attention: softmax(q k^T / sqrt(key_dim)) v per head, projected back to the query's
    features (or `output_shape`); dropout on the attention probabilities while training."""

    supports_masking = True
    keras_weight_groups = ("query_dense/vars", "key_dense/vars", "value_dense/vars", "output_dense/vars")

    def __init__(self, num_heads: Size, key_dim: Size, value_dim: Size | None = None, dropout: float = 0.0,
                 use_bias: bool = True, output_shape: Sizes = None, attention_axes: int | list[int] | None = None,
                 sliding_window: Size | None = None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, use_causal_mask: bool = False, return_attention_scores: bool = False, **kw):
        super().__init__(**kw)
        for arg, value in (("num_heads", num_heads), ("key_dim", key_dim), ("value_dim", value_dim),
                           ("sliding_window", sliding_window)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value <= 0):
                raise ConfigError(f"MultiHeadAttention '{self.name}': {arg} must be a positive integer; got {value!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"MultiHeadAttention '{self.name}': dropout must be in [0, 1); got {dropout}")
        self.num_heads, self.key_dim = int(num_heads), int(key_dim)
        self.value_dim = int(value_dim) if value_dim else self.key_dim  # Keras: value_dim defaults to key_dim
        self.dropout, self.use_bias = float(dropout), bool(use_bias)
        # `output_shape` would shadow Layer.output_shape(): kept under another attribute name
        if output_shape and isinstance(output_shape, (int, np.integer)):
            output_shape = [output_shape]
        self.projected_shape = tuple(int(d) for d in output_shape) if output_shape else None
        self.attention_axes = None if attention_axes is None else (
            (int(attention_axes),) if isinstance(attention_axes, (int, np.integer))
            else tuple(int(a) for a in attention_axes))
        self.sliding_window = sliding_window
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer, self.bias_regularizer = kernel_regularizer, bias_regularizer
        self.use_causal_mask, self.return_attention_scores = bool(use_causal_mask), bool(return_attention_scores)
        self.scale = 1.0 / math.sqrt(float(self.key_dim))

    @staticmethod
    def keras_call(args, kwargs):
        """Keras' call(query, value, key=None, ..., attention_mask=None, return_attention_scores=False,
        use_causal_mask=False): tensors [query, value(, key)(, attention_mask)], the two flags as layer arguments."""
        bound = dict(zip(("query", "value", "key"), args))
        bound.update({k: kwargs.pop(k) for k in ("query", "value", "key") if k in kwargs})
        tensors = [bound.get("query"), bound.get("value")]
        if bound.get("key") is not None:
            tensors.append(bound["key"])
        mask = kwargs.pop("attention_mask", None)
        if mask is not None:
            tensors += [bound["value"]] * (3 - len(tensors)) + [mask]
        flags = {k: bool(kwargs.pop(k)) for k in ("use_causal_mask", "return_attention_scores") if k in kwargs}
        return tensors, {k: v for k, v in flags.items() if v}

    # --- shapes -----------------------------------------------------------------------------------------------
    def _shapes(self, input_shape):
        """(query, value, key, attention mask or None) per-sample shapes from one shape or a list of 1-4."""
        if not isinstance(input_shape, list):
            shape = tuple(input_shape)
            return shape, shape, shape, None
        shapes = [tuple(s) for s in input_shape]
        if not 1 <= len(shapes) <= 4:
            raise ShapeError(f"MultiHeadAttention '{self.name}' takes [query], [query, value], [query, value, key] or "
                             f"[query, value, key, attention_mask]; got {len(shapes)} inputs")
        query = shapes[0]
        value = shapes[1] if len(shapes) > 1 else query
        key = shapes[2] if len(shapes) > 2 else value
        return query, value, key, shapes[3] if len(shapes) > 3 else None

    def _axes(self, query_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(batch-like, attention) per-sample axes of the query: Keras' attention_axes count the batch axis and
        default to every axis but batch and features."""
        rank = len(query_shape)
        if rank < 2:
            raise ShapeError(f"MultiHeadAttention '{self.name}' needs inputs (batch, ..., features) with at least one "
                             f"axis to attend over; got {format_shape(query_shape)}")
        if self.attention_axes is None:
            attend = tuple(range(rank - 1))
        else:
            # Keras normalises a negative axis against the projected rank: (rank + 1) + axis, batch included
            full = [a if a >= 0 else rank + 1 + a for a in self.attention_axes]
            if any(not 1 <= a <= rank - 1 for a in full):
                raise ShapeError(f"MultiHeadAttention '{self.name}': attention_axes {list(self.attention_axes)} must "
                                 f"name axes of the query {format_shape(query_shape)} other than batch and features")
            attend = tuple(sorted(a - 1 for a in full))
        return tuple(a for a in range(rank - 1) if a not in attend), attend

    def build(self, input_shape):
        query, value, key, mask = self._shapes(input_shape)
        if value[:-1] != key[:-1]:
            raise ShapeError(f"MultiHeadAttention '{self.name}': value and key must match on every axis but the last; "
                             f"got value {format_shape(value)} and key {format_shape(key)}")
        if len(value) != len(query):
            raise ShapeError(f"MultiHeadAttention '{self.name}': query {format_shape(query)} and value "
                             f"{format_shape(value)} must have the same rank")
        batch_like, attend = self._axes(query)
        if any(query[a] != value[a] for a in batch_like):
            raise ShapeError(f"MultiHeadAttention '{self.name}': query {format_shape(query)} and value "
                             f"{format_shape(value)} must match on the axes not attended over")
        self.batch_like, self.attend = batch_like, attend
        self.standard = attend == tuple(range(len(query) - 1)) and len(query) == 2  # (batch, T, features)
        t, s = int(np.prod([query[a] for a in attend])), int(np.prod([value[a] for a in attend]))
        if mask is not None and mask not in ((t, s), (1, s), (t, 1), (1, 1)):
            raise ShapeError(f"MultiHeadAttention '{self.name}': attention_mask must have shape (batch, {t}, {s}) "
                             f"(query steps, key steps); got {format_shape(mask)}")
        if (self.use_causal_mask or self.sliding_window) and not self.standard:
            raise ShapeError(f"MultiHeadAttention '{self.name}': use_causal_mask and sliding_window need inputs "
                             f"(batch, steps, features) attended over the steps; got {format_shape(query)}")
        out = self.projected_shape or (query[-1],)
        h, kd, vd = self.num_heads, self.key_dim, self.value_dim
        for part, features, dim in (("query", query[-1], kd), ("key", key[-1], kd), ("value", value[-1], vd)):
            heads = self._heads(part)
            self.add_weight(f"{part}/kernel", (features, heads, dim), self.kernel_initializer,
                            self.kernel_regularizer)
            if self.use_bias:
                self.add_weight(f"{part}/bias", (heads, dim), self.bias_initializer, self.bias_regularizer)
        self.add_weight("attention_output/kernel", (h, vd, *out), self.kernel_initializer, self.kernel_regularizer)
        if self.use_bias:
            self.add_weight("attention_output/bias", out, self.bias_initializer, self.bias_regularizer)

    def _heads(self, part: str) -> int:
        """Heads of a projection's kernel (GroupQueryAttention has fewer for key and value)."""
        return self.num_heads

    def output_shape(self, input_shape):
        query, value, _, _ = self._shapes(input_shape)
        out = query[:-1] + (self.projected_shape or (query[-1],))
        if not self.return_attention_scores:
            return out
        batch_like, attend = self._axes(query)
        # Keras' layout: (batch, <axes not attended>, heads, <query attention axes>, <key attention axes>)
        scores = (*[query[a] for a in batch_like], self.num_heads, *[query[a] for a in attend],
                  *[value[a] for a in attend])
        return [out, scores]

    def flops(self, input_shape):
        query, value, key, _ = self._shapes(input_shape)
        t, s = int(np.prod(query[:-1])), int(np.prod(value[:-1]))
        span = int(np.prod([value[a] for a in self._axes(query)[1]]))
        h, kd, vd = self.num_heads, self.key_dim, self.value_dim
        out = int(np.prod(self.projected_shape or (query[-1],)))
        projections = t * query[-1] * h * kd + s * key[-1] * h * kd + s * value[-1] * h * vd + t * h * vd * out
        return 2 * (projections + t * span * h * (kd + vd))

    def kept_size(self, input_shape):
        """The (heads, T, S) probabilities (float32) and the dropout mask (bool, a quarter of that) per sequence,
        and the projected query, key, value and context."""
        query, value, key, _ = self._shapes(input_shape)
        sequences = int(np.prod([query[a] for a in self._axes(query)[0]]))
        t, s = int(np.prod(query[:-1])) // sequences, int(np.prod(value[:-1])) // sequences
        probs = sequences * self.num_heads * t * s
        projected = sequences * self.num_heads * ((t + s) * self.key_dim + (s + t) * self.value_dim)
        return probs + (probs // 4 if self.dropout else 0) + projected

    # --- layout: any attention axes as (sequences, positions, features) ---------------------------------------
    def _order(self, ndim: int, trailing: int) -> tuple:
        """Axes of a (batch, *axes, *trailing) array with the batch-like axes first, then the attended ones."""
        axes = ndim - 1 - trailing
        return (0, *[a + 1 for a in self.batch_like], *[a + 1 for a in self.attend],
                *range(1 + axes, ndim))

    def _to_sequences(self, x, trailing: int = 1):
        """(batch, *axes, *trailing) -> (batch * batch-like sizes, attended positions, *trailing)."""
        if self.standard:
            return x
        moved = x.transpose(self._order(x.ndim, trailing))
        n = int(np.prod(moved.shape[:1 + len(self.batch_like)]))
        return moved.reshape(n, -1, *x.shape[x.ndim - trailing:])

    def _from_sequences(self, y, shape):
        """Inverse of _to_sequences: y (n, positions, *trailing) back to `shape` (batch, *axes, *trailing)."""
        if self.standard:
            return y.reshape(shape)
        order = self._order(len(shape), y.ndim - 2)
        return y.reshape([shape[a] for a in order]).transpose(np.argsort(order))

    # --- masks -----------------------------------------------------------------------------------------------
    def _keep(self, query_mask, value_mask, key_mask, attention_mask, t, s, n_batch):
        """Keras' _compute_attention_mask as a bool array broadcastable to (sequences, heads, t, s), or None."""
        keep = None

        def both(a, b):
            return b if a is None else a & b

        if query_mask is not None:
            keep = both(keep, self._flat_mask(query_mask)[:, None, :, None])
        for m in (value_mask, key_mask):
            if m is not None:
                keep = both(keep, self._flat_mask(m)[:, None, None, :])
        if self.use_causal_mask:
            keep = both(keep, causal_mask(t, s)[None, None])
        if self.sliding_window:
            keep = both(keep, sliding_window_mask(t, s, self.sliding_window)[None, None])
        if attention_mask is not None:
            am = np.asarray(attention_mask)
            am = am if am.dtype == bool else am != 0  # Keras' MHA casts the mask to bool: nonzero attends
            if am.ndim != 3 or am.shape[0] not in (1, n_batch):
                raise ShapeError(f"MultiHeadAttention '{self.name}': attention_mask must have shape (batch, {t}, {s}); "
                                 f"got {am.shape}")
            keep = both(keep, am[:, None])
        return keep

    def _flat_mask(self, mask):
        """A (batch, *axes) step mask in the (sequences, positions) layout; only (batch, steps) masks are supported
        off the standard layout (a masked axis must be the attended one)."""
        mask = np.asarray(mask, bool)
        if self.standard:
            return mask
        if mask.ndim == 2 and len(self.attend) == 1 and self.attend[0] == 0 and not self.batch_like:
            return mask
        raise ShapeError(f"MultiHeadAttention '{self.name}': a propagated mask of shape {mask.shape} cannot be applied "
                         f"with attention_axes {list(self.attention_axes or [])}")

    def compute_mask(self, x, mask):
        query_mask = mask[0] if isinstance(mask, list) else mask
        return [query_mask, None] if self.return_attention_scores else query_mask

    # --- the passes -----------------------------------------------------------------------------------------
    def _project(self, x, part):
        """x (n, positions, features) @ kernel (features, heads, dim) + bias -> (n, heads, positions, dim)."""
        kernel = self.params[f"{part}/kernel"].value
        y = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[0], -1)
        if self.use_bias:
            y += self.params[f"{part}/bias"].value.reshape(-1)
        # contiguous per head: NumPy's batched matmul on the strided view is about 10x slower (305 vs 24 ms for
        # (32, 2, 256, 32) @ (32, 2, 32, 256))
        return np.ascontiguousarray(y.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3))

    def forward(self, x, training=False):
        xs = x if isinstance(x, list) else [x]
        masks = self.input_mask if isinstance(self.input_mask, list) else [self.input_mask]
        masks = masks + [None] * (len(xs) - len(masks))
        query, value = xs[0], xs[1] if len(xs) > 1 else xs[0]
        key = xs[2] if len(xs) > 2 else value
        self.shapes, self.n_inputs = [a.shape for a in xs[:3]], len(xs)
        query_mask = masks[0]
        value_mask = masks[1] if len(xs) > 1 else masks[0]
        key_mask = masks[2] if len(xs) > 2 else None  # Keras ignores the key's mask when key is value
        self.q, self.v = self._to_sequences(query), self._to_sequences(value)
        self.k = self._to_sequences(key) if len(xs) > 2 else self.v
        self.Q = self._project(self.q, "query") * self.q.dtype.type(self.scale)  # Keras scales the query
        self.K = self._project(self.k, "key")
        self.V = self._project(self.v, "value")
        t, s = self.Q.shape[2], self.K.shape[2]
        self.keep = self._keep(query_mask, value_mask, key_mask, xs[3] if len(xs) > 3 else None, t, s,
                               query.shape[0])
        self.probs, self.dropped, attended = softmax_dropout_(self.Q @ self.K.transpose(0, 1, 3, 2), self.keep,
                                                              self.dropout if training else 0.0, self.rng)
        self.context = (attended @ self.V).transpose(0, 2, 1, 3)  # (n, t, heads, value_dim)
        kernel = self.params["attention_output/kernel"].value
        flat = self.context.reshape(-1, self.num_heads * self.value_dim)
        out = flat @ kernel.reshape(self.num_heads * self.value_dim, -1)
        if self.use_bias:
            out += self.params["attention_output/bias"].value.reshape(-1)
        out = self._from_sequences(out.reshape(self.q.shape[0], t, *kernel.shape[2:]),
                                   (*query.shape[:-1], *kernel.shape[2:]))
        if not self.return_attention_scores:
            return out
        scores = self.probs.reshape(query.shape[0], *[query.shape[a + 1] for a in self.batch_like], self.num_heads,
                                    *[query.shape[a + 1] for a in self.attend],
                                    *[value.shape[a + 1] for a in self.attend])
        return [out, scores.copy()]  # a copy: the caller may change it, and backward needs the probabilities

    def forward_cached(self, x, cache: "KeyValueCache"):
        """Causal self-attention of new positions x (batch, n, features) that follow the cache's: their keys and
        values are appended to the cache, and each attends to every cached position and the new ones up to itself,
        so a step costs one position's projections whatever the prefix (dlcli generate). Inference only; equal to
        forward on the whole sequence with use_causal_mask (tests/test_generation.py)."""
        start, n = cache.length, x.shape[1]
        query = self._project(x, "query") * x.dtype.type(self.scale)
        keys, values = cache.append(self._project(x, "key"), self._project(x, "value"))
        positions = np.arange(start, start + n)[:, None]
        keep = positions >= np.arange(start + n)[None, :]
        if self.sliding_window:
            keep &= positions - np.arange(start + n)[None, :] < self.sliding_window
        probs = masked_softmax_(query @ keys.transpose(0, 1, 3, 2), keep)
        context = (probs @ values).transpose(0, 2, 1, 3).reshape(x.shape[0] * n, -1)
        out = context @ self.params["attention_output/kernel"].value.reshape(context.shape[1], -1)
        if self.use_bias:
            out += self.params["attention_output/bias"].value.reshape(-1)
        return out.reshape(x.shape[0], n, -1)

    def _project_backward(self, grad, x, part):
        """grad (n, heads, positions, dim) of a projection of x: adds the weight gradients, returns d(x)."""
        kernel = self.params[f"{part}/kernel"]
        g = grad.transpose(0, 2, 1, 3).reshape(-1, kernel.value.shape[1] * kernel.value.shape[2])
        if kernel.grad is not None:
            kernel.grad += (x.reshape(-1, x.shape[-1]).T @ g).reshape(kernel.grad.shape)
        bias = self.params.get(f"{part}/bias")
        if bias is not None and bias.grad is not None:
            bias.grad += g.sum(0).reshape(bias.grad.shape)
        return (g @ kernel.value.reshape(kernel.value.shape[0], -1).T).reshape(x.shape)

    def backward(self, grad):
        grad_scores = None
        if self.return_attention_scores:
            grad, grad_scores = grad
        n, t = self.q.shape[0], self.Q.shape[2]
        heads, vd = self.num_heads, self.value_dim
        kernel = self.params["attention_output/kernel"]
        g_out = self._to_sequences(grad, kernel.value.ndim - 2).reshape(n * t, -1)
        flat = self.context.reshape(-1, heads * vd)
        if kernel.grad is not None:
            kernel.grad += (flat.T @ g_out).reshape(kernel.grad.shape)
        bias = self.params.get("attention_output/bias")
        if bias is not None and bias.grad is not None:
            bias.grad += g_out.sum(0).reshape(bias.grad.shape)
        d_context = np.ascontiguousarray(
            (g_out @ kernel.value.reshape(heads * vd, -1).T).reshape(n, t, heads, vd).transpose(0, 2, 1, 3))
        attended = dropped_probs(self.probs, self.dropped, self.dropout)
        d_value = attended.transpose(0, 1, 3, 2) @ d_context
        # d(probabilities) into the dropped probabilities' array, no longer needed: no second (n, heads, T, S) array
        d_probs = np.matmul(d_context, self.V.transpose(0, 1, 3, 2), out=None if attended is self.probs else attended)
        del attended
        d_scores = softmax_dropout_backward_(d_probs, self.probs, self.dropped, self.dropout,
                                             None if grad_scores is None else grad_scores.reshape(d_probs.shape))
        d_query = (d_scores @ self.K) * self.Q.dtype.type(self.scale)
        d_key = d_scores.transpose(0, 1, 3, 2) @ self.Q  # Q already carries the scale
        dq = self._project_backward(d_query, self.q, "query")
        dk = self._project_backward(d_key, self.k, "key")
        dv = self._project_backward(d_value, self.v, "value")
        if len(self.shapes) == 1:
            return self._from_sequences(dq + dk + dv, self.shapes[0])
        if len(self.shapes) == 2:
            return [self._from_sequences(dq, self.shapes[0]), self._from_sequences(dv + dk, self.shapes[1])]
        grads = [self._from_sequences(g, shape) for g, shape in zip((dq, dv, dk), self.shapes)]
        return grads + [None] * (self.n_inputs - 3)  # the attention mask gets no gradient

    # --- ONNX: the same products, masks and softmax as forward ----------------------------------------------------
    def _onnx_weights(self, part):
        return self.params[f"{part}/kernel"].value, self.params[f"{part}/bias"].value if self.use_bias else None

    def _onnx_project(self, g, x, part, perm):
        kernel, bias = self._onnx_weights(part)
        y = g.op("MatMul", [g.last(x).name, g.weight(self, kernel.reshape(kernel.shape[0], -1), f"{part}_kernel")])
        if self.use_bias:
            y = g.op("Add", [y, g.weight(self, bias.reshape(-1), f"{part}_bias")])
        return g.op("Transpose", [g.op("Reshape", [y, g.ints([0, -1, self.num_heads, kernel.shape[2]])])], perm=perm)

    def _onnx_keep(self, g, xs, masks, t, s):
        keep = None

        def both(a, b):
            return b if a is None else g.op("And", [a, b])

        if masks[0] is not None:
            keep = both(keep, g.unsqueeze(masks[0], [1, 3]))
        for m in masks[1:3]:
            if m is not None:
                keep = both(keep, g.unsqueeze(m, [1, 2]))
        if self.use_causal_mask:
            keep = both(keep, g.const(causal_mask(t, s)[None, None], f"{self.name}_causal"))
        if self.sliding_window:
            keep = both(keep, g.const(sliding_window_mask(t, s, self.sliding_window)[None, None],
                                      f"{self.name}_window"))
        if len(xs) > 3:
            am = g.last(xs[3])
            keep = both(keep, g.unsqueeze(am.name if am.dtype == "bool" else g.cast(am.name, "bool"), [1]))
        return keep

    def to_onnx(self, g, x, in_shape, mask):
        if not self.standard:
            raise ExportError(f"MultiHeadAttention '{self.name}' exports inputs (batch, steps, features) attended over "
                              f"the steps only; got attention_axes {list(self.attention_axes or [])}")
        xs = x if isinstance(x, list) else [x]
        query, value, key, _ = self._shapes(in_shape)
        if isinstance(mask, list):
            masks = [*mask, None, None, None][:3]
            masks[2] = masks[2] if len(xs) > 2 else None  # Keras ignores the key's mask when key is value
        else:
            masks = [mask, mask, None]
        q, v = xs[0], xs[1] if len(xs) > 1 else xs[0]
        k = xs[2] if len(xs) > 2 else v
        scaled = g.op("Mul", [self._onnx_project(g, q, "query", [0, 2, 1, 3]), g.scalar(self.scale)])
        scores = g.op("MatMul", [scaled, self._onnx_project(g, k, "key", [0, 2, 3, 1])])
        keep = self._onnx_keep(g, xs, masks, query[0], value[0])
        if keep is not None:
            scores = g.op("Where", [keep, scores, g.scalar(_MASKED)])
        probs = g.op("Softmax", [scores], f"{self.name}_scores", axis=-1)
        if keep is not None:
            probs = g.op("Where", [keep, probs, g.scalar(0.0)], f"{self.name}_scores")
        context = g.op("MatMul", [probs, self._onnx_project(g, v, "value", [0, 2, 1, 3])])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]),
                                   g.ints([0, -1, self.num_heads * self.value_dim])])
        kernel = self.params["attention_output/kernel"].value
        y = g.op("MatMul", [context, g.weight(self, kernel.reshape(self.num_heads * self.value_dim, -1),
                                               "attention_output_kernel")])
        if self.use_bias:
            y = g.op("Add", [y, g.weight(self, self.params["attention_output/bias"].value.reshape(-1),
                                         "attention_output_bias")])
        out = kernel.shape[2:]
        if len(out) > 1:
            y = g.op("Reshape", [y, g.ints([0, -1, *out])])
        y = g.value(y, 2 + len(out))
        return [y, g.value(probs, 4)] if self.return_attention_scores else y

    def onnx_mask(self, g, x, mask):
        return self.compute_mask(x, mask)


@register("GroupQueryAttention")
class GroupQueryAttention(MultiHeadAttention):
    """Keras 3's grouped-query attention (Ainslie et al. 2023): num_query_heads query heads share
    num_key_value_heads key/value heads, query head i reading key/value head i // (num_query_heads //
    num_key_value_heads) (Keras repeats each key/value head). Weights as Keras': query/kernel (features,
    num_query_heads, head_dim), key/kernel and value/kernel (features, num_key_value_heads, head_dim),
    attention_output/kernel (num_query_heads, head_dim, features), biases (heads, head_dim) and (features,). Inputs,
    masks and the call arguments as MultiHeadAttention's; the scores are (batch, num_query_heads, T, S)."""

    # Keras exports the class GroupedQueryAttention as GroupQueryAttention: .keras files name its weights by the class
    keras_class_name = "GroupedQueryAttention"
    keras_weight_groups = ("_query_dense/vars", "_key_dense/vars", "_value_dense/vars", "_output_dense/vars")

    def __init__(self, head_dim: Size, num_query_heads: Size, num_key_value_heads: Size, dropout: float = 0.0,
                 use_bias: bool = True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, use_causal_mask: bool = False,
                 return_attention_scores: bool = False, **kw):
        super().__init__(num_query_heads, head_dim, dropout=dropout, use_bias=use_bias,
                         kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
                         kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
                         use_causal_mask=use_causal_mask, return_attention_scores=return_attention_scores, **kw)
        if isinstance(num_key_value_heads, bool) or not isinstance(num_key_value_heads, (int, np.integer)) \
                or num_key_value_heads <= 0 or self.num_heads % num_key_value_heads:
            raise ConfigError(f"GroupQueryAttention '{self.name}': num_key_value_heads must be a positive divisor "
                              f"of num_query_heads={self.num_heads}; got {num_key_value_heads!r}")
        self.num_key_value_heads = int(num_key_value_heads)
        self.groups = self.num_heads // self.num_key_value_heads

    def build(self, input_shape):
        query, value, key, _ = self._shapes(input_shape)
        if len(query) != 2 or len(value) != 2 or query[-1] != value[-1]:  # Keras' compute_output_shape
            raise ShapeError(f"GroupQueryAttention '{self.name}' takes query (batch, T, features) and value "
                             f"(batch, S, features) with the same features; got {format_shape(input_shape)}")
        super().build(input_shape)

    def _heads(self, part):
        return self.num_heads if part == "query" else self.num_key_value_heads

    def _project(self, x, part):
        if part == "query":
            return super()._project(x, part)
        kernel = self.params[f"{part}/kernel"].value
        y = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[0], -1)
        if self.use_bias:
            y += self.params[f"{part}/bias"].value.reshape(-1)
        y = y.reshape(x.shape[0], x.shape[1], self.num_key_value_heads, -1).transpose(0, 2, 1, 3)
        return np.repeat(y, self.groups, axis=1)  # Keras' ops.repeat: each key/value head serves `groups` in a row

    def _project_backward(self, grad, x, part):
        if part != "query":  # the repeated heads' gradients add up in the head they copy
            grad = grad.reshape(grad.shape[0], self.num_key_value_heads, self.groups, *grad.shape[2:]).sum(2)
        return super()._project_backward(grad, x, part)

    def _onnx_weights(self, part):
        kernel, bias = super()._onnx_weights(part)
        if part in ("key", "value"):  # the same products as repeating the projected heads
            kernel = np.repeat(kernel, self.groups, axis=1)
            bias = None if bias is None else np.repeat(bias, self.groups, axis=0)
        return kernel, bias

    def flops(self, input_shape):
        query, value, key, _ = self._shapes(input_shape)
        full = super().flops(input_shape)
        saved = value[0] * (key[-1] + value[-1]) * (self.num_heads - self.num_key_value_heads) * self.key_dim
        return full - 2 * saved


@register("Attention")
class Attention(Layer):
    """Keras 3's Luong-style attention without projections: scores q k^T (score_mode "dot", times a learned scalar
    `scale` with use_scale) or concat_score_weight * sum(tanh(scale * (q + k))) over features ("concat"),
    softmax over the keys, output softmax @ value. Inputs [query, value] or [query, value, key] (key defaults to
    value), query (batch, T, dim) and value/key (batch, S, dim). As Keras: masked keys (the value's mask, the causal
    mask) get 1e9 subtracted from their scores (a query with no key left attends uniformly), outputs at masked
    queries are zeroed, and the output carries the query's mask. `use_causal_mask` and `return_attention_scores`
    (the softmax weights after dropout, a second output) are Keras call arguments, layer arguments here."""

    supports_masking = True

    def __init__(self, use_scale: bool = False, score_mode: str = "dot", dropout: float = 0.0,
                 use_causal_mask: bool = False, return_attention_scores: bool = False, **kw):
        super().__init__(**kw)
        if score_mode not in ("dot", "concat"):
            raise ConfigError(f"{type(self).__name__} '{self.name}': score_mode must be 'dot' or 'concat'; got "
                              f"{score_mode!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"{type(self).__name__} '{self.name}': dropout must be in [0, 1); got {dropout}")
        self.use_scale, self.score_mode, self.dropout = bool(use_scale), score_mode, float(dropout)
        self.use_causal_mask, self.return_attention_scores = bool(use_causal_mask), bool(return_attention_scores)

    @staticmethod
    def keras_call(args, kwargs):
        """Keras' call(inputs=[query, value(, key)], mask=None, training=False, return_attention_scores=False,
        use_causal_mask=False): the tensors, and the two flags as layer arguments."""
        if "inputs" in kwargs:
            args = [kwargs.pop("inputs"), *args]
        flags = {k: bool(kwargs.pop(k)) for k in ("use_causal_mask", "return_attention_scores") if k in kwargs}
        return args, {k: v for k, v in flags.items() if v}

    def _shapes(self, input_shape):
        if not isinstance(input_shape, list) or len(input_shape) not in (2, 3):
            raise ShapeError(f"{type(self).__name__} '{self.name}' takes [query, value] or [query, value, key]; got "
                             f"{format_shape(input_shape)}")
        query, value = (tuple(s) for s in input_shape[:2])
        key = tuple(input_shape[2]) if len(input_shape) > 2 else value
        if len(query) != 2 or len(value) != 2 or len(key) != 2 or key[0] != value[0] or query[-1] != key[-1]:
            raise ShapeError(f"{type(self).__name__} '{self.name}' needs query (batch, T, dim), value (batch, S, "
                             f"dim_v) and key (batch, S, dim); got {format_shape(input_shape)}")
        return query, value, key

    def build(self, input_shape):
        self._shapes(input_shape)
        if self.use_scale:
            self.add_weight("scale", (), initializers.get("ones"))
        if self.score_mode == "concat":
            self.add_weight("concat_score_weight", (), initializers.get("ones"))

    def output_shape(self, input_shape):
        query, value, _ = self._shapes(input_shape)
        out = (query[0], value[-1])
        return [out, (query[0], value[0])] if self.return_attention_scores else out

    def flops(self, input_shape):
        query, value, key = self._shapes(input_shape)
        return 2 * query[0] * value[0] * (key[-1] + value[-1])

    def kept_size(self, input_shape):
        query, value, key = self._shapes(input_shape)
        t, s = query[0], value[0]
        return t * s * (2 if self.dropout else 1) + (t * s * key[-1] if self.score_mode == "concat" else 0)

    def compute_mask(self, x, mask):
        query_mask = mask[0] if isinstance(mask, list) else None
        return [query_mask, None] if self.return_attention_scores else query_mask

    # --- scores: Keras' _calculate_scores; the backward gets d(scores) and gives d(query), d(key) ----------------
    def _scores(self, q, k):
        if self.score_mode == "dot":
            self.raw = q @ k.transpose(0, 2, 1)
            return self.raw * self.params["scale"].value if self.use_scale else self.raw.copy()
        self.summed = q[:, :, None, :] + k[:, None, :, :]  # (batch, T, S, dim), as Keras
        scale = self.params["scale"].value if self.use_scale else 1
        self.tanh = np.tanh(scale * self.summed)
        self.tanh_sum = self.tanh.sum(-1)
        return self.params["concat_score_weight"].value * self.tanh_sum

    def _scores_backward(self, d_scores, q, k):
        if self.score_mode == "dot":
            if self.use_scale:
                scale = self.params["scale"]
                if scale.grad is not None:
                    scale.grad += np.einsum("bts,bts->", d_scores, self.raw)
                d_scores = d_scores * scale.value
            return d_scores @ k, d_scores.transpose(0, 2, 1) @ q
        weight = self.params["concat_score_weight"]
        if weight.grad is not None:
            weight.grad += np.einsum("bts,bts->", d_scores, self.tanh_sum)
        d_inner = (d_scores * weight.value)[..., None] * (1 - self.tanh ** 2)
        if self.use_scale:
            scale = self.params["scale"]
            if scale.grad is not None:
                scale.grad += np.einsum("btsd,btsd->", d_inner, self.summed)
            d_inner *= scale.value
        return d_inner.sum(2), d_inner.sum(1)

    def forward(self, x, training=False):
        q, v = x[0], x[1]
        k = x[2] if len(x) > 2 else v
        self.n_inputs, self.q, self.k, self.v = len(x), q, k, v
        masks = self.input_mask if isinstance(self.input_mask, list) else [None, None]
        query_mask, value_mask = masks[0], masks[1] if len(masks) > 1 else None
        scores = self._scores(q, k)
        keep = None if value_mask is None else np.asarray(value_mask, bool)[:, None, :]
        if self.use_causal_mask:
            causal = causal_mask(q.shape[1], k.shape[1])[None]
            keep = causal if keep is None else keep & causal
        if keep is not None:  # Keras subtracts 1e9 where masked (not -inf): a row with no key left is uniform
            scores -= scores.dtype.type(1e9) * ~keep
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        self.weights_ = scores
        self.dropped = None
        attended = scores
        if training and self.dropout > 0:
            self.dropped = self.rng.random(scores.shape, dtype=np.float32) < self.dropout
            attended = np.where(self.dropped, 0, scores / scores.dtype.type(1 - self.dropout))
        out = attended @ v
        self.query_keep = None
        if query_mask is not None:
            self.query_keep = np.asarray(query_mask, bool)[..., None]
            out *= self.query_keep
        # Keras returns the weights after dropout (its _apply_scores reassigns them)
        return [out, np.array(attended)] if self.return_attention_scores else out

    def backward(self, grad):
        grad_scores = None
        if self.return_attention_scores:
            grad, grad_scores = grad
        if self.query_keep is not None:
            grad = grad * self.query_keep
        scale = self.weights_.dtype.type(1 / (1 - self.dropout))
        attended = self.weights_ if self.dropped is None else np.where(self.dropped, 0, self.weights_ * scale)
        d_value = attended.transpose(0, 2, 1) @ grad
        d_weights = grad @ self.v.transpose(0, 2, 1)
        if grad_scores is not None:
            d_weights += grad_scores
        if self.dropped is not None:
            np.copyto(d_weights, 0, where=self.dropped)
            d_weights *= scale
        d_scores = softmax_backward_(d_weights, self.weights_)
        d_query, d_key = self._scores_backward(d_scores, self.q, self.k)
        return [d_query, d_value, d_key] if self.n_inputs > 2 else [d_query, d_value + d_key]

    # --- ONNX: the same scores, masks and softmax --------------------------------------------------------------
    def _onnx_scores(self, g, q, k):
        if self.score_mode == "dot":
            scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])
            return g.op("Mul", [scores, g.weight(self, self.params["scale"].value, "scale")]) if self.use_scale \
                else scores
        summed = g.op("Add", [g.unsqueeze(q, [2]), g.unsqueeze(k, [1])])
        if self.use_scale:
            summed = g.op("Mul", [summed, g.weight(self, self.params["scale"].value, "scale")])
        total = g.reduce("ReduceSum", g.op("Tanh", [summed]), [-1], keepdims=0)
        return g.op("Mul", [total, g.weight(self, self.params["concat_score_weight"].value, "concat_score_weight")])

    def to_onnx(self, g, x, in_shape, mask):
        xs = [g.last(v) for v in x]
        query, value, _ = self._shapes(in_shape)
        masks = mask if isinstance(mask, list) else [None, None]
        q, v = xs[0].name, xs[1].name
        k = xs[2].name if len(xs) > 2 else v
        scores = self._onnx_scores(g, q, k)
        keep = None
        if len(masks) > 1 and masks[1] is not None:
            keep = g.unsqueeze(masks[1], [1])
        if self.use_causal_mask:
            causal = g.const(causal_mask(query[0], value[0])[None], f"{self.name}_causal")
            keep = causal if keep is None else g.op("And", [keep, causal])
        if keep is not None:
            penalty = g.op("Mul", [g.cast(g.op("Not", [keep]), "float32"), g.scalar(1e9)])
            scores = g.op("Sub", [scores, penalty])
        weights = g.op("Softmax", [scores], f"{self.name}_scores", axis=-1)
        out = g.op("MatMul", [weights, v])
        if masks[0] is not None:
            out = g.op("Mul", [out, g.unsqueeze(g.cast(masks[0], "float32"), [2])])
        out = g.value(out, 3)
        return [out, g.value(weights, 3)] if self.return_attention_scores else out

    def onnx_mask(self, g, x, mask):
        return self.compute_mask(x, mask)


@register("AdditiveAttention")
class AdditiveAttention(Attention):
    """Keras 3's Bahdanau-style attention: scores sum(scale * tanh(q + k)) over features, `scale` a learned
    (dim,) vector with use_scale (glorot_uniform, as Keras), else 1; the rest is Attention's."""

    def __init__(self, use_scale: bool = True, dropout: float = 0.0, use_causal_mask: bool = False,
                 return_attention_scores: bool = False, **kw):
        super().__init__(use_scale=use_scale, score_mode="concat", dropout=dropout, use_causal_mask=use_causal_mask,
                         return_attention_scores=return_attention_scores, **kw)

    def build(self, input_shape):
        query, _, _ = self._shapes(input_shape)
        if self.use_scale:
            self.add_weight("scale", (query[-1],), initializers.get("glorot_uniform"))

    def _scores(self, q, k):
        self.summed = q[:, :, None, :] + k[:, None, :, :]
        self.tanh = np.tanh(self.summed)
        return (self.tanh * self.params["scale"].value).sum(-1) if self.use_scale else self.tanh.sum(-1)

    def _scores_backward(self, d_scores, q, k):
        if self.use_scale:
            scale = self.params["scale"]
            if scale.grad is not None:
                scale.grad += np.einsum("bts,btsd->d", d_scores, self.tanh)
            d_inner = d_scores[..., None] * scale.value * (1 - self.tanh ** 2)
        else:
            d_inner = d_scores[..., None] * (1 - self.tanh ** 2)
        return d_inner.sum(2), d_inner.sum(1)

    def _onnx_scores(self, g, q, k):
        tanh = g.op("Tanh", [g.op("Add", [g.unsqueeze(q, [2]), g.unsqueeze(k, [1])])])
        if self.use_scale:
            tanh = g.op("Mul", [tanh, g.weight(self, self.params["scale"].value, "scale")])
        return g.reduce("ReduceSum", tanh, [-1], keepdims=0)
