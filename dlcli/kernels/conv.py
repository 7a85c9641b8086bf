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
"""
import numba

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
    return dxp
