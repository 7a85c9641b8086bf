"""Winograd's F(2x2, 3x3) convolution at inference (Lavin & Gray, 2015): each 2x2 block of outputs from its 4x4
input tile with 16 products per (input, output) channel pair where im2col's GEMM makes 36, so a 3x3 stride-1
convolution's multiplications fall 2.25x (less the ragged edge's tiles). The transforms are these two kernels; the
16 products are 16 GEMMs (conv_math.winograd_conv). Its twin is the convolution itself (im2col + one GEMM): the same
sum in another order, equal within float32 rounding.

    input  V = B^T d B,  B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]   (d: a 4x4 tile)
    output Y = A^T M A,  A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]                           (M: the 16 products)

Channels are innermost in both (contiguous, so the loops vectorise); serial, as the pooling kernels are
(kernels/pooling.py): inference runs one pass per core already (engine/graph.py).
"""
import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")


# B^T's rows as (p, q, sign): row = d[p] + sign * d[q]; B's columns are the same pairs
PAIRS = ((0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0))


@numba.njit(**JIT)
def input_tiles(xp, tiles_h, tiles_w, v):
    """xp (n, height, width, c) -> v (16, n * tiles_h * tiles_w, c): B^T d B of every 4x4 tile d at stride 2; a
    tile past xp's last row or column (an odd output size) reads zeros there. Each element of v sums 4 of d's with
    signs +-1 (exact): the innermost loop reads 4 channel rows and writes 1, which LLVM vectorises (a loop writing
    all 16 did not)."""
    n, height, width, c = xp.shape
    kind = xp.dtype.type  # the signs in xp's type: float32 tiles are not summed in float64
    zero = np.zeros(c, xp.dtype)
    for b in range(n):
        image = xp[b]
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                for r in range(4):
                    p, q, row_sign = 2 * ti + PAIRS[r][0], 2 * ti + PAIRS[r][1], kind(PAIRS[r][2])
                    for e in range(4):
                        pc, qc, col_sign = 2 * tj + PAIRS[e][0], 2 * tj + PAIRS[e][1], kind(PAIRS[e][2])
                        a0 = image[p, pc] if p < height and pc < width else zero
                        a1 = image[p, qc] if p < height and qc < width else zero
                        b0 = image[q, pc] if q < height and pc < width else zero
                        b1 = image[q, qc] if q < height and qc < width else zero
                        out = v[4 * r + e, tile]
                        for ch in range(c):
                            out[ch] = (a0[ch] + col_sign * a1[ch]) + row_sign * (b0[ch] + col_sign * b1[ch])
    return v


@numba.njit(**JIT)
def output_tiles(m, tiles_h, tiles_w, bias, y):
    """m (16, n * tiles_h * tiles_w, f) -> y (n, out_h, out_w, f) = A^T M A + bias, the ragged last tile cropped.
    A^T M's two rows go through a small buffer first, so each loop reads 3 rows (4 with the bias) and writes 1."""
    n, out_h, out_w, f = y.shape
    rows = np.empty((2, 4, f), m.dtype)
    for b in range(n):
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                for e in range(4):  # A^T M: row 0 = M0 + M1 + M2, row 1 = M1 - M2 - M3
                    m0, m1, m2, m3 = m[e, tile], m[4 + e, tile], m[8 + e, tile], m[12 + e, tile]
                    top, bottom = rows[0, e], rows[1, e]
                    for ch in range(f):
                        top[ch] = m0[ch] + m1[ch] + m2[ch]
                    for ch in range(f):
                        bottom[ch] = m1[ch] - m2[ch] - m3[ch]
                for i in range(min(2, out_h - 2 * ti)):  # (A^T M) A, cropped at the edge
                    s0, s1, s2, s3 = rows[i, 0], rows[i, 1], rows[i, 2], rows[i, 3]
                    left = y[b, 2 * ti + i, 2 * tj]
                    for ch in range(f):
                        left[ch] = s0[ch] + s1[ch] + s2[ch] + bias[ch]
                    if 2 * tj + 1 < out_w:
                        right = y[b, 2 * ti + i, 2 * tj + 1]
                        for ch in range(f):
                            right[ch] = s1[ch] - s2[ch] - s3[ch] + bias[ch]
    return y

