"""The time loops of the LSTM and GRU (Keras' default activations, no recurrent dropout) as one compiled call per
direction: each step's GEMM is a direct call of the OpenBLAS NumPy links (cblas_sgemm/dgemm, found by
engine/blas.gemm_address and called through kernels/gemm.matmul), the gate math of a step a few fused passes.
The NumPy twins (layers/recurrent_cells: lstm_forward, lstm_backward, gru_forward, _gru_backward_after) make 6-12
ufunc calls and an np.matmul per step, each 1-5 us of dispatch for ~2,000 elements. Thread CPU per call, the bench's
shapes (100 steps, batch 64, units 32), AMD EPYC shared by 6 jobs (load 5-9): GRU forward 4.5 -> 1.0 ms, GRU
backward (which compiled only each step's gate gradients before) 2.1 -> 0.8, LSTM forward 2.9 -> 1.6.

float32 gates use `_tanh32`, a rational approximation (Eigen's, which XLA's CPU backend uses too; at most 6 ulp
from the correctly rounded tanh over [-12, 12] and down to 1e-8), because numba has no vectorised tanh or exp
without SVML and libm's scalar call is 4x NumPy's SIMD; float64 keeps np.tanh and exp, so a float64 gradient
check sees the exact functions. A sigmoid is 0.5 tanh(z / 2) + 0.5 in float32, 1 / (1 + exp(-z)) in float64.

LLVM vectorises a pass of one operation over few arrays indexed from 0; a loop computing a whole step's gates, or one
indexing a flat array at an offset, stayed scalar (4-5x slower), hence the passes and views below.
"""
import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from dlcli.kernels.gemm import AVX512, block_gemm, matmul

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def gru_backward_step(t, H, A, inner, dY, dh, carry, kept, dXP, dInner):
    """Step t of the twin's reset_after loop (layers/recurrent_cells._gru_backward_after), Keras' gate order z, r,
    h: H (T + 1, B, u) the states, A (T, B, 3u) the activations z, r, hh, inner (T, B, 3u) h @ U + rb, dY
    (T, B, u) every step's output gradient or empty. On entry dh holds dInner[t + 1] @ U.T (the caller's BLAS
    product) and carry the gradient step t + 1 passed straight to h_t; adds both and dY[t], writes dXP[t] (d z,
    d r, d hh pre-activations) and dInner[t] (d z, d r, d inner_h) and the new carry. As the twin, a masked step
    (factor m = 0) has zero gate gradients and passes dh through unchanged. Each row is a few short passes over
    few arrays (see gru_forward)."""
    B, u = dh.shape
    one = A.dtype.type(1)
    masked, has_dy = kept.size > 0, dY.size > 0
    for b in range(B):
        g_row, c_row, a, h_prev = dh[b], carry[b], A[t, b], H[t, b]
        dx, di, n = dXP[t, b], dInner[t, b], inner[t, b]
        for r in range(u):
            g_row[r] += c_row[r]
        if has_dy:
            y = dY[t, b]
            for r in range(u):
                g_row[r] += y[r]
        m = A.dtype.type(0) if masked and kept[t, b] else one
        for r in range(u):
            z, hh = a[r], a[2 * u + r]
            dx[2 * u + r] = g_row[r] * ((one - z) * (one - hh * hh)) * m
        for r in range(u):
            z, hh = a[r], a[2 * u + r]
            dx[r] = g_row[r] * ((h_prev[r] - hh) * (z * (one - z))) * m
        for r in range(u):
            z = a[r]
            c_row[r] = g_row[r] * (z * m + (one - m))
        for r in range(u):
            rr, d_hh = a[u + r], dx[2 * u + r]
            dx[u + r] = d_hh * (n[2 * u + r] * (rr * (one - rr)))
        for r in range(u):
            di[2 * u + r] = dx[2 * u + r] * a[u + r]
        for r in range(2 * u):
            di[r] = dx[r]


# --- gate functions: fast float32, exact float64 ----------------------------------------------------------------
def _tanh(x):
    return np.tanh(x)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


@numba.njit(**JIT)
def _tanh32(x):
    """Eigen's rational tanh for float32 (generic_fast_tanh_float): x clamped to +-7.9053, p(x) / q(x^2)."""
    c = np.float32(7.90531110763549805)
    x = min(max(x, -c), c)
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    p = p * x
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x if abs(x) < np.float32(0.0004) else p / q


