"""dlcli generate's one-position step (dlcli/generation.py holds the NumPy twins): the cached self-attention of one
new query per sequence, and a residual sum with its layer normalisation. At batch 1 each NumPy call costs more in
dispatch than in arithmetic (a step of imdb_gpt.yaml's network made ~30 of them per block); here each is one call.
The dot products run with reassociated float sums (fastmath reassoc, so they vectorise): equal to the twins within
float32 rounding, not bit for bit.
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
