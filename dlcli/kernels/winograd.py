"""Winograd's F(2x2, 3x3) convolution (Lavin & Gray, 2015), forward and both gradients: each 2x2 block of outputs
from its 4x4 input tile with 16 products per (input, output) channel pair where im2col's GEMM makes 36, so a 3x3
stride-1 convolution's multiplications fall 2.25x (less the ragged edge's tiles). The transforms are these kernels;
the products are 16 GEMMs per pass (conv_math.winograd_conv, winograd_backward, through engine/blas.product). Its
twin is the convolution itself (im2col + one GEMM, col2im for the input gradient): the same sums in another order,
equal within float32 rounding.

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

from dlcli.kernels.pooling import larger, max_of_four, relu_gate, relu_of

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


# F(3x3, 3x3) at inference, for small outputs (3 to 6 rows and columns: the book convnet's conv 3, 3x3 outputs from
# 5x5 inputs, is one tile per sample): each 3x3 block of outputs from its 5x5 input tile, 25 products per channel
# pair where F(2x2) makes 64 for the same 3x3 block (4 ragged 2x2 tiles) and im2col's GEMM 81. wincnn's matrices
# (Lavin & Gray's construction, points 0, 1, -1, 2 and infinity):
#   B^T = [[2, -1, -2, 1, 0], [0, -2, -1, 1, 0], [0, 2, -3, 1, 0], [0, -1, 0, 1, 0], [0, 2, -1, -2, 1]]
#   A^T = [[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 1]]
# (G, with halves and sixths, is conv_math.WINOGRAD_G_3X3.) Both are applied along one axis and then the other
# through a tile-sized buffer (in L1), each row one loop over the channels: integers up to 4, sums of 3-5 terms.


@numba.njit(**JIT)
def input_tiles_3x3(x, top, left, tiles_h, tiles_w, v):
    """x (n, height, width, c) -> v (25, n * tiles_h * tiles_w, c): B^T d B of every 5x5 tile d at stride 3 of x
    padded with `top` rows and `left` columns of zeros, zeros read past its edge on every side (as input_tiles).
    Each tile is copied into a buffer first (zeros outside x), then B^T d column by column, then (B^T d) B."""
    n, height, width, c = x.shape
    kind = x.dtype.type  # the constants in x's type: float32 tiles are not summed in float64
    two, three = kind(2), kind(3)
    d = np.empty((5, 5, c), x.dtype)
    t = np.empty((5, 5, c), x.dtype)
    for b in range(n):
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                for i in range(5):
                    r = 3 * ti - top + i
                    for j in range(5):
                        s = 3 * tj - left + j
                        if 0 <= r < height and 0 <= s < width:
                            for ch in range(c):
                                d[i, j, ch] = x[b, r, s, ch]
                        else:
                            for ch in range(c):
                                d[i, j, ch] = 0
                for j in range(5):  # B^T d
                    for ch in range(c):
                        t[0, j, ch] = two * (d[0, j, ch] - d[2, j, ch]) - (d[1, j, ch] - d[3, j, ch])
                    for ch in range(c):
                        t[1, j, ch] = (d[3, j, ch] - d[2, j, ch]) - two * d[1, j, ch]
                    for ch in range(c):
                        t[2, j, ch] = (d[3, j, ch] - three * d[2, j, ch]) + two * d[1, j, ch]
                    for ch in range(c):
                        t[3, j, ch] = d[3, j, ch] - d[1, j, ch]
                    for ch in range(c):
                        t[4, j, ch] = two * (d[1, j, ch] - d[3, j, ch]) - d[2, j, ch] + d[4, j, ch]
                for i in range(5):  # (B^T d) B: the same combinations along the row
                    for ch in range(c):
                        v[5 * i, tile, ch] = two * (t[i, 0, ch] - t[i, 2, ch]) - (t[i, 1, ch] - t[i, 3, ch])
                    for ch in range(c):
                        v[5 * i + 1, tile, ch] = (t[i, 3, ch] - t[i, 2, ch]) - two * t[i, 1, ch]
                    for ch in range(c):
                        v[5 * i + 2, tile, ch] = (t[i, 3, ch] - three * t[i, 2, ch]) + two * t[i, 1, ch]
                    for ch in range(c):
                        v[5 * i + 3, tile, ch] = t[i, 3, ch] - t[i, 1, ch]
                    for ch in range(c):
                        v[5 * i + 4, tile, ch] = two * (t[i, 1, ch] - t[i, 3, ch]) - t[i, 2, ch] + t[i, 4, ch]


@numba.njit(**JIT)
def output_tiles_3x3(m, tiles_h, tiles_w, bias, y):
    """m (25, n * tiles_h * tiles_w, f) -> y (n, out_h, out_w, f) = A^T M A + bias, the ragged last tiles cropped:
    A^T M's 3 rows of each tile into a buffer, then each output one loop over the filters."""
    n, out_h, out_w, f = y.shape
    kind = m.dtype.type
    two, four = kind(2), kind(4)
    s = np.empty((3, 5, f), m.dtype)
    for b in range(n):
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                for e in range(5):  # A^T M
                    for ch in range(f):
                        s[0, e, ch] = m[e, tile, ch] + (m[5 + e, tile, ch] + m[10 + e, tile, ch]) + m[15 + e, tile, ch]
                    for ch in range(f):
                        s[1, e, ch] = (m[5 + e, tile, ch] - m[10 + e, tile, ch]) + two * m[15 + e, tile, ch]
                    for ch in range(f):
                        s[2, e, ch] = ((m[5 + e, tile, ch] + m[10 + e, tile, ch]) + four * m[15 + e, tile, ch]
                                       + m[20 + e, tile, ch])
                c0 = 3 * tj
                for i in range(min(3, out_h - 3 * ti)):  # (A^T M) A, cropped at the edge
                    r = 3 * ti + i
                    for ch in range(f):
                        y[b, r, c0, ch] = (s[i, 0, ch] + (s[i, 1, ch] + s[i, 2, ch]) + s[i, 3, ch]) + bias[ch]
                    if c0 + 1 < out_w:
                        for ch in range(f):
                            y[b, r, c0 + 1, ch] = ((s[i, 1, ch] - s[i, 2, ch]) + two * s[i, 3, ch]) + bias[ch]
                    if c0 + 2 < out_w:
                        for ch in range(f):
                            y[b, r, c0 + 2, ch] = ((s[i, 1, ch] + s[i, 2, ch]) + four * s[i, 3, ch]
                                                   + s[i, 4, ch]) + bias[ch]