@overload(_tanh, jit_options=JIT)
def _tanh_impl(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: np.tanh(x)


@overload(_sigmoid, jit_options=JIT)
def _sigmoid_impl(x):
    if x == types.float32:
        return lambda x: np.float32(0.5) * _tanh32(np.float32(0.5) * x) + np.float32(0.5)
    return lambda x: 1 / (1 + np.exp(-x))


# --- whole loops --------------------------------------------------------------------------------------------------
@numba.njit(**JIT)
def gru_forward(blas, xp, U, rb, kept, H, A, inner):
    """layers/recurrent_cells.gru_forward for reset_after with tanh and sigmoid in its tanh form: xp (T, B, 3u) the
    input projections with the z, r columns halved, U (u, 3u) and rb (3u,) likewise. Fills H (T + 1, B, u) from
    h_0 = H[0], A (T, B, 3u) with z, r, hh and inner (T, B, 3u) with h @ U + rb, as the twin; a masked step
    (kept[t, b]) keeps the previous state. Each row is a few passes of one operation over few arrays: LLVM
    vectorises those, where one loop computing a whole row stayed scalar (GRU(32), batch 64, 100 steps: 0.9 against
    4.5 ms a call)."""
    T, B, G = xp.shape
    u = G // 3
    half = xp.dtype.type(0.5)
    masked = kept.size > 0
    for t in range(T):
        n = inner[t]
        matmul(blas, H[t], U, n, 0.0)
        for b in range(B):
            nb, xb, ab, hp, hn = n[b], xp[t, b], A[t, b], H[t, b], H[t + 1, b]
            for r in range(G):
                nb[r] += rb[r]
            for r in range(2 * u):
                ab[r] = _tanh(xb[r] + nb[r]) * half + half
            for r in range(u):
                ab[2 * u + r] = _tanh(ab[u + r] * nb[2 * u + r] + xb[2 * u + r])
            if masked and kept[t, b]:
                hn[:] = hp
                continue
            for r in range(u):
                hh = ab[2 * u + r]
                hn[r] = hh + (hp[r] - hh) * ab[r]


@numba.njit(**JIT)
def gru_backward(blas, H, A, inner, UT, dY, dh, kept, dXP, dInner):
    """_gru_backward_after's loop: gru_backward_step per step, then dh = dInner[t] @ U.T through BLAS (UT
    contiguous (3u, u)); the step-0 product, the gradient of h_0, is never read. dh is updated in place."""
    T = A.shape[0]
    carry = np.zeros_like(dh)
    for t in range(T - 1, -1, -1):
        gru_backward_step(t, H, A, inner, dY, dh, carry, kept, dXP, dInner)
        if t:
            matmul(blas, dInner[t], UT, dh, 0.0)


@numba.njit(**JIT)
def lstm_forward(blas, S, Wz, kept, A, TC):
    """layers/recurrent_cells.lstm_forward for tanh and sigmoid gates: S (T + 1, K, B) with S[0, :u] = h_0, Wz
    (4u, K) in the internal gate order o, i, f, g; fills S[1:, :u] with h_1..h_T, A (T + 1, 5u, B) with the
    activations and c_{t-1} (A[0, 4u:] = c_0 on entry) and TC (T, u, B) with tanh(c_t); a masked step keeps h and
    c. A step's gate blocks are contiguous (u * B each), so each pass is one long loop (see gru_forward)."""
    T, B = S.shape[0] - 1, S.shape[2]
    u = Wz.shape[0] // 4
    n = u * B
    masked = kept.size > 0
    for t in range(T):
        a = A[t]
        matmul(blas, Wz, S[t], a[:4 * u], 0.0)
        # each gate block as its own flat view, indexed from 0: offsets into one view (af[n + k]) left those loops
        # scalar (1.1 against 0.4 ms for the gate passes of the bench's LSTM(32))
        sig, g = a[:3 * u].reshape(3 * n), a[3 * u:4 * u].reshape(n)
        for k in range(3 * n):
            sig[k] = _sigmoid(sig[k])
        for k in range(n):
            g[k] = _tanh(g[k])
        i, f, c_prev = a[u:2 * u].reshape(n), a[2 * u:3 * u].reshape(n), a[4 * u:].reshape(n)
        c, tc = A[t + 1, 4 * u:].reshape(n), TC[t].reshape(n)
        for k in range(n):
            c[k] = i[k] * g[k] + f[k] * c_prev[k]
        for k in range(n):
            tc[k] = _tanh(c[k])
        o, h = a[:u].reshape(n), S[t + 1, :u].reshape(n)
        for k in range(n):
            h[k] = o[k] * tc[k]
        if masked:
            for r in range(u):
                for j in range(B):
                    if kept[t, j]:
                        S[t + 1, r, j] = S[t, r, j]
                        A[t + 1, 4 * u + r, j] = a[4 * u + r, j]


@numba.njit(**JIT)
def lstm_backward(blas, A, TC, S, UzT, Wx, dY, dh, dc, kept, dW, dX, bias):
    """The twin's loop (layers/recurrent_cells.lstm_backward) with the weight and input gradients taken step by step:
    gates in the internal order o, i, f, g, A (T + 1, 5u, B) the forward's activations and c_{t-1}, TC (T, u, B)
    tanh(c_t), S (T + 1, K, B) the steps' inputs s_t, dY (T, u, B) every step's output gradient or empty, dh and
    dc (u, B) the final states' gradients (updated in place). Step t's gate gradients dz (4u, B) stay in one small
    buffer: dW (4u, K) += dz @ s_t.T unless dW is empty, the input's gradient dX[:, t] (B, F) = dz.T @ Wx (Wx the
    (4u, F) input columns of Wz) unless dX (B, T, F) is empty, and dh = UzT @ dz between steps, each through
    gemm.matmul (the step-0 product, the gradient of h_0, is never read). The
    whole (4u, T, B) gradient written column by column (rows T * B apart, each step a cache line per row, read
    once more by one weight-gradient GEMM after the loop) cost 0.5 ms more per call on cold caches at the
    bench's LSTM(32), part of 32 samples. `bias`: S's last row is ones (Wz's bias column), whose gradient is then
    summed per sample across the steps and over the samples after the loop, dW's product taking the other K - 1
    columns: 2.9 against 3.4 us a step at the bench's part ((128, 32) @ (32, 64) against (32, 65), gemm.block_gemm's
    65th column a block of its own). As the twin, a masked step (kept[t, b], factor m = 0) has dz = 0 and passes
    dh and dc through unchanged."""
    T, u, B = TC.shape
    n = u * B
    one = A.dtype.type(1)
    masked, has_dy = kept.size > 0, dY.size > 0
    carry = np.zeros_like(dh)
    m, keep = np.ones(n, A.dtype), np.zeros(n, A.dtype)  # each state element's factor, (u, B) flat
    dZ = np.empty((4 * u, B), A.dtype)
    K = S.shape[1] - 1 if bias else S.shape[1]  # the rows of s_t dW's product takes
    sT = np.empty((B, K), A.dtype)  # s_t transposed, for dW's product
    dZT = np.empty((0 if AVX512 else B, 4 * u), A.dtype)  # dz transposed, for dX's product through BLAS
    dB = np.zeros((4 * u, B), A.dtype)  # the bias gradient per sample
    # every (u, B) block as its own flat view, indexed from 0 (see lstm_forward): passes of u * B where a pass per
    # row of B took 2x longer
    h, c, cr = dh.reshape(n), dc.reshape(n), carry.reshape(n)
    dz_o, dz_i, dz_f, dz_g = dZ[:u].reshape(n), dZ[u:2 * u].reshape(n), dZ[2 * u:3 * u].reshape(n), \
        dZ[3 * u:].reshape(n)
    for t in range(T - 1, -1, -1):
        a = A[t]
        o, i, f, g = a[:u].reshape(n), a[u:2 * u].reshape(n), a[2 * u:3 * u].reshape(n), a[3 * u:4 * u].reshape(n)
        cp, y = a[4 * u:].reshape(n), TC[t].reshape(n)
        if masked:
            for r in range(u):
                for j in range(B):
                    m[r * B + j] = A.dtype.type(0) if kept[t, j] else one
            for k in range(n):
                keep[k] = one - m[k]
        if has_dy:
            dy = dY[t].reshape(n)
            for k in range(n):
                h[k] += dy[k]
        if masked:  # what a masked step passes straight to h_{t-1}
            for k in range(n):
                cr[k] = h[k] * keep[k]
        for k in range(n):
            c[k] = c[k] + h[k] * (o[k] * (one - y[k] * y[k])) * m[k]
        for k in range(n):
            dz_o[k] = h[k] * y[k] * (o[k] * (one - o[k])) * m[k]
        for k in range(n):
            dz_i[k] = c[k] * m[k] * g[k] * (i[k] * (one - i[k]))
        for k in range(n):
            dz_f[k] = c[k] * m[k] * cp[k] * (f[k] * (one - f[k]))
        for k in range(n):
            dz_g[k] = c[k] * m[k] * i[k] * (one - g[k] * g[k])
        for k in range(n):
            c[k] = c[k] * (f[k] * m[k] + keep[k])
        if dW.size > 0:  # dz @ s_t.T as NN on a transposed copy: 5.9 us a step with the copy, NT 7.2 (OpenBLAS)
            s = S[t]
            for j in range(B):  # strided reads, contiguous writes: 16 against 26 us for 100 (32, 32) transposes
                row = sT[j]
                for k in range(K):
                    row[k] = s[k, j]
            matmul(blas, dZ, sT, dW[:, :K], 1.0)
            if bias:
                for r in range(4 * u):
                    z, d = dZ[r], dB[r]
                    for j in range(B):
                        d[j] += z[j]
        if dX.size > 0:  # batch-major, as the layer returns it: (T, F, B) blocks took 3.6 ms to transpose after
            if AVX512:  # imdb_lstm's backward (4 parts of 32 x 200 steps x 32 features); the product reads dz.T
                block_gemm(dZ.T, Wx, dX[:, t], 0.0)
            else:  # BLAS takes row-major operands: dz.T copied
                for j in range(B):
                    row = dZT[j]
                    for r in range(4 * u):
                        row[r] = dZ[r, j]
                matmul(blas, dZT, Wx, dX[:, t], 0.0)
        if t:
            matmul(blas, UzT, dZ, dh, 0.0)
            if masked:
                for k in range(n):
                    h[k] += cr[k]
    if bias and dW.size > 0:
        for r in range(4 * u):
            dW[r, K] += dB[r].sum()


@numba.njit(**JIT)
def simple_forward(blas, xp, U, kept, H):
    """layers/recurrent_cells.simple_forward with tanh: xp (T, B, u) the input projections, U (u, u); fills H
    (T + 1, B, u) from h_0 = H[0]; a masked step (kept[t, b]) keeps the previous state."""
    T, B, u = xp.shape
    masked = kept.size > 0
    for t in range(T):
        matmul(blas, H[t], U, H[t + 1], 0.0)
        for b in range(B):
            hn, xb = H[t + 1, b], xp[t, b]
            if masked and kept[t, b]:
                hn[:] = H[t, b]
                continue
            for r in range(u):
                hn[r] = _tanh(hn[r] + xb[r])


@numba.njit(**JIT)
def simple_backward(blas, H, UT, dY, dh, kept, dXP):
    """simple_backward's loop with tanh: dY (T, B, u) every step's output gradient or empty, dh (B, u) the final
    state's (updated in place); writes dXP (T, B, u), and between steps dh = dXP[t] @ U.T through BLAS plus what a
    masked step passes straight to h_{t-1} (the step-0 product, the gradient of h_0, is never read)."""
    T, B, u = dXP.shape
    one = H.dtype.type(1)
    masked, has_dy = kept.size > 0, dY.size > 0
    carry = np.zeros_like(dh)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            g, d, y = dh[b], dXP[t, b], H[t + 1, b]
            if has_dy:
                yb = dY[t, b]
                for r in range(u):
                    g[r] += yb[r]
            kept_b = masked and kept[t, b]
            m = H.dtype.type(0) if kept_b else one
            for r in range(u):
                d[r] = g[r] * ((one - y[r] * y[r]) * m)
            if masked:
                c = carry[b]
                for r in range(u):
                    c[r] = g[r] * (one - m)
        if t:
            matmul(blas, dXP[t], UT, dh, 0.0)
            if masked:
                for b in range(B):
                    g, c = dh[b], carry[b]
                    for r in range(u):
                        g[r] += c[r]
