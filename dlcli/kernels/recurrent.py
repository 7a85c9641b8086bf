"""The LSTM's and GRU's backward time loops, one compiled call per step between the step's BLAS product: the gate
gradients of a step in one fused pass where the NumPy twins (layers/recurrent_cells.lstm_backward and
_gru_backward_after) precompute the factors for all steps and make 5-8 calls of 1-3 us per step. LSTM(32), 100 steps, batch 64, backward per call (CPU
time of the thread, best of 40 alternating, AMD EPYC at load 22-25): 2.7-2.9 ms against the twin's 7.1-8.2.

Measured and not kept (the forward scan stays the twin): the forward step fused the same way (with its own float32
exp and tanh, since numba has no vectorised exp without SVML and libm's scalar call is 4x NumPy's SIMD) came out
even with the twin, 4.4-4.8 against 3.8-4.8 ms; the whole loop in one call with the step GEMM written out (4 rows
per sweep) lost to one-thread OpenBLAS through np.matmul, 12-13 against 6 us a step ((128, 32) @ (32, 64)), so the
GEMMs stay np.matmul between the calls (numba's own np.dot would need scipy).
"""
import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def lstm_backward_step(t, A, TC, dY, dh, dc, carry, kept, dZ):
    """Step t of the twin's loop, gates in the internal order o, i, f, g: A (T + 1, 5u, B) the forward's
    activations and c_{t-1}, TC (T, u, B) tanh(c_t), dY (T, u, B) every step's output gradient or empty. On entry
    dh holds UzT @ dZ[:, t + 1] (the caller's BLAS product) and carry what a masked step t + 1 passed through;
    adds dY[t], writes dZ[:, t] (dZ (4u, T, B)) and updates dc and carry in place. As the twin, a masked step
    (kept[t, b], factor m = 0) has dZ = 0 and passes dh and dc through unchanged."""
    T, u, B = TC.shape
    one = A.dtype.type(1)
    a, tc = A[t], TC[t]
    masked = kept.size > 0
    if masked:
        for r in range(u):
            for j in range(B):
                dh[r, j] += carry[r, j]
    if dY.size > 0:
        for r in range(u):
            for j in range(B):
                dh[r, j] += dY[t, r, j]
    m = np.ones(B, A.dtype)
    if masked:
        for j in range(B):
            if kept[t, j]:
                m[j] = 0
        for r in range(u):
            for j in range(B):
                carry[r, j] = dh[r, j] * (one - m[j])
    for r in range(u):
        for j in range(B):
            o, i, f, g = a[r, j], a[u + r, j], a[2 * u + r, j], a[3 * u + r, j]
            y, h = tc[r, j], dh[r, j]
            c = dc[r, j] + h * (o * (one - y * y)) * m[j]
            dZ[r, t, j] = h * y * (o * (one - o)) * m[j]
            cm = c * m[j]
            dZ[u + r, t, j] = cm * g * (i * (one - i))
            dZ[2 * u + r, t, j] = cm * a[4 * u + r, j] * (f * (one - f))
            dZ[3 * u + r, t, j] = cm * i * (one - g * g)
            dc[r, j] = c * (f * m[j] + (one - m[j]))


@numba.njit(**JIT)
def gru_backward_step(t, H, A, inner, dY, dh, carry, kept, dXP, dInner):
    """Step t of the twin's reset_after loop (layers/recurrent_cells._gru_backward_after), Keras' gate order z, r,
    h: H (T + 1, B, u) the states, A (T, B, 3u) the activations z, r, hh, inner (T, B, 3u) h @ U + rb, dY
    (T, B, u) every step's output gradient or empty. On entry dh holds dInner[t + 1] @ U.T (the caller's BLAS
    product) and carry the gradient step t + 1 passed straight to h_t; adds both and dY[t], writes dXP[t] (d z,
    d r, d hh pre-activations) and dInner[t] (d z, d r, d inner_h) and the new carry. As the twin, a masked step
    (factor m = 0) has zero gate gradients and passes dh through unchanged."""
    B, u = dh.shape
    one = A.dtype.type(1)
    masked = kept.size > 0
    for b in range(B):
        for r in range(u):
            dh[b, r] += carry[b, r]
    if dY.size > 0:
        for b in range(B):
            for r in range(u):
                dh[b, r] += dY[t, b, r]
    for b in range(B):
        m = one
        if masked and kept[t, b]:
            m = A.dtype.type(0)
        for r in range(u):
            z, rr, hh, g = A[t, b, r], A[t, b, u + r], A[t, b, 2 * u + r], dh[b, r]
            d_hh = g * ((one - z) * (one - hh * hh)) * m
            d_z = g * ((H[t, b, r] - hh) * (z * (one - z))) * m
            d_r = d_hh * (inner[t, b, 2 * u + r] * (rr * (one - rr)))
            dXP[t, b, r] = d_z
            dXP[t, b, u + r] = d_r
            dXP[t, b, 2 * u + r] = d_hh
            dInner[t, b, r] = d_z
            dInner[t, b, u + r] = d_r
            dInner[t, b, 2 * u + r] = d_hh * rr
            carry[b, r] = g * (z * m + (one - m))
