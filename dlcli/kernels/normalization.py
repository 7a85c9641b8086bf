"""BatchNormalization's training passes over channels-last rows (every axis but the last reduced), each over a range
of rows so the lanes (engine/lanes.py) share them: the forward pass in three passes over the data (sums; centring
with the sum of squares; normalising with the affine transform), the backward in two (the two channel sums; the
input gradient), where the NumPy twins (layers/normalization.py) make about seven and six. Each range's sums come
back on their own and the layer adds them in range order, so the lanes never change a bit. The channel loop is
innermost and contiguous, so it vectorises; the sums accumulate in float64, so they agree with the twins' float32
BLAS sums to float32 rounding (not bit for bit: the order differs).
"""
import numba

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def channel_sums(x, acc):
    """acc (C,) float64 = the column sums of x (rows, C)."""
    rows, c = x.shape
    for k in range(c):
        acc[k] = 0.0
    for r in range(rows):
        for k in range(c):
            acc[k] += x[r, k]


@numba.njit(**JIT)
def centre(x, mean, xhat, acc):
    """xhat = x - mean; acc (C,) float64 = the column sums of its squares."""
    rows, c = x.shape
    for k in range(c):
        acc[k] = 0.0
    for r in range(rows):
        for k in range(c):
            d = x[r, k] - mean[k]
            xhat[r, k] = d
            acc[k] += d * d


@numba.njit(**JIT)
def normalise(xhat, inv_std, gamma, beta, y):
    """xhat *= inv_std in place; y = xhat * gamma + beta. An empty gamma or beta is scale or center off."""
    rows, c = xhat.shape
    scale, center = gamma.size > 0, beta.size > 0
    for r in range(rows):
        for k in range(c):
            h = xhat[r, k] * inv_std[k]
            xhat[r, k] = h
            if scale:
                h = h * gamma[k]
            if center:
                h = h + beta[k]
            y[r, k] = h


@numba.njit(**JIT)
def gradient_sums(grad, xhat, acc_g, acc_gx):
    """acc_g, acc_gx (C,) float64 = the column sums of grad and of grad * xhat (beta's and gamma's gradients)."""
    rows, c = grad.shape
    for k in range(c):
        acc_g[k] = 0.0
        acc_gx[k] = 0.0
    for r in range(rows):
        for k in range(c):
            g = grad[r, k]
            acc_g[k] += g
            acc_gx[k] += g * xhat[r, k]


@numba.njit(**JIT)
def input_gradient(grad, xhat, scale, a, b, dx):
    """dx = (grad * scale - xhat * a) - b: with batch statistics, scale = gamma * inv_std, a = sum(grad * xhat) *
    scale / n and b = sum(grad) * scale / n, i.e. scale * (grad - mean(grad) - xhat * mean(grad * xhat))."""
    rows, c = grad.shape
    for r in range(rows):
        for k in range(c):
            dx[r, k] = (grad[r, k] * scale[k] - xhat[r, k] * a[k]) - b[k]