# F(4x4, 3x3) at inference: each 4x4 block of outputs from its 6x6 input tile, 36 products per channel pair where
# im2col's GEMM makes 144 (F(2x2)'s 16 make 4 outputs: 64 for 16). Lavin & Gray's matrices:
#   B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
#          [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
#   A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
# Both are applied along one axis and then the other, each output row a loop over the channels reading at most 4
# rows: the products keep their float32 rounding of integers up to 5 (exact), and sums of 4-5 terms.


@numba.njit(**JIT)
def input_tiles_4x4(x, top, left, tiles_h, tiles_w, v):
    """x (n, height, width, c) -> v (36, n * tiles_h * tiles_w, c): B^T d B of every 6x6 tile d at stride 4 of x
    padded with `top` rows and `left` columns of zeros, zeros read past its edge on every side (as input_tiles):
    input_tiles_mixed with every block 4x4 (v stands in for the other tiles' arrays, never read)."""
    input_tiles_mixed(x, top, left, tiles_h, 0, tiles_w, 0, v, v, v, v)


# Mixed tiles (inference, a conv pooled in its output transform): where the pooling reads 4k + 2 rows (or columns)
# of the output, the last block of rows is 2 high, F(2x4) from 4x6 tiles (24 products) where F(4x4) would compute 4
# rows of which 2 are read (36); the last column of blocks 2 wide likewise (F(4x2)), their corner F(2x2) (16). The
# book convnet's conv 2 (11x11 outputs, 10x10 read by its 2x2 pooling): 256 products a sample, not 324. Each tile is
# B_h^T d B_w with the 1D transforms of its rows' and columns' block sizes (F(2)'s B^T = input_tiles' PAIRS, F(4)'s
# as above), its kernel G_h g G_w^T (conv_math.winograd_kernel) and its output A_h^T M A_w. Taps row-major: tap
# (i, j) of a tile h_taps x w_taps is i * w_taps + j. Tiles of each kind are numbered sample by sample, row-major.


