"""Convolution's scatter over (batch, height, width, channels), parallel over the batch: the twin is
conv_math.col2im_matmul_numpy.

col2im adds every patch row of a (batch, out_h, out_w, taps * channels) array back where im2col took it. With one
GEMM before it, (output gradient) @ kernel.T giving every tap's product at once, it replaces col2im_matmul's one
small GEMM and one strided NumPy add per kernel tap. Each sample's scatter stays in that sample (prange over the
batch, no two threads write one element); taps are the outer loop, so every input element sums its taps in the
twin's order.

The batch loop is a prange, compiled serially as the pooling kernels are (kernels/pooling.py): on this 2-core AMD
EPYC shared by 8 jobs (load 15-19), col2im_matmul at the book convnet's second conv took 2.6 ms with NumPy after a
two-thread GEMM and 30-45 ms with a two-thread prange (OpenBLAS's idle threads spin beside numba's). The second core
comes from lanes instead (engine/lanes.py): col2im_matmul hands each lane its chunks of samples.

im2col is conv_math.padded_patches's gather of a chunk's patches for channels at least conv_math.BLOCK_CHANNELS,
reading the unpadded input (its twin pads a copy, then im2col).

pooled_conv_3x3 is conv_math.pooled_conv at inference for a 3x3 kernel on one channel under a 2x2 pooling (its twin
is pooled_conv's gather + GEMM + tile_max, which training keeps: its backward reads where the maxima came from).
pooled_conv_backward is the training backward of conv_math.pooled_conv (a few-channel convolution that pools its own
output); its twin is conv_math.pooled_conv_backward_numpy.
"""
import numba
import numpy as np

from dlcli.kernels.pooling import max_of_four, relu_gate, relu_of

