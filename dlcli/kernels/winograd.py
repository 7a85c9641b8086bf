"""Winograd's F(2x2, 3x3) convolution (Lavin & Gray, 2015), forward and both gradients: each 2x2 block of outputs
from its 4x4 input tile with 16 products per (input, output) channel pair where im2col's GEMM makes 36, so a 3x3
stride-1 convolution's multiplications fall 2.25x (less the ragged edge's tiles). The transforms are these kernels;
the products are 16 GEMMs per pass (conv_math.winograd_conv, winograd_backward). Its twin is the convolution itself
(im2col + one GEMM, col2im for the input gradient): the same sums in another order, equal within float32 rounding.

    input  V = B^T d B,  B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]   (d: a 4x4 tile)
    output Y = A^T M A,  A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]                           (M = U (x) V: 16 products)

Backward runs the same algebra transposed: the output gradient dY of each 2x2 block becomes dM = A dY A^T
(output_gradient_tiles); the kernel's gradient in the Winograd domain is dU[xi, nu] = V[xi, nu]^T dM[xi, nu] summed
over the tiles (16 GEMMs, then G^T dU G); the input gradient is dV[xi, nu] = dM[xi, nu] U[xi, nu]^T (16 GEMMs) taken
back to each 4x4 tile as B dV B^T and added where the tiles overlap (input_gradient_tiles).

Channels are innermost everywhere (contiguous, so the loops vectorise); serial, as the pooling kernels are
(kernels/pooling.py): the second core comes from lanes (engine/lanes.py), each running its chunks of samples.
"""
import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")


# B^T's rows as (p, q, sign): row = d[p] + sign * d[q]; B's columns are the same pairs
PAIRS = ((0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0))


@numba.njit(**JIT)
def input_tiles(x, top, left, tiles_h, tiles_w, v):
    """x (n, height, width, c) -> v (16, n * tiles_h * tiles_w, c): B^T d B of every 4x4 tile d at stride 2 of x
    padded with `top` rows and `left` columns of zeros (1 and 1 for 'same'); a tile past x's edge on any side
    reads zeros there, so x is never copied into a padded array (resnet 14x14x32 at batch 64: a 0.2 ms copy).
    Each element of v sums 4 of d's with signs +-1 (exact): the innermost loop reads 4 channel rows and writes 1,
    which LLVM vectorises (a loop writing all 16 did not)."""
    n, height, width, c = x.shape
    kind = x.dtype.type  # the signs in x's type: float32 tiles are not summed in float64
    zero = np.zeros(c, x.dtype)
    for b in range(n):
        image = x[b]
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                for r in range(4):
                    p, q, row_sign = 2 * ti - top + PAIRS[r][0], 2 * ti - top + PAIRS[r][1], kind(PAIRS[r][2])
                    p_in, q_in = 0 <= p < height, 0 <= q < height
                    for e in range(4):
                        pc, qc, col_sign = 2 * tj - left + PAIRS[e][0], 2 * tj - left + PAIRS[e][1], kind(PAIRS[e][2])
                        pc_in, qc_in = 0 <= pc < width, 0 <= qc < width
                        a0 = image[p, pc] if p_in and pc_in else zero
                        a1 = image[p, qc] if p_in and qc_in else zero
                        b0 = image[q, pc] if q_in and pc_in else zero
                        b1 = image[q, qc] if q_in and qc_in else zero
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