@numba.njit(**JIT)
def input_tiles_mixed(x, top, left, rows4, rows2, cols4, cols2, v44, v42, v24, v22):
    """x (n, height, width, c) -> the B_h^T d B_w of every tile of a tiling of rows4 blocks of 4 rows and then
    rows2 (0 or 1) of 2, by cols4 blocks of 4 columns and then cols2 (0 or 1) of 2: v44 (36, n * rows4 * cols4, c)
    from the 6x6 tiles, v42 (24, n * rows4 * cols2, c) from the 6x4, v24 (24, n * rows2 * cols4, c) from the 4x6,
    v22 (16, n * rows2 * cols2, c) from the 4x4 (an array of no tiles is not read), x padded with `top` rows and
    `left` columns of zeros read past its edge on every side (as input_tiles). B_h^T d of a band of 6 (or 4) rows at
    once, each band row one loop over width * c floats (into a band buffer whose columns outside x stay zero), then
    (B_h^T d) B_w of each tile, one loop over the channels per tap."""
    n, height, width, c = x.shape
    kind = x.dtype.type  # the constants in x's type: float32 tiles are not summed in float64
    two, four, five = kind(2), kind(4), kind(5)
    span = max(4 * cols4 + 2 + 2 * cols2, left + width)  # the band's columns: x's at left .. left + width, zeros
    band = np.zeros((6, span, c), x.dtype)
    rows = band.reshape(6, span * c)
    zero = np.zeros(width * c, x.dtype)
    length = width * c
    inside = left * c
    t0, t1 = rows[0, inside:inside + length], rows[1, inside:inside + length]
    t2, t3 = rows[2, inside:inside + length], rows[3, inside:inside + length]
    t4, t5 = rows[4, inside:inside + length], rows[5, inside:inside + length]
    for b in range(n):
        image = x[b].reshape(height, width * c)
        for ti in range(rows4 + rows2):
            r = 4 * ti - top
            d0 = image[r] if 0 <= r < height else zero
            d1 = image[r + 1] if 0 <= r + 1 < height else zero
            d2 = image[r + 2] if 0 <= r + 2 < height else zero
            d3 = image[r + 3] if 0 <= r + 3 < height else zero
            high = ti < rows4  # a block of 4 rows: B^T of F(4) on 6 rows; else F(2)'s on 4
            if high:
                d4 = image[r + 4] if 0 <= r + 4 < height else zero
                d5 = image[r + 5] if 0 <= r + 5 < height else zero
                for k in range(length):
                    t0[k] = (four * d0[k] - five * d2[k]) + d4[k]
                for k in range(length):
                    t1[k] = (d4[k] - four * d2[k]) + (d3[k] - four * d1[k])
                for k in range(length):
                    t2[k] = (d4[k] - four * d2[k]) - (d3[k] - four * d1[k])
                for k in range(length):
                    t3[k] = (d4[k] - d2[k]) + two * (d3[k] - d1[k])
                for k in range(length):
                    t4[k] = (d4[k] - d2[k]) - two * (d3[k] - d1[k])
                for k in range(length):
                    t5[k] = (four * d1[k] - five * d3[k]) + d5[k]
            else:
                for k in range(length):
                    t0[k] = d0[k] - d2[k]
                for k in range(length):
                    t1[k] = d1[k] + d2[k]
                for k in range(length):
                    t2[k] = d2[k] - d1[k]
                for k in range(length):
                    t3[k] = d1[k] - d3[k]
            for tj in range(cols4 + cols2):
                s = 4 * tj
                wide = tj < cols4
                if high and wide:
                    v, tile = v44, (b * rows4 + ti) * cols4 + tj
                elif high:
                    v, tile = v42, (b * rows4 + ti) * cols2 + tj - cols4
                elif wide:
                    v, tile = v24, (b * rows2 + ti - rows4) * cols4 + tj
                else:
                    v, tile = v22, (b * rows2 + ti - rows4) * cols2 + tj - cols4
                for i in range(6 if high else 4):  # the same combinations along the row, band columns s ..
                    if wide:
                        for ch in range(c):
                            v[6 * i, tile, ch] = ((four * band[i, s, ch] - five * band[i, s + 2, ch])
                                                  + band[i, s + 4, ch])
                        for ch in range(c):
                            v[6 * i + 1, tile, ch] = ((band[i, s + 4, ch] - four * band[i, s + 2, ch])
                                                      + (band[i, s + 3, ch] - four * band[i, s + 1, ch]))
                        for ch in range(c):
                            v[6 * i + 2, tile, ch] = ((band[i, s + 4, ch] - four * band[i, s + 2, ch])
                                                      - (band[i, s + 3, ch] - four * band[i, s + 1, ch]))
                        for ch in range(c):
                            v[6 * i + 3, tile, ch] = ((band[i, s + 4, ch] - band[i, s + 2, ch])
                                                      + two * (band[i, s + 3, ch] - band[i, s + 1, ch]))
                        for ch in range(c):
                            v[6 * i + 4, tile, ch] = ((band[i, s + 4, ch] - band[i, s + 2, ch])
                                                      - two * (band[i, s + 3, ch] - band[i, s + 1, ch]))
                        for ch in range(c):
                            v[6 * i + 5, tile, ch] = ((four * band[i, s + 1, ch] - five * band[i, s + 3, ch])
                                                      + band[i, s + 5, ch])
                    else:
                        for ch in range(c):
                            v[4 * i, tile, ch] = band[i, s, ch] - band[i, s + 2, ch]
                        for ch in range(c):
                            v[4 * i + 1, tile, ch] = band[i, s + 1, ch] + band[i, s + 2, ch]
                        for ch in range(c):
                            v[4 * i + 2, tile, ch] = band[i, s + 2, ch] - band[i, s + 1, ch]
                        for ch in range(c):
                            v[4 * i + 3, tile, ch] = band[i, s + 1, ch] - band[i, s + 3, ch]


@numba.njit(inline="always", **JIT)
def _block_rows(flat, base, length, high, w_taps, s):
    """A_h^T M of one sample's tiles of one kind (its `length` = tiles * f floats from `base` in each of flat's rows,
    the taps of a tile (6 or 4) x w_taps, row-major) into s (4 or 2, w_taps, length): F(4)'s 4 rows from 6 where
    `high`, else F(2)'s 2 from 4 (output_tiles' A^T), each row one loop over tiles * f floats."""
    kind = flat.dtype.type
    two, four, eight = kind(2), kind(4), kind(8)
    for e in range(w_taps):
        a0, a1 = flat[e, base:base + length], flat[w_taps + e, base:base + length]
        a2, a3 = flat[2 * w_taps + e, base:base + length], flat[3 * w_taps + e, base:base + length]
        o0, o1 = s[0, e], s[1, e]
        if not high:
            for k in range(length):
                o0[k] = a0[k] + a1[k] + a2[k]
            for k in range(length):
                o1[k] = a1[k] - a2[k] - a3[k]
            continue
        a4, a5 = flat[4 * w_taps + e, base:base + length], flat[5 * w_taps + e, base:base + length]
        o2, o3 = s[2, e], s[3, e]
        for k in range(length):
            o0[k] = a0[k] + (a1[k] + a2[k]) + (a3[k] + a4[k])
        for k in range(length):
            o1[k] = (a1[k] - a2[k]) + two * (a3[k] - a4[k])
        for k in range(length):
            o2[k] = (a1[k] + a2[k]) + four * (a3[k] + a4[k])
        for k in range(length):
            o3[k] = (a1[k] - a2[k]) + eight * (a3[k] - a4[k]) + a5[k]