PARALLEL = False
JIT = dict(parallel=PARALLEL, cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def col2im(cols, kh, kw, sh, sw, dh, dw, dxp):
    """cols (n, out_h, out_w, kh * kw * c) -> dxp (n, height, width, c), padded input's shape, overwritten."""
    n, out_h, out_w, _ = cols.shape
    _, height, width, c = dxp.shape
    zero = dxp.dtype.type(0)
    for b in numba.prange(n):
        for r in range(height):  # not dxp[b] = 0: an array expression in a prange body ran 100x slower
            for s in range(width):
                for ch in range(c):
                    dxp[b, r, s, ch] = zero
        for p in range(kh):
            for q in range(kw):
                base = (p * kw + q) * c
                for i in range(out_h):
                    row = i * sh + p * dh
                    for j in range(out_w):
                        col = j * sw + q * dw
                        for ch in range(c):
                            dxp[b, row, col, ch] += cols[b, i, j, base + ch]


@numba.njit(**JIT)
def im2col(x, top, left, kh, kw, sh, sw, dh, dw, out):
    """im2col of x (n, height, width, c) as if padded by `top` rows and `left` columns of zeros (and as many at the
    bottom and right as out's size asks for) into out (n, out_h, out_w, kh, kw, c), contiguous: the patch rows
    of a chunk of samples, read from x itself where the twin (conv_math.im2col of conv_math.pad's copy) pads the
    whole batch first on the calling thread. The resnet's stride-2 conv (16 samples of 14x14x32, 3x3, 'same'):
    22 us a chunk against the twin's 53 (one thread)."""
    n, height, width, c = x.shape
    _, out_h, out_w = out.shape[:3]
    zero = out.dtype.type(0)
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                for p in range(kh):
                    r = i * sh + p * dh - top
                    for q in range(kw):
                        s = j * sw + q * dw - left
                        if 0 <= r < height and 0 <= s < width:
                            for ch in range(c):
                                out[b, i, j, p, q, ch] = x[b, r, s, ch]
                        else:
                            for ch in range(c):
                                out[b, i, j, p, q, ch] = zero


@numba.njit(**JIT)
def im2col_taps(x, top, left, kh, kw, sh, sw, dh, dw, out_h, out_w, row, out):
    """im2col as above of x (n, c, height, width), channels first, into the few-channel patches' tap-major layout:
    tap t's (n, out_h, out_w) positions at out[t * row:], contiguous (out flat), so each tap copies along whole
    output rows. The resnet's stem (16 samples of 28x28x1, 3x3, 'same'): 18-20 us a chunk against the twin's
    pad + strided copy's ~42 (one thread)."""
    n, c, height, width = x.shape
    flat = x.reshape(-1)
    zero = out.dtype.type(0)
    for p in range(kh):
        for q in range(kw):
            shift = q * dw - left  # column j reads x's column j * sw + shift, inside x for j in [lo, hi)
            lo = min(out_w, max(0, -(shift // sw)))
            hi = max(lo, min(out_w, (width - 1 - shift) // sw + 1))
            for ch in range(c):
                start = ((p * kw + q) * c + ch) * row
                for b in range(n):
                    for i in range(out_h):
                        o = start + (b * out_h + i) * out_w
                        r = i * sh + p * dh - top
                        if r < 0 or r >= height:
                            for j in range(out_w):
                                out[np.uint64(o + j)] = zero
                            continue
                        for j in range(lo):
                            out[np.uint64(o + j)] = zero
                        # unsigned indices: no wrap-around test for negative ones, so the copy vectorises
                        read = ((b * c + ch) * height + r) * width + shift
                        if sw == 1:
                            for j in range(lo, hi):
                                out[np.uint64(o + j)] = flat[np.uint64(read + j)]
                        else:
                            for j in range(lo, hi):
                                out[np.uint64(o + j)] = flat[np.uint64(read + j * sw)]
                        for j in range(hi, out_w):
                            out[np.uint64(o + j)] = zero


@numba.njit(inline="always", **JIT)
def _taps_3x3(x, b, r, s, w0, w1, w2, w3, w4, w5, w6, w7, w8, ch):
    """Filter ch's 3x3 convolution of one-channel x at (r, s): the patch's nine scalars, each row's three in order."""
    return (((x[b, r, s] * w0[ch] + x[b, r, s + 1] * w1[ch]) + x[b, r, s + 2] * w2[ch])
            + ((x[b, r + 1, s] * w3[ch] + x[b, r + 1, s + 1] * w4[ch]) + x[b, r + 1, s + 2] * w5[ch])
            + ((x[b, r + 2, s] * w6[ch] + x[b, r + 2, s + 1] * w7[ch]) + x[b, r + 2, s + 2] * w8[ch]))


@numba.njit(**JIT)
def pooled_conv_3x3(x, weights, bias, relu, y):
    """The inference forward of conv_math.pooled_conv for a 3x3 kernel on one channel under a 2x2 pooling (the
    MNIST convnets' first conv): x (n, height, width) padded, weights (9, f) -> y (n, pooled_h, pooled_w, f), the
    maxima of each window's four outputs + bias, then max(., 0) where `relu`, written directly: each output one
    loop over the filters reading nine weight rows (vectorised), where the twin gathers patches, multiplies them
    with the kernel in a GEMM of 10 taps and pools the products (and where a loop over the taps per filter did not
    vectorise). Each sample alone, so any split of the batch gives the same bits."""
    n = x.shape[0]
    _, pooled_h, pooled_w, f = y.shape
    zero = y.dtype.type(0)
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = (weights[0], weights[1], weights[2], weights[3], weights[4], weights[5],
                                          weights[6], weights[7], weights[8])
    for b in range(n):
        for i in range(pooled_h):
            for j in range(pooled_w):
                r, s = 2 * i, 2 * j
                out = y[b, i, j]
                for ch in range(f):
                    z0 = _taps_3x3(x, b, r, s, w0, w1, w2, w3, w4, w5, w6, w7, w8, ch)
                    z1 = _taps_3x3(x, b, r, s + 1, w0, w1, w2, w3, w4, w5, w6, w7, w8, ch)
                    z2 = _taps_3x3(x, b, r + 1, s, w0, w1, w2, w3, w4, w5, w6, w7, w8, ch)
                    z3 = _taps_3x3(x, b, r + 1, s + 1, w0, w1, w2, w3, w4, w5, w6, w7, w8, ch)
                    v = max_of_four(z0, z1, z2, z3) + bias[ch]  # rounding is monotonic: the bias after the max
                    out[ch] = relu_of(v, zero) if relu else v


@numba.njit(**JIT)
def pooled_conv_backward(g, y, arg, xp, weights, kh, kw, dh, dw, pool_h, pool_w, relu, sums, dxp):
    """The backward of a stride-1 convolution whose output only a tiling max pooling read (conv_math.pooled_conv),
    from the pooled gradient g (n, out_h, out_w, f) and where each maximum came from (arg, its flat offset in the
    window), never the convolution's whole output gradient: each output's gradient after the relu's mask (y > 0, y
    the pooled output, where `relu`) times the patch of xp (n, height, width, c) its maximum came from, summed into
    sums (kh * kw * c + 1, f: the kernel's rows, then the bias's; size 0: not wanted), and times its kernel column
    added to the input under that patch, into dxp (xp's shape, overwritten; size 0: not wanted)."""
    if sums.size > 0:
        if pool_h == 2 and pool_w == 2:
            _sums_2x2(g, y, arg, xp, kh, kw, dh, dw, relu, sums)
        else:
            _sums_window(g, y, arg, xp, kh, kw, dh, dw, pool_h, pool_w, relu, sums)
    if dxp.size > 0:
        _input_gradient(g, y, arg, weights, kh, kw, dh, dw, pool_h, pool_w, relu, dxp)


@numba.njit(**JIT)
def _sums_2x2(g, y, arg, xp, kh, kw, dh, dw, relu, sums):
    """pooled_conv_backward's sums under 2x2 windows: per output the gradient of each window offset k, gk (the
    masked gradient where the maximum sat at k, else 0), filled without a branch, then each kernel tap's row of sums
    takes all four offsets' products in one pass. The book convnet's first conv, one thread: 0.8 ms, where a loop
    over the offsets around each row (or gk as rows of one array, which kept the loop from vectorising) took 4."""
    n, out_h, out_w, f = g.shape
    c = xp.shape[-1]
    taps = kh * kw * c
    zero, one = g.dtype.type(0), g.dtype.type(1)
    g0, g1, g2, g3 = np.empty(f, g.dtype), np.empty(f, g.dtype), np.empty(f, g.dtype), np.empty(f, g.dtype)
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                for ch in range(f):
                    m = relu_gate(g[b, i, j, ch], y[b, i, j, ch], zero, one) if relu else g[b, i, j, ch]
                    at = arg[b, i, j, ch]
                    g0[ch] = m if at == 0 else zero
                    g1[ch] = m if at == 1 else zero
                    g2[ch] = m if at == 2 else zero
                    g3[ch] = m if at == 3 else zero
                t = 0
                for p in range(kh):
                    for q in range(kw):
                        row, col = 2 * i + p * dh, 2 * j + q * dw
                        for cc in range(c):
                            v0, v1 = xp[b, row, col, cc], xp[b, row, col + 1, cc]
                            v2, v3 = xp[b, row + 1, col, cc], xp[b, row + 1, col + 1, cc]
                            for ch in range(f):
                                sums[t, ch] += v0 * g0[ch] + v1 * g1[ch] + v2 * g2[ch] + v3 * g3[ch]
                            t += 1
                for ch in range(f):
                    sums[taps, ch] += g0[ch] + g1[ch] + g2[ch] + g3[ch]


@numba.njit(**JIT)
def _sums_window(g, y, arg, xp, kh, kw, dh, dw, pool_h, pool_w, relu, sums):
    """_sums_2x2 for any window: one offset at a time."""
    n, out_h, out_w, f = g.shape
    c = xp.shape[-1]
    taps, window = kh * kw * c, pool_h * pool_w
    zero, one = g.dtype.type(0), g.dtype.type(1)
    gk = np.empty(f, g.dtype)
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                for k in range(window):
                    for ch in range(f):
                        m = relu_gate(g[b, i, j, ch], y[b, i, j, ch], zero, one) if relu else g[b, i, j, ch]
                        gk[ch] = m if arg[b, i, j, ch] == k else zero
                    t = 0
                    for p in range(kh):
                        for q in range(kw):
                            row, col = i * pool_h + k // pool_w + p * dh, j * pool_w + k % pool_w + q * dw
                            for cc in range(c):
                                v = xp[b, row, col, cc]
                                for ch in range(f):
                                    sums[t, ch] += v * gk[ch]
                                t += 1
                    for ch in range(f):
                        sums[taps, ch] += gk[ch]


@numba.njit(**dict(JIT, fastmath={"reassoc"}))
def _input_gradient(g, y, arg, weights, kh, kw, dh, dw, pool_h, pool_w, relu, dxp):
    """pooled_conv_backward's input gradient: for each window offset k the gradient of the outputs whose maximum
    sat there, gk, and for each kernel tap its dot product with the tap's kernel row, added under the patch. The
    dot products may reassociate (so they vectorise: 8 ms -> ~1 for the book convnet's first conv's shape, where an
    add per output and tap ran); the order is the code's, the same on any lanes."""
    n, out_h, out_w, f = g.shape
    c = dxp.shape[-1]
    zero, one = g.dtype.type(0), g.dtype.type(1)
    gk = np.empty(f, g.dtype)
    for b in range(n):
        for r in range(dxp.shape[1]):
            for s in range(dxp.shape[2]):
                for cc in range(c):
                    dxp[b, r, s, cc] = zero
        for i in range(out_h):
            for j in range(out_w):
                for k in range(pool_h * pool_w):
                    for ch in range(f):
                        m = relu_gate(g[b, i, j, ch], y[b, i, j, ch], zero, one) if relu else g[b, i, j, ch]
                        gk[ch] = m if arg[b, i, j, ch] == k else zero
                    t = 0
                    for p in range(kh):
                        for q in range(kw):
                            row, col = i * pool_h + k // pool_w + p * dh, j * pool_w + k % pool_w + q * dw
                            for cc in range(c):
                                total = zero
                                for ch in range(f):
                                    total += weights[t, ch] * gk[ch]
                                dxp[b, row, col, cc] += total
                                t += 1
