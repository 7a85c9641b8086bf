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
is unchanged: it masks the gradient with the sum's ReLU and hands it to both its inputs). The forward writes y alone:
the backward recomputes xhat = (x - mean) * inv_std from the layer's input x, which it reads in place of xhat, and y
from xhat, both with the forward's own float32 operations (so the same bits as when xhat was kept). Reading y as well,
evicted from cache by then, made the resnet's BN + ReLU backward at 14x14x32 cost what the two layers had cost apart.
"""
import numba
import numpy as np

from dlcli.kernels.pooling import larger, relu_gate, relu_of

JIT = dict(cache=True, nogil=True, error_model="numpy")


# The sums take four rows a channel at a time: each channel still adds its rows one by one in row order (the same
# bits), but loads and stores its accumulators once per four rows, where a round trip through memory per row (store,
# then load in the next row) bound the loop. One thread, AMD EPYC: shifted_sums 30 -> 13 us at 3136x64, 91 -> 30 at
# 12544x32, 364 -> 125 at 50176x32; gradient_sums with the ReLU's mask 43 -> 29 and 114 -> 58.
@numba.njit(**JIT)
def shifted_sums(x, shift, acc_d, acc_dd):
    """acc_d, acc_dd (C,) float64 = the column sums of d = x - shift and of d * d, for x (rows, C) and a float64
    shift (C,), each column's rows added in order."""
    rows, c = x.shape
    for k in range(c):
        acc_d[k] = 0.0
        acc_dd[k] = 0.0
    whole = rows - rows % 4
    for r in range(0, whole, 4):
        for k in range(c):
            s = shift[k]
            d0, d1, d2, d3 = x[r, k] - s, x[r + 1, k] - s, x[r + 2, k] - s, x[r + 3, k] - s
            acc_d[k] = acc_d[k] + d0 + d1 + d2 + d3
            acc_dd[k] = acc_dd[k] + d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3
    for r in range(whole, rows):
        for k in range(c):
            d = x[r, k] - shift[k]
            acc_d[k] += d
            acc_dd[k] += d * d


@numba.njit(**JIT)
def statistics(sums, shift, n, momentum, epsilon, moving_mean, moving_variance, mean, inv_std):
    """The batch's mean and 1 / sqrt(var + epsilon) (float32, (C,)) from each range's shifted_sums (sums (ranges, 2,
    C) float64, added in range order) and the shift, as the layer's twin (_statistics) computes them: mean = shift +
    sum(d) / n, var = max(sum(d * d) / n - (sum(d) / n)^2, 0) in float64, each rounded once to float32; and
    moving_mean and moving_variance updated in place, moving * momentum + batch * (1 - momentum) in float32. One call
    where the twin makes about 15 NumPy calls on the calling thread between the lanes' two passes (AMD EPYC, 7x7x64:
    13.5 -> 4.8 us)."""
    parts, _, c = sums.shape
    keep = moving_mean.dtype.type(1) - momentum
    for k in range(c):
        d, dd = sums[0, 0, k], sums[0, 1, k]
        for p in range(1, parts):
            d += sums[p, 0, k]
            dd += sums[p, 1, k]
        d, dd = d / n, dd / n
        v = dd - d * d
        m, var = mean.dtype.type(shift[k] + d), mean.dtype.type(v if v >= 0.0 or v != v else 0.0)  # np.maximum's
        mean[k] = m
        inv_std[k] = inv_std.dtype.type(1) / np.sqrt(var + epsilon)
        moving_mean[k] = moving_mean[k] * momentum + m * keep
        moving_variance[k] = moving_variance[k] * momentum + var * keep


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
    whole = rows - rows % 4  # four rows at a time, as shifted_sums
    for r in range(0, whole, 4):
        for k in range(c):
            m, s = mean[k], inv_std[k]
            h0, h1, h2, h3 = (x[r, k] - m) * s, (x[r + 1, k] - m) * s, (x[r + 2, k] - m) * s, (x[r + 3, k] - m) * s
            g0, g1, g2, g3 = grad[r, k], grad[r + 1, k], grad[r + 2, k], grad[r + 3, k]
            if relu:  # as in the loop below (an inlined helper returning g made the loop 100x slower)
                g0 = g0 if _affine(h0, gamma, beta, k) > zero else g0 * zero
                g1 = g1 if _affine(h1, gamma, beta, k) > zero else g1 * zero
                g2 = g2 if _affine(h2, gamma, beta, k) > zero else g2 * zero
                g3 = g3 if _affine(h3, gamma, beta, k) > zero else g3 * zero
            acc_g[k] = acc_g[k] + g0 + g1 + g2 + g3
            acc_gx[k] = acc_gx[k] + g0 * h0 + g1 * h1 + g2 * h2 + g3 * h3
    for r in range(whole, rows):
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