@numba.njit(**JIT)
def output_tiles_4x4(m, tiles_h, tiles_w, bias, y):
    """m (36, n * tiles_h * tiles_w, f) -> y (n, out_h, out_w, f) = A^T M A + bias, the ragged last tiles cropped.
    A^T M of a sample's tiles at once, each of its 24 rows one loop over tiles * f floats (views made per tile cost
    NRT reference counts: a first version with them ran no faster than F(2x2)); then each tile's 4 output rows, one
    loop over the filters per output, indexed with loop-invariant leading indices so the loops vectorise."""
    n, out_h, out_w, f = y.shape
    tiles = tiles_h * tiles_w
    kind = m.dtype.type
    two, four, eight = kind(2), kind(4), kind(8)
    length = tiles * f
    tiled = np.empty((4, 6, tiles, f), m.dtype)  # A^T M: 4 rows by 6 columns of every tile
    s = tiled.reshape(4, 6, length)
    flat = m.reshape(36, -1)
    for b in range(n):
        _block_rows(flat, b * length, length, True, 6, s)
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                t, c0 = ti * tiles_w + tj, 4 * tj
                for i in range(min(4, out_h - 4 * ti)):
                    r = 4 * ti + i
                    for ch in range(f):
                        y[b, r, c0, ch] = (tiled[i, 0, t, ch] + (tiled[i, 1, t, ch] + tiled[i, 2, t, ch])
                                           + (tiled[i, 3, t, ch] + tiled[i, 4, t, ch])) + bias[ch]
                    if c0 + 1 < out_w:
                        for ch in range(f):
                            y[b, r, c0 + 1, ch] = ((tiled[i, 1, t, ch] - tiled[i, 2, t, ch])
                                                   + two * (tiled[i, 3, t, ch] - tiled[i, 4, t, ch])) + bias[ch]
                    if c0 + 2 < out_w:
                        for ch in range(f):
                            y[b, r, c0 + 2, ch] = ((tiled[i, 1, t, ch] + tiled[i, 2, t, ch])
                                                   + four * (tiled[i, 3, t, ch] + tiled[i, 4, t, ch])) + bias[ch]
                    if c0 + 3 < out_w:
                        for ch in range(f):
                            y[b, r, c0 + 3, ch] = ((tiled[i, 1, t, ch] - tiled[i, 2, t, ch])
                                                   + eight * (tiled[i, 3, t, ch] - tiled[i, 4, t, ch])
                                                   + tiled[i, 5, t, ch]) + bias[ch]