@numba.njit(**JIT)
def output_gradient_tiles(g, tiles_h, tiles_w, dm):
    """g (n, out_h, out_w, f) -> dm (16, n * tiles_h * tiles_w, f): A dY A^T of every 2x2 block dY of the output
    gradient, zeros past its last row or column (the ragged tile's outputs were cropped, so had no gradient).
    A = A^T's transpose: its rows (1, 0), (1, 1), (1, -1), (0, -1), so each element sums 1, 2 or 4 of dY's."""
    n, out_h, out_w, f = g.shape
    zero = np.zeros(f, g.dtype)
    rows = np.empty((4, 2, f), g.dtype)  # A dY: its 4 rows of 2 positions
    for b in range(n):
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                i, j = 2 * ti, 2 * tj
                lower, right = i + 1 < out_h, j + 1 < out_w
                y00 = g[b, i, j]
                y01 = g[b, i, j + 1] if right else zero
                y10 = g[b, i + 1, j] if lower else zero
                y11 = g[b, i + 1, j + 1] if lower and right else zero
                for e in range(2):
                    top, bottom = (y00, y10) if e == 0 else (y01, y11)
                    r0, r1, r2, r3 = rows[0, e], rows[1, e], rows[2, e], rows[3, e]
                    for ch in range(f):
                        r0[ch] = top[ch]
                        r1[ch] = top[ch] + bottom[ch]
                        r2[ch] = top[ch] - bottom[ch]
                        r3[ch] = -bottom[ch]
                for r in range(4):  # (A dY) A^T: the same combinations along the row
                    left, second = rows[r, 0], rows[r, 1]
                    m0, m1, m2, m3 = dm[4 * r, tile], dm[4 * r + 1, tile], dm[4 * r + 2, tile], dm[4 * r + 3, tile]
                    for ch in range(f):
                        m0[ch] = left[ch]
                        m1[ch] = left[ch] + second[ch]
                        m2[ch] = left[ch] - second[ch]
                        m3[ch] = -second[ch]
    return dm


@numba.njit(**JIT)
def input_gradient_tiles(dv, top, left, tiles_h, tiles_w, dx):
    """dv (16, n * tiles_h * tiles_w, c) -> dx (n, height, width, c), the input's gradient, overwritten: B dV B^T
    of every tile added into its 4x4 window at stride 2 (neighbours overlap by 2 rows or columns, added in tile
    order), the windows placed as input_tiles reads them (`top` and `left` padding); rows and columns outside x
    (its padding, an odd output size's last tiles) are dropped, so dx needs no copy out of a padded array.
    B's rows are B^T's columns: (1, 0, 0, 0), (0, 1, -1, 1), (-1, 1, 1, 0), (0, 0, 0, -1)."""
    n, height, width, c = dx.shape
    zero = dx.dtype.type(0)
    cols = np.empty((4, 4, c), dx.dtype)  # B dV: 4 rows of the tile by dV's 4 columns
    for b in range(n):
        for r in range(height):
            for s in range(width):
                for ch in range(c):
                    dx[b, r, s, ch] = zero
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                for e in range(4):
                    v0, v1, v2, v3 = dv[e, tile], dv[4 + e, tile], dv[8 + e, tile], dv[12 + e, tile]
                    t0, t1, t2, t3 = cols[0, e], cols[1, e], cols[2, e], cols[3, e]
                    for ch in range(c):
                        t0[ch] = v0[ch]
                    for ch in range(c):
                        t1[ch] = v1[ch] - v2[ch] + v3[ch]
                    for ch in range(c):
                        t2[ch] = v2[ch] + v1[ch] - v0[ch]
                    for ch in range(c):
                        t3[ch] = -v3[ch]
                col = 2 * tj - left
                for i in range(4):  # (B dV) B^T, added in place
                    r = 2 * ti - top + i
                    if r < 0 or r >= height:
                        continue
                    s0, s1, s2, s3 = cols[i, 0], cols[i, 1], cols[i, 2], cols[i, 3]
                    row = dx[b, r]
                    if 0 <= col < width:
                        out = row[col]
                        for ch in range(c):
                            out[ch] += s0[ch]
                    if 0 <= col + 1 < width:
                        out = row[col + 1]
                        for ch in range(c):
                            out[ch] += s1[ch] - s2[ch] + s3[ch]
                    if 0 <= col + 2 < width:
                        out = row[col + 2]
                        for ch in range(c):
                            out[ch] += s2[ch] + s1[ch] - s0[ch]
                    if col + 3 < width:
                        out = row[col + 3]
                        for ch in range(c):
                            out[ch] -= s3[ch]
    return dx