@numba.njit(**JIT)
def gradient_statistics(sums, inv_std, gamma, n, sum_g, sum_gx, scale, a, b):
    """Between the backward's two passes, as the layer's twin (_gradient_statistics) computes them: sum_g and sum_gx
    (beta's and gamma's gradients) from each range's gradient_sums (sums (ranges, 2, C) float64, added in range
    order, each rounded once), scale = inv_std * gamma (inv_std where gamma is empty), a = sum_gx * (scale / n) and
    b = sum_g * (scale / n), all in the gradient's dtype."""
    parts, _, c = sums.shape
    count = scale.dtype.type(n)
    for k in range(c):
        g, gx = sums[0, 0, k], sums[0, 1, k]
        for p in range(1, parts):
            g += sums[p, 0, k]
            gx += sums[p, 1, k]
        sum_g[k], sum_gx[k] = g, gx
        scale[k] = inv_std[k] * gamma[k] if gamma.size > 0 else inv_std[k]
        share = scale[k] / count
        a[k] = sum_gx[k] * share
        b[k] = sum_g[k] * share


@numba.njit(inline="always", **JIT)
def _affine(h, gamma, beta, k):
    """h * gamma + beta for channel k (an empty gamma or beta is scale or center off): one home for the forward's y
    and the backward's ReLU mask, which recomputes it with the same float32 operations (so the same bits)."""
    y = h * gamma[k] if gamma.size > 0 else h
    return y + beta[k] if beta.size > 0 else y


# The stem of a residual net in training, BN -> ReLU -> MaxPooling (graph.py hands the layer the pooling): the
# output is pooled as it is normalised, so neither the normalised batch nor the pooling's gradient is written whole.
# Each is the same float32 operations in the same order as normalise, pooling.max_pool (with its moved ReLU) and
# pooling.max_pool_backward followed by gradient_sums and input_gradient, so the same bits as those passes apart.