@numba.njit(inline="always", **JIT)
def _window_argmax(block, r, c, pool_h, pool_w, bias, relu, pooled, where):
    """One window's maximum of block's outputs + bias and its flat offset in the window (the first maximum: strict
    `>` in row order, as pooling.tile_max), then max(., 0) where `relu`."""
    zero = pooled.dtype.type(0)
    f = len(pooled)
    first = block[r, c]
    for ch in range(f):
        pooled[ch] = first[ch] + bias[ch]
    for ch in range(f):
        where[ch] = 0
    for k in range(1, pool_h * pool_w):
        z = block[r + k // pool_w, c + k % pool_w]
        for ch in range(f):
            v, best = z[ch] + bias[ch], pooled[ch]
            where[ch] = k if v > best else where[ch]
            pooled[ch] = larger(best, v)
    if relu:
        for ch in range(f):
            pooled[ch] = relu_of(pooled[ch], zero)


@numba.njit(**JIT)
def output_tiles_mixed_pooled(m44, m42, m24, m22, rows4, rows2, cols4, cols2, bias, pool_h, pool_w, relu, y,
                              arg=None):
    """m44, m42, m24, m22 (each tap's products of input_tiles_mixed's tiles and the kernels, f filters, the same
    tiling) -> y (n, pooled_h, pooled_w, f): the window maxima of A_h^T M A_w + bias in pool_h x pool_w windows at
    strides of their size (pool_h and pool_w divide every block's height and width, so each window lies in one
    block), then max(y, 0) where `relu`: the output transform and pooling.tile_max in one pass, the conv's output
    never written out. A_h^T M of a sample's tiles of each kind at once, then each block's outputs that windows read
    into a buffer the size of the block (in L1), one loop over the filters per output, indexed with loop-invariant
    leading indices so the loops vectorise; the bias is added to each window's maximum (rounding is monotonic:
    max(z_i) + b rounds to the max of the z_i + b, the same bits). NaN propagates as tile_max's does. In training
    (every block 4x4: F(4x4)'s tiles) `arg` (y's shape) receives where each maximum came from, as tile_max's: the
    bias is then added to each output before the comparisons, so the first maximum is the one output_tiles_4x4 and
    tile_max would find (two outputs may round to one sum)."""
    n, pooled_h, pooled_w, f = y.shape
    kind = m44.dtype.type
    two, four, eight, zero = kind(2), kind(4), kind(8), kind(0)
    used_h, used_w = pooled_h * pool_h, pooled_w * pool_w  # the conv's rows and columns some window reads
    t44 = np.empty((4, 6, rows4 * cols4, f), m44.dtype)  # A_h^T M of a sample's tiles of each kind
    t42 = np.empty((4, 4, rows4 * cols2, f), m44.dtype)
    t24 = np.empty((2, 6, rows2 * cols4, f), m44.dtype)
    t22 = np.empty((2, 4, rows2 * cols2, f), m44.dtype)
    n44, n42, n24, n22 = t44[0, 0].size, t42[0, 0].size, t24[0, 0].size, t22[0, 0].size
    s44, s42, s24, s22 = t44.reshape(4, 6, n44), t42.reshape(4, 4, n42), t24.reshape(2, 6, n24), t22.reshape(2, 4, n22)
    f44, f42, f24, f22 = m44.reshape(36, -1), m42.reshape(24, -1), m24.reshape(24, -1), m22.reshape(16, -1)
    block = np.empty((4, 4, f), m44.dtype)
    for b in range(n):
        _block_rows(f44, b * n44, n44, True, 6, s44)
        _block_rows(f42, b * n42, n42, True, 4, s42)
        _block_rows(f24, b * n24, n24, False, 6, s24)
        _block_rows(f22, b * n22, n22, False, 4, s22)
        for ti in range(rows4 + rows2):
            high = ti < rows4
            rows = min(4 if high else 2, used_h - 4 * ti)
            for tj in range(cols4 + cols2):
                wide = tj < cols4
                cols = min(4 if wide else 2, used_w - 4 * tj)
                if high and wide:
                    tiled, t = t44, ti * cols4 + tj
                elif high:
                    tiled, t = t42, ti * cols2 + tj - cols4
                elif wide:
                    tiled, t = t24, (ti - rows4) * cols4 + tj
                else:
                    tiled, t = t22, (ti - rows4) * cols2 + tj - cols4
                for i in range(rows):  # (A_h^T M) A_w: F(4)'s 4 outputs of 6 columns, or F(2)'s 2 of 4
                    out = block[i]
                    if wide:
                        for ch in range(f):
                            out[0, ch] = tiled[i, 0, t, ch] + (tiled[i, 1, t, ch] + tiled[i, 2, t, ch]) + (
                                tiled[i, 3, t, ch] + tiled[i, 4, t, ch])
                        if cols > 1:
                            for ch in range(f):
                                out[1, ch] = (tiled[i, 1, t, ch] - tiled[i, 2, t, ch]) + two * (
                                    tiled[i, 3, t, ch] - tiled[i, 4, t, ch])
                        if cols > 2:
                            for ch in range(f):
                                out[2, ch] = (tiled[i, 1, t, ch] + tiled[i, 2, t, ch]) + four * (
                                    tiled[i, 3, t, ch] + tiled[i, 4, t, ch])
                        if cols > 3:
                            for ch in range(f):
                                out[3, ch] = ((tiled[i, 1, t, ch] - tiled[i, 2, t, ch])
                                              + eight * (tiled[i, 3, t, ch] - tiled[i, 4, t, ch]) + tiled[i, 5, t, ch])
                    else:
                        for ch in range(f):
                            out[0, ch] = tiled[i, 0, t, ch] + tiled[i, 1, t, ch] + tiled[i, 2, t, ch]
                        if cols > 1:
                            for ch in range(f):
                                out[1, ch] = tiled[i, 1, t, ch] - tiled[i, 2, t, ch] - tiled[i, 3, t, ch]
                for wi in range(rows // pool_h):
                    for wj in range(cols // pool_w):
                        pooled = y[b, 4 * ti // pool_h + wi, 4 * tj // pool_w + wj]
                        r, c = wi * pool_h, wj * pool_w
                        if arg is not None:
                            _window_argmax(block, r, c, pool_h, pool_w, bias, relu, pooled,
                                           arg[b, 4 * ti // pool_h + wi, 4 * tj // pool_w + wj])
                            continue
                        if pool_h == 2 and pool_w == 2:
                            z0, z1, z2, z3 = block[r, c], block[r, c + 1], block[r + 1, c], block[r + 1, c + 1]
                            for ch in range(f):
                                pooled[ch] = max_of_four(z0[ch], z1[ch], z2[ch], z3[ch])
                        else:
                            first = block[r, c]
                            for ch in range(f):
                                pooled[ch] = first[ch]
                            for k in range(1, pool_h * pool_w):
                                z = block[r + k // pool_w, c + k % pool_w]
                                for ch in range(f):
                                    v = z[ch]
                                    pooled[ch] = larger(pooled[ch], v)
                        for ch in range(f):
                            v = pooled[ch] + bias[ch]
                            pooled[ch] = relu_of(v, zero) if relu else v


# F(4x4, 3x3) in training: backward runs the algebra above transposed. The output gradient dY of each 4x4 block
# becomes dM = A dY A^T, A being A^T's transpose, rows (1, 0, 0, 0), (1, 1, 1, 1), (1, -1, 1, -1), (1, 2, 4, 8),
# (1, -2, 4, -8), (0, 0, 0, 1); the input gradient of each 6x6 tile is B dV B^T, added where tiles overlap by 2.


@numba.njit(inline="always", **JIT)
def _a_combinations(y, i, a, t, j, b, length):
    """A's six rows applied to four vectors of `length` floats, y[i, a .. a + 3], into t[j .. j + 5, b], one loop
    each: a band's 4 output rows into 6 (A dY), and a tile's 4 columns into 6 ((A dY) A^T). Indexed with
    loop-invariant leading indices, no views: a tile's 60 views cost NRT reference counts, which took 3/4 of
    output_gradient_tiles_4x4's time at f = 32."""
    kind = t.dtype.type
    two, four, eight = kind(2), kind(4), kind(8)
    for k in range(length):
        t[j, b, k] = y[i, a, k]
    for k in range(length):
        t[j + 1, b, k] = (y[i, a, k] + y[i, a + 1, k]) + (y[i, a + 2, k] + y[i, a + 3, k])
    for k in range(length):
        t[j + 2, b, k] = (y[i, a, k] - y[i, a + 1, k]) + (y[i, a + 2, k] - y[i, a + 3, k])
    for k in range(length):
        t[j + 3, b, k] = (y[i, a, k] + two * y[i, a + 1, k]) + (four * y[i, a + 2, k] + eight * y[i, a + 3, k])
    for k in range(length):
        t[j + 4, b, k] = (y[i, a, k] - two * y[i, a + 1, k]) + (four * y[i, a + 2, k] - eight * y[i, a + 3, k])
    for k in range(length):
        t[j + 5, b, k] = y[i, a + 3, k]


@numba.njit(inline="always", **JIT)
def _gradient_columns_4x4(band, s, tile, dm):
    """(A dY) A^T of the tile whose 4 columns start at band column s: the same combinations along each of the 6
    rows, into dm's 36 taps of `tile`."""
    for i in range(6):
        _a_combinations(band, i, s, dm, 6 * i, tile, band.shape[2])


@numba.njit(**JIT)
def output_gradient_tiles_4x4(g, tiles_h, tiles_w, dm):
    """g (n, out_h, out_w, f) -> dm (36, n * tiles_h * tiles_w, f): A dY A^T of every 4x4 block dY of the output
    gradient, zeros past its last row or column (the ragged tiles' outputs were cropped, so had no gradient). A dY
    of a band of 4 rows at once, each of its 6 rows one loop over out_w * f floats (into a band whose columns past
    the output stay zero; a last band of fewer rows is copied into a buffer of 4 whose other rows stay zero), then
    each tile's columns, one loop over the filters per tap (input_tiles_4x4's order)."""
    n, out_h, out_w, f = g.shape
    band = np.zeros((6, 4 * tiles_w, f), g.dtype)
    rows = band.reshape(6, 1, 4 * tiles_w * f)
    length = out_w * f
    edge = np.zeros((1, 4, length), g.dtype)
    for b in range(n):
        image = g[b].reshape(1, out_h, length)
        for ti in range(tiles_h):
            r = 4 * ti
            if r + 4 <= out_h:
                _a_combinations(image, 0, r, rows, 0, 0, length)
            else:
                for p in range(out_h - r):
                    for k in range(length):
                        edge[0, p, k] = image[0, r + p, k]
                _a_combinations(edge, 0, 0, rows, 0, 0, length)
            for tj in range(tiles_w):
                _gradient_columns_4x4(band, 4 * tj, (b * tiles_h + ti) * tiles_w + tj, dm)


@numba.njit(**JIT)
def input_gradient_tiles_4x4(dv, top, left, tiles_h, tiles_w, dx):
    """dv (36, n * tiles_h * tiles_w, c) -> dx (n, height, width, c), the input's gradient, overwritten: B dV B^T
    of every 6x6 tile added into its window at stride 4 (neighbours overlap by 2 rows or columns), the windows
    placed as input_tiles_4x4 reads them; rows and columns outside x are dropped. A tile row at a time: dV B^T of
    each tile into a band of 6 rows across the row's tiles (the overlapping columns added, in tile order), then
    B^T's combinations of the band's rows, each output row one loop over width * c floats, written where no tile
    row before reached it, else added. B^T's columns: (4, 0, 0, 0, 0, 0), (0, -4, 4, -2, 2, 4),
    (-5, -4, -4, -1, -1, 0), (0, 1, -1, 2, -2, -5), (1, 1, 1, 1, 1, 0), (0, 0, 0, 0, 0, 1)."""
    n, height, width, c = dx.shape
    kind = dx.dtype.type
    two, four, five = kind(2), kind(4), kind(5)
    span = max(4 * tiles_w + 2, left + width)
    band = np.zeros((6, span, c), dx.dtype)
    rows = band.reshape(6, span * c)
    length, inside = width * c, left * c
    for b in range(n):
        image = dx[b].reshape(height, length)
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                s = 4 * tj
                for i in range(6):  # dV B^T: row i of the tile's 6 columns (indexed: views cost NRT counts)
                    a = 6 * i
                    if tj == 0:
                        for ch in range(c):
                            band[i, s, ch] = four * dv[a, tile, ch]
                        for ch in range(c):
                            band[i, s + 1, ch] = ((four * (dv[a + 2, tile, ch] - dv[a + 1, tile, ch])
                                                   + two * (dv[a + 4, tile, ch] - dv[a + 3, tile, ch]))
                                                  + four * dv[a + 5, tile, ch])
                    else:  # the columns the tile before reached
                        for ch in range(c):
                            band[i, s, ch] += four * dv[a, tile, ch]
                        for ch in range(c):
                            band[i, s + 1, ch] += ((four * (dv[a + 2, tile, ch] - dv[a + 1, tile, ch])
                                                    + two * (dv[a + 4, tile, ch] - dv[a + 3, tile, ch]))
                                                   + four * dv[a + 5, tile, ch])
                    for ch in range(c):
                        band[i, s + 2, ch] = -((five * dv[a, tile, ch] + four * (dv[a + 1, tile, ch]
                                                                                 + dv[a + 2, tile, ch]))
                                               + (dv[a + 3, tile, ch] + dv[a + 4, tile, ch]))
                    for ch in range(c):
                        band[i, s + 3, ch] = (((dv[a + 1, tile, ch] - dv[a + 2, tile, ch])
                                               + two * (dv[a + 3, tile, ch] - dv[a + 4, tile, ch]))
                                              - five * dv[a + 5, tile, ch])
                    for ch in range(c):
                        band[i, s + 4, ch] = ((dv[a, tile, ch] + (dv[a + 1, tile, ch] + dv[a + 2, tile, ch]))
                                              + (dv[a + 3, tile, ch] + dv[a + 4, tile, ch]))
                    for ch in range(c):
                        band[i, s + 5, ch] = dv[a + 5, tile, ch]
            lo, hi = inside, inside + length
            d0, d1, d2 = rows[0, lo:hi], rows[1, lo:hi], rows[2, lo:hi]
            d3, d4, d5 = rows[3, lo:hi], rows[4, lo:hi], rows[5, lo:hi]
            for p in range(6):  # B (dV B^T): the same combinations down the band's rows
                r = 4 * ti - top + p
                if r < 0 or r >= height:
                    continue
                out = image[r]
                fresh = ti == 0 or p >= 2  # rows 0 and 1 of a tile row are rows 4 and 5 of the one before
                if p == 0:
                    if fresh:
                        for k in range(length):
                            out[k] = four * d0[k]
                    else:
                        for k in range(length):
                            out[k] += four * d0[k]
                elif p == 1:
                    if fresh:
                        for k in range(length):
                            out[k] = (four * (d2[k] - d1[k]) + two * (d4[k] - d3[k])) + four * d5[k]
                    else:
                        for k in range(length):
                            out[k] += (four * (d2[k] - d1[k]) + two * (d4[k] - d3[k])) + four * d5[k]
                elif p == 2:
                    for k in range(length):
                        out[k] = -((five * d0[k] + four * (d1[k] + d2[k])) + (d3[k] + d4[k]))
                elif p == 3:
                    for k in range(length):
                        out[k] = ((d1[k] - d2[k]) + two * (d3[k] - d4[k])) - five * d5[k]
                elif p == 4:
                    for k in range(length):
                        out[k] = (d0[k] + (d1[k] + d2[k])) + (d3[k] + d4[k])
                else:
                    for k in range(length):
                        out[k] = d5[k]


@numba.njit(**JIT)
def pooled_gradient_tiles_4x4(g, arg, y, relu, pool_h, pool_w, tiles_h, tiles_w, dm):
    """The backward of output_tiles_mixed_pooled in training (every block 4x4): g (n, pooled_h, pooled_w, f), the
    pooled output's gradient, times y > 0 where `relu` (its output y: the ReLU's mask), goes to where `arg` says each
    maximum came from, zeros elsewhere, and each 4x4 block of that conv-output gradient to dm (36, n * tiles_h *
    tiles_w, f) as output_gradient_tiles_4x4 takes it, the same bits as pooling.max_pool_backward followed by it: each
    band of 4 output rows is made in a buffer (in L1) and never written out whole."""
    n, pooled_h, pooled_w, f = g.shape
    width = 4 * tiles_w
    band = np.zeros((6, width, f), g.dtype)
    rows = band.reshape(6, 1, width * f)
    dy = np.empty((4, width, f), g.dtype)
    band_dy = dy.reshape(1, 4, width * f)  # as _a_combinations indexes it
    zero, one = g.dtype.type(0), g.dtype.type(1)
    across = 4 // pool_h  # pooled rows per band
    for b in range(n):
        for ti in range(tiles_h):
            for r in range(4):
                for k in range(width * f):
                    band_dy[0, r, k] = zero
            for wi in range(min(across, pooled_h - ti * across)):
                i = ti * across + wi
                for j in range(pooled_w):
                    grad, where, mask = g[b, i, j], arg[b, i, j], y[b, i, j]
                    for k in range(pool_h * pool_w):
                        out = dy[wi * pool_h + k // pool_w, j * pool_w + k % pool_w]
                        for ch in range(f):
                            v = relu_gate(grad[ch], mask[ch], zero, one) if relu else grad[ch]
                            out[ch] = v if where[ch] == k else zero
            _a_combinations(band_dy, 0, 0, rows, 0, 0, width * f)
            for tj in range(tiles_w):
                _gradient_columns_4x4(band, 4 * tj, (b * tiles_h + ti) * tiles_w + tj, dm)


# F(3x3, 3x3) in training (small outputs): A's rows (1, 0, 0), (1, 1, 1), (1, -1, 1), (1, 2, 4), (0, 0, 1); B^T's
# columns (2, 0, 0, 0, 0), (-1, -2, 2, -1, 2), (-2, -1, -3, 0, -1), (1, 1, 1, 1, -2), (0, 0, 0, 0, 1). Each tile
# goes through a tile-sized buffer (in L1), as input_tiles_3x3 and output_tiles_3x3.


@numba.njit(**JIT)
def output_gradient_tiles_3x3(g, tiles_h, tiles_w, dm):
    """g (n, out_h, out_w, f) -> dm (25, n * tiles_h * tiles_w, f): A dY A^T of every 3x3 block dY of the output
    gradient, zeros past its last row or column: A dY column by column into a buffer, then along each row."""
    n, out_h, out_w, f = g.shape
    kind = g.dtype.type
    two, four = kind(2), kind(4)
    zero = np.zeros(f, g.dtype)
    t = np.empty((5, 3, f), g.dtype)
    for b in range(n):
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                r = 3 * ti
                for j in range(3):
                    s = 3 * tj + j
                    inside = s < out_w
                    y0 = g[b, r, s] if inside else zero
                    y1 = g[b, r + 1, s] if inside and r + 1 < out_h else zero
                    y2 = g[b, r + 2, s] if inside and r + 2 < out_h else zero
                    for ch in range(f):
                        t[0, j, ch] = y0[ch]
                    for ch in range(f):
                        t[1, j, ch] = (y0[ch] + y1[ch]) + y2[ch]
                    for ch in range(f):
                        t[2, j, ch] = (y0[ch] - y1[ch]) + y2[ch]
                    for ch in range(f):
                        t[3, j, ch] = (y0[ch] + two * y1[ch]) + four * y2[ch]
                    for ch in range(f):
                        t[4, j, ch] = y2[ch]
                for i in range(5):  # (A dY) A^T: the same combinations along the row
                    for ch in range(f):
                        dm[5 * i, tile, ch] = t[i, 0, ch]
                    for ch in range(f):
                        dm[5 * i + 1, tile, ch] = (t[i, 0, ch] + t[i, 1, ch]) + t[i, 2, ch]
                    for ch in range(f):
                        dm[5 * i + 2, tile, ch] = (t[i, 0, ch] - t[i, 1, ch]) + t[i, 2, ch]
                    for ch in range(f):
                        dm[5 * i + 3, tile, ch] = (t[i, 0, ch] + two * t[i, 1, ch]) + four * t[i, 2, ch]
                    for ch in range(f):
                        dm[5 * i + 4, tile, ch] = t[i, 2, ch]


@numba.njit(**JIT)
def input_gradient_tiles_3x3(dv, top, left, tiles_h, tiles_w, dx):
    """dv (25, n * tiles_h * tiles_w, c) -> dx (n, height, width, c), the input's gradient, overwritten: B dV B^T
    of every 5x5 tile added into its window at stride 3 (neighbours overlap by 2), placed as input_tiles_3x3 reads
    them; rows and columns outside x are dropped. dV B^T row by row into a buffer, then down each column."""
    n, height, width, c = dx.shape
    kind = dx.dtype.type
    two, three, zero = kind(2), kind(3), kind(0)
    s = np.empty((5, 5, c), dx.dtype)
    for b in range(n):
        for r in range(height):
            for q in range(width):
                for ch in range(c):
                    dx[b, r, q, ch] = zero
        for ti in range(tiles_h):
            for tj in range(tiles_w):
                tile = (b * tiles_h + ti) * tiles_w + tj
                for i in range(5):  # dV B^T
                    v0, v1, v2, v3, v4 = dv[5 * i, tile], dv[5 * i + 1, tile], dv[5 * i + 2, tile], \
                        dv[5 * i + 3, tile], dv[5 * i + 4, tile]
                    for ch in range(c):
                        s[i, 0, ch] = two * v0[ch]
                    for ch in range(c):
                        s[i, 1, ch] = two * ((v2[ch] - v1[ch]) + v4[ch]) - (v0[ch] + v3[ch])
                    for ch in range(c):
                        s[i, 2, ch] = -((two * v0[ch] + v1[ch]) + (three * v2[ch] + v4[ch]))
                    for ch in range(c):
                        s[i, 3, ch] = ((v0[ch] + v1[ch]) + (v2[ch] + v3[ch])) - two * v4[ch]
                    for ch in range(c):
                        s[i, 4, ch] = v4[ch]
                for q in range(5):  # B (dV B^T), added in place
                    col = 3 * tj - left + q
                    if col < 0 or col >= width:
                        continue
                    for p in range(5):
                        r = 3 * ti - top + p
                        if r < 0 or r >= height:
                            continue
                        out = dx[b, r, col]
                        if p == 0:
                            for ch in range(c):
                                out[ch] += two * s[0, q, ch]
                        elif p == 1:
                            for ch in range(c):
                                out[ch] += (two * ((s[2, q, ch] - s[1, q, ch]) + s[4, q, ch])
                                            - (s[0, q, ch] + s[3, q, ch]))
                        elif p == 2:
                            for ch in range(c):
                                out[ch] += -((two * s[0, q, ch] + s[1, q, ch]) + (three * s[2, q, ch] + s[4, q, ch]))
                        elif p == 3:
                            for ch in range(c):
                                out[ch] += (((s[0, q, ch] + s[1, q, ch]) + (s[2, q, ch] + s[3, q, ch]))
                                            - two * s[4, q, ch])
                        else:
                            for ch in range(c):
                                out[ch] += s[4, q, ch]


# The kernel's transforms of F(3x3) and F(4x4), whose G holds sixths: U = G k G^T (forward) and the kernel's
# gradient G^T dU G (backward), in float64 sums rounded once to the kernel's type. NumPy's float64 matmuls made
# (t, 3, c * f) and (t, t, c * f) temporaries: 0.05-0.6 ms a call for the book convnet's convs 2 and 3 at t = 5, 6,
# which ran on the caller while the lanes waited. A block of STEP floats of every tap at a time (in L1 and L2).
STEP = 256


@numba.njit(**JIT)
def kernel_tiles(k, rows, cols, u):
    """k (9, n): a 3x3 kernel's taps (row-major) of n = c * f floats each -> u (t_h * t_w, n) = G_h k G_w^T, the
    G's (t_h, 3) and (t_w, 3) float64: G_h k first, t_h x 3 rows of a block into a float64 buffer, then
    (G_h k) G_w^T."""
    t_h, t_w, n = rows.shape[0], cols.shape[0], k.shape[1]
    gk = np.empty((t_h, 3, STEP))
    for e0 in range(0, n, STEP):
        m = min(STEP, n - e0)
        for a in range(t_h):
            g0, g1, g2 = rows[a, 0], rows[a, 1], rows[a, 2]
            for j in range(3):
                row, k0, k1, k2 = gk[a, j], k[j, e0:e0 + m], k[3 + j, e0:e0 + m], k[6 + j, e0:e0 + m]
                for e in range(m):
                    row[e] = (g0 * k0[e] + g1 * k1[e]) + g2 * k2[e]
        for a in range(t_h):
            r0, r1, r2 = gk[a, 0], gk[a, 1], gk[a, 2]
            for b in range(t_w):
                out, h0, h1, h2 = u[a * t_w + b, e0:e0 + m], cols[b, 0], cols[b, 1], cols[b, 2]
                for e in range(m):
                    out[e] = (h0 * r0[e] + h1 * r1[e]) + h2 * r2[e]


@numba.njit(**JIT)
def kernel_gradient(du, g, dw):
    """du (t * t, n), the gradient of U = G k G^T -> dw (9, n) = G^T dU G, the 3x3 kernel's taps (row-major):
    dU G first (t x 3 rows of a block, float64), then G^T (dU G), each sum in tap order, G's zeros skipped."""
    t, n = g.shape[0], du.shape[1]
    p = np.empty((t, 3, STEP))
    acc = np.empty(STEP)
    for e0 in range(0, n, STEP):
        m = min(STEP, n - e0)
        for a in range(t):
            for j in range(3):
                row = p[a, j]
                for e in range(m):
                    row[e] = 0.0
                for b in range(t):
                    w = g[b, j]
                    if w != 0.0:
                        src = du[a * t + b, e0:e0 + m]
                        for e in range(m):
                            row[e] += w * src[e]
        for i in range(3):
            for j in range(3):
                for e in range(m):
                    acc[e] = 0.0
                for a in range(t):
                    w = g[a, i]
                    if w != 0.0:
                        row = p[a, j]
                        for e in range(m):
                            acc[e] += w * row[e]
                out = dw[3 * i + j, e0:e0 + m]
                for e in range(m):
                    out[e] = acc[e]
