"""Attention kernels. dlcli generate's one-position step (NumPy twins in dlcli/generation.py): the cached
self-attention of one new query per sequence, and a residual sum with its layer normalisation; at batch 1 each NumPy
call costs more in dispatch than in arithmetic (a step of imdb_gpt.yaml's network made ~30 of them per block), here
each is one call. MultiHeadAttention's training passes (NumPy twins in dlcli/layers/attention.py): the masked
softmax with dropout and its backward, fused over the (batch, heads, T, S) rows. Sums run reassociated (fastmath
reassoc, so they vectorise): equal to the twins within float32 rounding, not bit for bit; the dropout masks are.
"""
import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(fastmath={"reassoc", "contract"}, **JIT)
def attend_one_query(qkv, keys, values, position, first, context):
    """qkv (batch, heads * (2 key_dim + value_dim)): each sequence's new query (already scaled), key and value,
    heads in a row. The key and value go to row `position` of the cache keys (batch, heads, capacity, key_dim) and
    values (batch, heads, capacity, value_dim); the query attends to rows first..position (a softmax over its dot
    products with their keys); context (batch, heads * value_dim) gets the probability-weighted values."""
    batch, heads, _, key_dim = keys.shape
    value_dim = values.shape[3]
    span = position + 1 - first
    scores = np.empty(span, np.float32)
    q = np.empty(key_dim, np.float32)
    acc = np.empty(value_dim, np.float32)
    for b in range(batch):
        for h in range(heads):
            kh, vh = keys[b, h], values[b, h]  # (capacity, dim), contiguous
            offset_k, offset_v = (heads + h) * key_dim, 2 * heads * key_dim + h * value_dim
            for d in range(key_dim):
                q[d] = qkv[b, h * key_dim + d]
                kh[position, d] = qkv[b, offset_k + d]
            for d in range(value_dim):
                vh[position, d] = qkv[b, offset_v + d]
            top = np.float32(-np.inf)
            for j in range(span):
                row = kh[first + j]
                s = np.float32(0)
                for d in range(key_dim):
                    s += q[d] * row[d]
                scores[j] = s
                top = max(top, s)
            total = np.float32(0)
            for j in range(span):
                e = np.exp(scores[j] - top)
                scores[j] = e
                total += e
            acc[:] = 0
            for j in range(span):
                p = scores[j] / total
                row = vh[first + j]
                for d in range(value_dim):
                    acc[d] += p * row[d]
            for d in range(value_dim):
                context[b, h * value_dim + d] = acc[d]


@numba.njit(**JIT)
def add_layer_norm(x, residual, gamma, beta, epsilon, summed, out):
    """summed = x + residual (x alone when residual is empty), out = its layer normalisation over the last axis,
    (summed - mean) / sqrt(variance + epsilon) * gamma + beta, rows (n, features)."""
    rows, features = x.shape
    add = residual.size > 0
    for i in range(rows):
        total = 0.0
        for k in range(features):
            s = x[i, k] + residual[i, k] if add else x[i, k]
            summed[i, k] = s
            total += s
        mean = total / features
        total = 0.0
        for k in range(features):
            d = summed[i, k] - mean
            total += d * d
        inv_std = 1 / np.sqrt(np.float32(total / features) + epsilon)
        for k in range(features):
            out[i, k] = (summed[i, k] - mean) * inv_std * gamma[k] + beta[k]


# --- MultiHeadAttention's training passes over the (batch, heads, T, S) scores (twins in layers/attention.py) -------
# The exponentials stay NumPy's (SIMD: 4 ms where a compiled scalar loop takes 60 at 32x4x256x256); these kernels
# fuse what surrounds them, each one pass over the rows instead of NumPy's three to six with their temporaries.

@numba.njit(**JIT)
def mask_and_shift(scores, keep):
    """Scores where `keep` (a bool array broadcast to their shape) is False become -1e9 (Keras' Softmax mask), then
    each row has its maximum subtracted, in place: what np.exp needs next."""
    n, heads, t, s = scores.shape
    masked = np.float32(-1e9)
    for a in range(n):
        for h in range(heads):
            for i in range(t):
                row, allowed = scores[a, h, i], keep[a, h, i]
                top = -np.inf
                for j in range(s):
                    if not allowed[j]:
                        row[j] = masked
                    top = max(top, row[j])
                for j in range(s):
                    row[j] -= top


@numba.njit(fastmath={"reassoc", "contract"}, **JIT)
def normalise_and_drop(exps, keep, rng, rate, dropped, attended):
    """exps (after mask_and_shift and np.exp) become the probabilities, in place: each row over its sum, 0 where
    `keep` is False. With rate > 0 each probability is dropped when rng.random(dtype=float32) < rate, drawn in C order
    as NumPy's rng.random(shape, dtype=float32) < rate draws them (the same mask from the same generator): the mask
    into `dropped`, the kept probabilities scaled by 1 / (1 - rate) and the dropped ones 0 into `attended`."""
    n, heads, t, s = exps.shape
    scale = exps.dtype.type(1 / (1 - rate))
    zero = exps.dtype.type(0)
    for a in range(n):
        for h in range(heads):
            for i in range(t):
                row, allowed = exps[a, h, i], keep[a, h, i]
                total = zero
                for j in range(s):
                    total += row[j]
                inverse = exps.dtype.type(1) / total
                for j in range(s):
                    row[j] = row[j] * inverse if allowed[j] else zero
                if rate > 0:
                    drop, out = dropped[a, h, i], attended[a, h, i]
                    for j in range(s):
                        d = rng.random(dtype=np.float32) < rate
                        drop[j] = d
                        out[j] = zero if d else row[j] * scale


@numba.njit(**JIT)
def apply_dropout(probs, dropped, scale, out):
    """out = 0 where dropped, else probs * scale (the probabilities after dropout, again for the backward pass)."""
    n, heads, t, s = probs.shape
    zero = probs.dtype.type(0)
    for a in range(n):
        for h in range(heads):
            for i in range(t):
                p, drop, o = probs[a, h, i], dropped[a, h, i], out[a, h, i]
                for j in range(s):
                    o[j] = zero if drop[j] else p[j] * scale


@numba.njit(fastmath={"reassoc", "contract"}, **JIT)
def softmax_dropout_backward(grad, probs, dropped, scale, extra):
    """grad, d(loss)/d(probabilities after dropout), becomes d(loss)/d(scores) in place: 0 where dropped, else times
    `scale`, plus `extra` (the gradient of the returned scores, empty for none); then p * (g - sum(g * p)) per row.
    An empty `dropped` is no dropout."""
    n, heads, t, s = grad.shape
    drop, add = dropped.size > 0, extra.size > 0
    zero = grad.dtype.type(0)
    for a in range(n):
        for h in range(heads):
            for i in range(t):
                g, p = grad[a, h, i], probs[a, h, i]
                if drop:
                    d = dropped[a, h, i]
                    for j in range(s):
                        g[j] = zero if d[j] else g[j] * scale
                if add:
                    e = extra[a, h, i]
                    for j in range(s):
                        g[j] += e[j]
                total = zero
                for j in range(s):
                    total += g[j] * p[j]
                for j in range(s):
                    g[j] = p[j] * (g[j] - total)