@numba.njit(**JIT)
def normalise_pooled(x, mean, inv_std, gamma, beta, pool_h, pool_w, relu, arg, y):
    """y (n, out_h, out_w, C) = the max pooling, in windows of pool_h x pool_w at strides of their size, of
    _affine((x - mean) * inv_std) for x (n, height, width, C) (rows and columns past the last whole window unread),
    then max(., 0) where `relu`; arg gets each maximum's flat offset in its window, the first maximum winning (strict
    `>` in order), as pooling.max_pool. 2x2 windows (a residual net's stem) keep a window's running maximum and its
    offset in registers, where the general loop stores and reloads them for each of the window's inputs, with the
    same operations in the same order: the resnet's stem, 64x28x28x32, one thread, AMD EPYC: 546 -> 133 us."""
    n, out_h, out_w, c = y.shape
    zero = y.dtype.type(0)
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                out, where = y[b, i, j], arg[b, i, j]
                if pool_h == 2 and pool_w == 2:
                    x0, x1 = x[b, 2 * i, 2 * j], x[b, 2 * i, 2 * j + 1]
                    x2, x3 = x[b, 2 * i + 1, 2 * j], x[b, 2 * i + 1, 2 * j + 1]
                    for ch in range(c):
                        m, s = mean[ch], inv_std[ch]
                        best = _affine((x0[ch] - m) * s, gamma, beta, ch)
                        v1 = _affine((x1[ch] - m) * s, gamma, beta, ch)
                        v2 = _affine((x2[ch] - m) * s, gamma, beta, ch)
                        v3 = _affine((x3[ch] - m) * s, gamma, beta, ch)
                        k = 1 if v1 > best else 0
                        best = larger(best, v1)
                        k = 2 if v2 > best else k
                        best = larger(best, v2)
                        k = 3 if v3 > best else k
                        best = larger(best, v3)
                        out[ch] = relu_of(best, zero) if relu else best
                        where[ch] = k
                    continue
                first = x[b, i * pool_h, j * pool_w]
                for ch in range(c):
                    out[ch] = _affine((first[ch] - mean[ch]) * inv_std[ch], gamma, beta, ch)
                    where[ch] = 0
                for k in range(1, pool_h * pool_w):
                    row = x[b, i * pool_h + k // pool_w, j * pool_w + k % pool_w]
                    for ch in range(c):
                        v, best = _affine((row[ch] - mean[ch]) * inv_std[ch], gamma, beta, ch), out[ch]
                        out[ch] = larger(best, v)
                        where[ch] = k if v > best else where[ch]
                if relu:
                    for ch in range(c):
                        out[ch] = relu_of(out[ch], zero)


@numba.njit(inline="always", **JIT)
def _unpooled(grad, arg, relu_y, k, ch, zero, one):
    """The gradient reaching channel ch of an input of the pooling at flat offset k of its window: the window's
    gradient times relu_y > 0 where its maximum came from there, else 0, as pooling.max_pool_backward writes it with
    its moved ReLU (grad, arg and relu_y: the window's rows)."""
    v = relu_gate(grad[ch], relu_y[ch], zero, one)
    return v if arg[ch] == k else zero


@numba.njit(inline="always", **JIT)
def _image_row(row, stop, height, width, pool_h, pool_w, out_h, out_w):
    """(sample, row, first column, the column after the last window's, the column after the last) of the image row
    holding flat row `row` (of n * height * width), up to `stop`: the loops take an image row at a time, its
    columns in windows first, so no division or branch runs per column."""
    b, r, s0 = row // (height * width), row // width % height, row % width
    s1 = min(width, s0 + stop - row)
    covered = max(s0, min(s1, out_w * pool_w)) if r // pool_h < out_h else s0
    return b, r, s0, covered, s1


@numba.njit(**JIT)
def pooled_gradient_sums(grad, arg, relu_y, x, start, stop, mean, inv_std, pool_h, pool_w, acc_g, acc_gx):
    """gradient_sums (without its own ReLU) over rows start:stop of x as (rows, C), where the gradient is that of
    the pooling after the layer: grad, arg and relu_y as pooling.max_pool_backward takes them (the pooling's output
    after its ReLU), x (n, height, width, C); the rows in the same order, so the same float64 sums."""
    n, height, width, c = x.shape
    _, out_h, out_w, _ = grad.shape
    zero, one = grad.dtype.type(0), grad.dtype.type(1)
    for k in range(c):
        acc_g[k] = 0.0
        acc_gx[k] = 0.0
    row = start
    while row < stop:
        b, r, s0, covered, s1 = _image_row(row, stop, height, width, pool_h, pool_w, out_h, out_w)
        i = r // pool_h
        for s in range(s0, covered):
            j = s // pool_w
            k = arg.dtype.type((r - i * pool_h) * pool_w + s - j * pool_w)  # compared in arg's own type
            gw, aw, rw, xr = grad[b, i, j], arg[b, i, j], relu_y[b, i, j], x[b, r, s]
            for ch in range(c):
                g = _unpooled(gw, aw, rw, k, ch, zero, one)
                h = (xr[ch] - mean[ch]) * inv_std[ch]
                acc_g[ch] += g
                acc_gx[ch] += g * h
        for s in range(covered, s1):  # in no window: a zero gradient, added as the twin adds it
            xr = x[b, r, s]
            for ch in range(c):
                h = (xr[ch] - mean[ch]) * inv_std[ch]
                acc_g[ch] += zero
                acc_gx[ch] += zero * h
        row += s1 - s0


@numba.njit(**JIT)
def pooled_input_gradient(grad, arg, relu_y, x, start, stop, mean, inv_std, pool_h, pool_w, scale, a, b_, dx):
    """input_gradient (without its own ReLU) over rows start:stop of x and dx as (rows, C), the gradient that of the
    pooling after the layer, as pooled_gradient_sums."""
    n, height, width, c = x.shape
    _, out_h, out_w, _ = grad.shape
    zero, one = grad.dtype.type(0), grad.dtype.type(1)
    row = start
    while row < stop:
        b, r, s0, covered, s1 = _image_row(row, stop, height, width, pool_h, pool_w, out_h, out_w)
        i = r // pool_h
        # a window at a time: its gradient, argmax and ReLU rows looked up once for its columns, where each column
        # divided for its window and looked them up: the stem's (64x28x28x32), one thread, 743 -> 600 us (the same
        # change left pooled_gradient_sums as it was, 632 -> 640: its accumulators bind it)
        for j in range(s0 // pool_w, (covered + pool_w - 1) // pool_w if covered > s0 else 0):
            gw, aw, rw = grad[b, i, j], arg[b, i, j], relu_y[b, i, j]
            for s in range(max(s0, j * pool_w), min(covered, (j + 1) * pool_w)):
                k = arg.dtype.type((r - i * pool_h) * pool_w + s - j * pool_w)  # compared in arg's own type
                xr, out = x[b, r, s], dx[b, r, s]
                for ch in range(c):
                    g = _unpooled(gw, aw, rw, k, ch, zero, one)
                    h = (xr[ch] - mean[ch]) * inv_std[ch]
                    out[ch] = (g * scale[ch] - h * a[ch]) - b_[ch]
        for s in range(covered, s1):
            xr, out = x[b, r, s], dx[b, r, s]
            for ch in range(c):
                h = (xr[ch] - mean[ch]) * inv_std[ch]
                out[ch] = (zero * scale[ch] - h * a[ch]) - b_[ch]
        row += s1 - s0
