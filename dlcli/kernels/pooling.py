"""Max pooling over (batch, height, width, channels), one pass over the data where NumPy makes two ufunc passes per
window offset; twins of conv_math.max_pool, window_max and max_pool_backward, bit for bit (same comparisons, same
NaN propagation, same summation order).

The batch loop is a prange, but compiled serially: measured in the book convnet's training step (AMD EPYC, 2 cores
shared with other work), both poolings' forward + backward took 9.4 ms on one thread, 38 ms on two (the second core
is busy with OpenBLAS's threads between GEMMs) and 18.7-25.7 ms in NumPy. The second core comes from lanes instead
(engine/lanes.py): conv_math calls max_pool and max_pool_backward on each lane's samples.
"""
import numba
import numpy as np

PARALLEL = False
JIT = dict(parallel=PARALLEL, cache=True, nogil=True)


@numba.njit(inline="always", cache=True, nogil=True)
def larger(best, v):
    """np.maximum(best, v) as max pooling takes it, one home for the rule: NaN propagates, a NaN maximum keeps its
    place (NaN > v is false), and of equal values the first stays (TF's MaxPoolGrad's first maximum)."""
    return v if v > best or v != v else best


@numba.njit(inline="always", cache=True, nogil=True)
def relu_of(v, zero):
    """np.maximum(v, 0), the compiled kernels' one ReLU: larger(0, v), so NaN is kept and -0.0 becomes 0.0 (of
    equal values the first stays, as NumPy returns the second operand of np.maximum(v, 0) for equal ones)."""
    return larger(zero, v)


@numba.njit(inline="always", cache=True, nogil=True)
def relu_gate(g, y, zero, one):
    """The gradient g through a ReLU whose output was y, g * (y > 0) as the NumPy twins take it (ReLU.backward): the
    compiled kernels' one ReLU backward. A multiplication, not a choice, so a NaN or inf gradient stays NaN where the
    gate is shut, as in NumPy."""
    return g * (one if y > zero else zero)


@numba.njit(inline="always", cache=True, nogil=True)
def max_of_four(z0, z1, z2, z3):
    """A 2x2 window's maximum, read in row order."""
    return larger(larger(larger(z0, z1), z2), z3)


@numba.njit(**JIT)
def max_pool(xp, pool_h, pool_w, stride_h, stride_w, relu, arg, y):
    """Window maxima into y, then max(y, 0) where `relu` (the activation of the layer before, moved after the
    pooling: graph.py); arg gets the flat in-window offset of each maximum (the first maximum wins: strict `>` in
    order). Channels innermost: contiguous, so the comparisons vectorise."""
    n, out_h, out_w, c = y.shape
    zero = y.dtype.type(0)
    for b in numba.prange(n):
        for i in range(out_h):
            for j in range(out_w):
                for ch in range(c):
                    y[b, i, j, ch] = xp[b, i * stride_h, j * stride_w, ch]
                    arg[b, i, j, ch] = 0
                for k in range(1, pool_h * pool_w):
                    row, col = i * stride_h + k // pool_w, j * stride_w + k % pool_w
                    for ch in range(c):
                        v, best = xp[b, row, col, ch], y[b, i, j, ch]
                        # np.maximum propagates NaN, and a NaN maximum keeps its place (NaN > v is false)
                        y[b, i, j, ch] = larger(best, v)
                        arg[b, i, j, ch] = k if v > best else arg[b, i, j, ch]
                if relu:
                    for ch in range(c):
                        y[b, i, j, ch] = relu_of(y[b, i, j, ch], zero)


@numba.njit(**JIT)
def window_max(xp, pool_h, pool_w, stride_h, stride_w, out_h, out_w):
    n, _, _, c = xp.shape
    y = np.empty((n, out_h, out_w, c), xp.dtype)
    for b in numba.prange(n):
        for i in range(out_h):
            for j in range(out_w):
                for ch in range(c):
                    y[b, i, j, ch] = xp[b, i * stride_h, j * stride_w, ch]
                for k in range(1, pool_h * pool_w):
                    row, col = i * stride_h + k // pool_w, j * stride_w + k % pool_w
                    for ch in range(c):
                        v, best = xp[b, row, col, ch], y[b, i, j, ch]
                        y[b, i, j, ch] = larger(best, v)
    return y


