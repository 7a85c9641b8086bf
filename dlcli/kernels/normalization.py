"""BatchNormalization's training passes over channels-last rows (every axis but the last reduced): the forward
pass in three passes over the data (sums; centring with the sum of squares; normalising with the affine
transform), the backward in two (the two channel sums; the input gradient), where the NumPy twins
(layers/normalization.py) make about seven and six. The channel loop is innermost and contiguous, so it
vectorises; the sums accumulate in float64, so they agree with the twins' float32 BLAS sums to float32 rounding
(not bit for bit: the order differs).
"""
import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def batch_norm_forward(x, gamma, beta, epsilon, xhat, y, mean, var, inv_std):
    """x (rows, C) -> xhat and y = xhat * gamma + beta (rows, C); the batch mean, biased variance and
    1 / sqrt(var + epsilon) (C,) into the given arrays. An empty gamma or beta is scale or center off."""
    rows, c = x.shape
    acc = np.zeros(c, np.float64)
    for r in range(rows):
        for k in range(c):
            acc[k] += x[r, k]
    for k in range(c):
        mean[k] = acc[k] / rows
        acc[k] = 0.0
    for r in range(rows):
        for k in range(c):
            d = x[r, k] - mean[k]
            xhat[r, k] = d
            acc[k] += d * d
    for k in range(c):
        var[k] = acc[k] / rows
        inv_std[k] = 1 / np.sqrt(var[k] + epsilon)
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
def batch_norm_backward(grad, xhat, scale, sum_g, sum_gx, dx):
    """The input gradient with batch statistics, dx = scale * (grad - mean(grad) - xhat * mean(grad * xhat)) with
    scale = gamma * inv_std (C,); the sums of grad and grad * xhat (beta's and gamma's gradients) into sum_g, sum_gx."""
    rows, c = grad.shape
    acc_g, acc_gx = np.zeros(c, np.float64), np.zeros(c, np.float64)
    for r in range(rows):
        for k in range(c):
            g = grad[r, k]
            acc_g[k] += g
            acc_gx[k] += g * xhat[r, k]
    a, b = np.empty(c, grad.dtype), np.empty(c, grad.dtype)
    for k in range(c):
        sum_g[k], sum_gx[k] = acc_g[k], acc_gx[k]
        a[k] = sum_gx[k] * (scale[k] / rows)
        b[k] = sum_g[k] * (scale[k] / rows)
    for r in range(rows):
        for k in range(c):
            dx[r, k] = (grad[r, k] * scale[k] - xhat[r, k] * a[k]) - b[k]
