"""BatchNormalization's training passes over channels-last rows (every axis but the last reduced), each over a range
of rows so the lanes (engine/lanes.py) share them: the forward pass in two passes over the data (the sums of x and
of its squares, both shifted by the batch's first row; normalising with the affine transform), the backward in two
(the two channel sums; the input gradient), where the NumPy twins (layers/normalization.py) make about seven and six.
The shift makes the one-pass variance safe: var = mean(d^2) - mean(d)^2 with d = x - x[0] cancels only what lies
between a sample and the mean, a few standard deviations, where x itself could be far from 0. Each range's sums come
back on their own and the layer adds them in range order, so the lanes never change a bit. The channel loop is
innermost and contiguous, so it vectorises; the sums accumulate in float64, so they agree with the twins' float32
BLAS sums to float32 rounding (not bit for bit: the order differs).

A plain ReLU after the layer (graph.py moves it into the layer's post_activation) runs inside these loops: the
forward clamps y as it writes it, the backward multiplies the gradient by (y > 0) as it reads it (the ReLU layer's
own twin, grad * (y > 0)), so neither pass makes a pass of its own. The forward also adds a residual where the
graph gives the layer the Add after it (a v1 residual block's tail, BN -> Add -> ReLU, in one pass; the Add's backward
is unchanged: it masks the gradient with the sum's ReLU and hands it to both its inputs). The forward writes y alone: the backward
recomputes xhat = (x - mean) * inv_std from the layer's input x, which it reads in place of xhat, and y from xhat,
both with the forward's own float32 operations (so the same bits as when xhat was kept). Reading y as well, evicted
from cache by then, made the resnet's BN + ReLU backward at 14x14x32 cost what the two layers had cost apart.
"""
import numba

from dlcli.kernels.pooling import relu_of

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def shifted_sums(x, shift, acc_d, acc_dd):
    """acc_d, acc_dd (C,) float64 = the column sums of d = x - shift and of d * d, for x (rows, C) and a float64
    shift (C,)."""
    rows, c = x.shape
    for k in range(c):
        acc_d[k] = 0.0
        acc_dd[k] = 0.0
    for r in range(rows):
        for k in range(c):
            d = x[r, k] - shift[k]
            acc_d[k] += d
            acc_dd[k] += d * d


@numba.njit(**JIT)
def normalise(x, mean, inv_std, gamma, beta, relu, residual, y):
    """y = _affine((x - mean) * inv_std), plus `residual` (rows, C) where it has rows (an Add after the layer, which
    the graph runs here: empty (0, C) otherwise), and with `relu` np.maximum(that, 0) (pooling.relu_of). An empty
    gamma or beta is scale or center off. xhat itself is not written: the backward recomputes it from x."""
    rows, c = x.shape
    summed = residual.shape[0] > 0
    zero = y.dtype.type(0)
    for r in range(rows):
        for k in range(c):
            h = _affine((x[r, k] - mean[k]) * inv_std[k], gamma, beta, k)
            if summed:
                h = h + residual[r, k]
            y[r, k] = relu_of(h, zero) if relu else h


@numba.njit(**JIT)
def gradient_sums(grad, x, mean, inv_std, gamma, beta, relu, acc_g, acc_gx):
    """acc_g, acc_gx (C,) float64 = the column sums of g and of g * xhat (beta's and gamma's gradients), xhat =
    (x - mean) * inv_std as normalise computed it, where g is grad, or with `relu` grad * (y > 0), y = xhat * gamma
    + beta as normalise computed it. An empty gamma or beta is scale or center off."""
    rows, c = grad.shape
    zero = grad.dtype.type(0)
    for k in range(c):
        acc_g[k] = 0.0
        acc_gx[k] = 0.0
    for r in range(rows):
        for k in range(c):
            g, h = grad[r, k], (x[r, k] - mean[k]) * inv_std[k]
            if relu and not _affine(h, gamma, beta, k) > zero:
                g = g * zero
            acc_g[k] += g
            acc_gx[k] += g * h


@numba.njit(**JIT)
def input_gradient(grad, x, mean, inv_std, gamma, beta, relu, scale, a, b, dx):
    """dx = (g * scale - xhat * a) - b, g as in gradient_sums: with batch statistics, scale = gamma * inv_std,
    a = sum(g * xhat) * scale / n and b = sum(g) * scale / n, i.e. scale * (g - mean(g) - xhat * mean(g * xhat))."""
    rows, c = grad.shape
    zero = grad.dtype.type(0)
    for r in range(rows):
        for k in range(c):
            g, h = grad[r, k], (x[r, k] - mean[k]) * inv_std[k]
            if relu and not _affine(h, gamma, beta, k) > zero:
                g = g * zero
            dx[r, k] = (g * scale[k] - h * a[k]) - b[k]


@numba.njit(inline="always", **JIT)
def _affine(h, gamma, beta, k):
    """h * gamma + beta for channel k (an empty gamma or beta is scale or center off): one home for the forward's y
    and the backward's ReLU mask, which recomputes it with the same float32 operations (so the same bits)."""
    y = h * gamma[k] if gamma.size > 0 else h
    return y + beta[k] if beta.size > 0 else y