@numba.njit(**JIT)
def max_pool_backward(grad, arg, relu_y, dxp, pool_h, pool_w, stride_h, stride_w):
    """Each output's gradient to its argmax in dxp (overwritten), times relu_y > 0 where relu_y is not empty (the
    moved ReLU's output, max_pool's y: its backward, grad * (y > 0) as ReLU.backward). Disjoint windows: every
    window element is written once (gradient or 0), no read-modify-write, and only the inputs no window covers are
    zeroed besides. Overlapping: the sample is zeroed, then one pass per offset in order, so an input shared by
    windows sums its gradients in the NumPy twin's order."""
    n, out_h, out_w, c = grad.shape
    _, height, width, _ = dxp.shape
    disjoint = stride_h >= pool_h and stride_w >= pool_w
    relu = relu_y.size > 0
    zero, one = grad.dtype.type(0), grad.dtype.type(1)
    for b in numba.prange(n):
        for r in range(height):  # not dxp[b] = 0: an array expression in a prange body ran 100x slower
            row_covered = r < out_h * stride_h and r % stride_h < pool_h
            for s in range(width):
                if disjoint and row_covered and s < out_w * stride_w and s % stride_w < pool_w:
                    continue
                for ch in range(c):
                    dxp[b, r, s, ch] = zero
        for p in range(1 if disjoint else pool_h * pool_w):
            for i in range(out_h):
                for j in range(out_w):
                    for k in range(pool_h * pool_w):
                        if not disjoint and k != p:
                            continue
                        row, col = i * stride_h + k // pool_w, j * stride_w + k % pool_w
                        for ch in range(c):
                            g = grad[b, i, j, ch]
                            if relu:
                                g = relu_gate(g, relu_y[b, i, j, ch], zero, one)
                            hit = arg[b, i, j, ch] == k
                            if disjoint:
                                dxp[b, row, col, ch] = g if hit else zero
                            elif hit:
                                dxp[b, row, col, ch] += g


@numba.njit(**JIT)
def tile_max(z, pool_h, pool_w, relu, y, arg):
    """y (n, out_h, out_w, c): window maxima of z's first out_h * pool_h rows and out_w * pool_w columns in windows
    that tile them (strides = pool size; z may be wider, as a few-channel convolution's output rows are), then
    max(y, 0) where `relu` (a convolution's activation, run after its pooling). `arg`: None (inference), or an array
    of y's shape that receives each maximum's flat offset in its window, the first maximum winning (strict `>` in
    order, as max_pool and TF's MaxPoolGrad). One loop over the channels per output, reading every element of its
    window in that loop when the window is 2x2 (the book convnet's first pooling: 25% less time than a loop per
    element)."""
    n, out_h, out_w, c = y.shape
    zero = y.dtype.type(0)
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                out = y[b, i, j]
                r, s = i * pool_h, j * pool_w
                if pool_h == 2 and pool_w == 2:
                    z0, z1, z2, z3 = z[b, r, s], z[b, r, s + 1], z[b, r + 1, s], z[b, r + 1, s + 1]
                    if arg is None:
                        for ch in range(c):
                            best = max_of_four(z0[ch], z1[ch], z2[ch], z3[ch])
                            out[ch] = relu_of(best, zero) if relu else best
                    else:
                        where = arg[b, i, j]
                        for ch in range(c):
                            best, at = z0[ch], 0
                            v = z1[ch]
                            at = 1 if v > best else at
                            best = larger(best, v)
                            v = z2[ch]
                            at = 2 if v > best else at
                            best = larger(best, v)
                            v = z3[ch]
                            at = 3 if v > best else at
                            best = larger(best, v)
                            where[ch] = at
                            out[ch] = relu_of(best, zero) if relu else best
                    continue
                first = z[b, r, s]
                for ch in range(c):
                    out[ch] = first[ch]
                if arg is not None:
                    for ch in range(c):
                        arg[b, i, j, ch] = 0
                for k in range(1, pool_h * pool_w):
                    row = z[b, r + k // pool_w, s + k % pool_w]
                    for ch in range(c):
                        v, best = row[ch], out[ch]
                        if arg is not None and v > best:
                            arg[b, i, j, ch] = k
                        out[ch] = larger(best, v)
                if relu:
                    for ch in range(c):
                        out[ch] = relu_of(out[ch], zero)


# Global average pooling over (batch, steps, channels), the spatial axes flattened. NumPy's x.mean(spatial axes) of a
# channels-last batch of two channels or more adds the steps in order, each channel on its own, in the array's
# dtype (its inner loop runs over the channels, so no pairwise summation), then divides by the count: these are the
# same operations in the same order, so the same bits (with one channel NumPy's inner loop is the steps' pairwise
# sum: the layer keeps the twin there). The resnet's 64x7x7x64, thread CPU, one thread: forward 47 -> 13 us,
# backward (the gradient over the count, broadcast) 20 -> 8 us.


@numba.njit(cache=True, nogil=True, error_model="numpy")
def global_mean(x, out):
    """out (n, C) = x (n, steps, C) summed over its steps in order, divided by the step count."""
    n, steps, c = x.shape
    count = out.dtype.type(steps)
    for b in range(n):
        row = out[b]
        for ch in range(c):
            row[ch] = x[b, 0, ch]
        for s in range(1, steps):
            for ch in range(c):
                row[ch] += x[b, s, ch]
        for ch in range(c):
            row[ch] = row[ch] / count


@numba.njit(cache=True, nogil=True, error_model="numpy")
def global_mean_backward(grad, dx):
    """dx (n, steps, C) = grad (n, C) / steps at every step, the twin's broadcast of grad / steps."""
    n, steps, c = dx.shape
    count = grad.dtype.type(steps)
    for b in range(n):
        share = grad[b] / count
        for s in range(steps):
            for ch in range(c):
                dx[b, s, ch] = share[ch]
