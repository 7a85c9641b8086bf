"""Pure convolution/pooling arithmetic for channels_last arrays with 1, 2 or 3 spatial axes.

Layout: x is (batch, *spatial, channels). `im2col` gathers patches as (batch, *out_spatial, *kernel, channels), so a
Keras kernel (*kernel, in, out) reshaped to (prod(kernel) * in, out) turns a convolution into one contiguous matmul.
Every function loops over kernel offsets only (prod(kernel) iterations), never over samples or output positions.
Max pooling also has Numba kernels (dlcli/kernels/pooling.py); the *_numpy functions here are their reference twins.
"""
import itertools

import numpy as np
from numpy.lib.stride_tricks import as_strided

from dlcli import kernels
from dlcli.engine import blas, lanes
from dlcli.errors import ConfigError, ShapeError

PADDINGS = ("valid", "same")
# im2col copies patches with this many channels or more in one strided copy (each patch row is a block); fewer,
# tap by tap along the output rows, best into a transposed buffer (conv.py)
BLOCK_CHANNELS = 8
# Convolutions gather (im2col) and scatter (col2im) about this many floats at a time, a core's L2 (1 MiB on Zen 4)
CHUNK_FLOATS = 1 << 18


def as_tuple(value, rank: int, what: str, layer: str) -> tuple[int, ...]:
    """An int or a list of `rank` ints (Keras accepts both for kernel_size, strides, ...)."""
    if isinstance(value, (int, np.integer)):
        values = (int(value),) * rank
    else:
        values = tuple(int(v) for v in value)
    if len(values) != rank or any(v < 1 for v in values):
        raise ConfigError(f"{layer}: {what} must be a positive int or a list of {rank} positive ints; got {value!r}")
    return values


def effective(kernel, dilation) -> tuple[int, ...]:
    return tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))


def geometry(sizes, kernel, strides, padding, dilation):
    """Output sizes and (before, after) pads per spatial axis, as TensorFlow computes them.

    'same' puts the odd extra pad at the end (bottom/right), like TF/Keras; 'causal' (Conv1D) pads only the start.
    A valid output size below 1 is returned as is: the caller names the layer in the error.
    """
    out, pads = [], []
    for n, k, s in zip(sizes, effective(kernel, dilation), strides):
        if padding == "valid":
            out.append((n - k) // s + 1 if n >= k else n - k + 1)
            pads.append((0, 0))
        elif padding == "causal":
            out.append((n - 1) // s + 1)
            pads.append((k - 1, 0))
        else:
            m = -(-n // s)
            total = max((m - 1) * s + k - n, 0)
            out.append(m)
            pads.append((total // 2, total - total // 2))
    return tuple(out), tuple(pads)


def spatial_geometry(layer, input_shape, rank, kernel, strides, padding, dilation=None):
    """`geometry` for a layer's input shape (no batch axis; None for unknown lengths), naming the layer on errors."""
    kind = type(layer).__name__
    if len(input_shape) != rank + 1:
        axes = ", ".join(["steps"] if rank == 1 else [f"dim{i + 1}" for i in range(rank)])
        got = ", ".join(map(str, input_shape))
        if len(input_shape) == rank:  # the usual slip: images without their channel axis
            hint = (f"Images need a channel axis: set the input shape to [{got}, 1] (or add "
                    f"{{type: Reshape, target_shape: [{got}, 1]}} before it).")
        elif len(input_shape) >= 2:
            hint = f"Use the {len(input_shape) - 1}D variant or add a Reshape layer before it."
        else:
            hint = "It needs spatial input: is it placed after a layer that already flattened the data?"
        raise ShapeError(f"{kind} '{layer.name}' expects inputs of shape (batch, {axes}, channels); got "
                         f"(None, {got}). {hint}")
    dilation = dilation or (1,) * rank
    sizes = input_shape[:-1]
    out, pads = geometry([1 if n is None else n for n in sizes], kernel, strides, padding, dilation)
    if any(m < 1 for m, n in zip(out, sizes) if n is not None):
        raise ShapeError(f"{kind} '{layer.name}': its window {tuple(effective(kernel, dilation))} (kernel/pool size "
                         f"after dilation) is larger than its input {tuple(sizes)} with padding='{padding}', so the "
                         f"output would be empty. Use padding='same', a smaller window or fewer downsampling layers "
                         f"before it.")
    return tuple(None if n is None else m for m, n in zip(out, sizes)), pads


def window(offset, out_sizes, strides, dilation=None) -> tuple:
    """Index into a padded (batch, *spatial, channels) array: the input element every output position reads for
    one kernel offset."""
    dilation = dilation or (1,) * len(offset)
    return (slice(None),) + tuple(slice(o * d, o * d + s * (m - 1) + 1, s)
                                  for o, m, s, d in zip(offset, out_sizes, strides, dilation))


def offsets(kernel):
    return itertools.product(*(range(k) for k in kernel))


def pad(x, pads, value=0.0):
    """x padded on its spatial axes with `value` (a new array; x itself when nothing is padded)."""
    if not any(a or b for a, b in pads):
        return x
    xp = np.full(padded_shape(x.shape, pads), value, x.dtype)
    xp[interior(pads, x.shape)] = x
    return xp


def padded_shape(shape, pads) -> tuple:
    """The shape of pad(x, pads) for x of `shape` (batch, *spatial, channels)."""
    return (shape[0], *(n + a + b for n, (a, b) in zip(shape[1:-1], pads)), shape[-1])


def interior(pads, shape) -> tuple:
    return (slice(None),) + tuple(slice(a, a + n) for (a, _), n in zip(pads, shape[1:-1])) + (slice(None),)


def unpad(xp, pads):
    if not any(a or b for a, b in pads):
        return xp
    return xp[(slice(None),) + tuple(slice(a, xp.shape[i + 1] - b) for i, (a, b) in enumerate(pads))]


def im2col(xp, kernel, out_sizes, strides, dilation, out=None):
    """Patches (batch, *out_sizes, *kernel, channels) of a padded input; `out` is an optional reusable buffer."""
    rank = len(kernel)
    shape = (xp.shape[0], *out_sizes, *kernel, xp.shape[-1])
    cols = out if out is not None and out.shape == shape and out.dtype == xp.dtype else np.empty(shape, xp.dtype)
    if xp.shape[-1] >= BLOCK_CHANNELS:
        np.copyto(cols, patches(xp, kernel, out_sizes, strides, dilation))
        return cols
    lead = (slice(None),) * (1 + rank)
    for offset in offsets(kernel):
        cols[lead + offset] = xp[window(offset, out_sizes, strides, dilation)]
    return cols


def padded_patches(x, pads, kernel, out_sizes, strides, dilation, out):
    """im2col(pad(x, pads), ...) into `out`. Where x is padded (1D or 2D, BLOCK_CHANNELS channels or more, `out`
    contiguous) compiled, reading x itself (kernels/conv.im2col), where the twin pads a copy first: the resnet's
    stride-2 conv's forward in training steps, one thread, thread CPU, steps alternating, load 9.3, best / median
    0.97 / 1.09 -> 0.81 / 0.95 ms. Unpadded, the twin's one strided copy measured as fast or faster there (its 1x1
    projection 0.23 / 0.32 against 0.25 / 0.38), and into patch rows beside the bias's column of ones, a strided
    `out`, the compiled loop does not vectorise (55 us a chunk of that conv against the twin's 45). Laid out tap-major
    (tap_rows: few channels) kernels/conv.im2col_taps copies whole output rows, the padding's zeros included."""
    padded, rank = any(a or b for a, b in pads), len(kernel)
    compiled = kernels.compiled("conv") if (padded and rank in (1, 2) and x.dtype in (np.float32, np.float64)
                                            and out.size) else None
    if compiled is None or not _compiled_patches(compiled, x, pads, kernel, strides, dilation, out):
        return im2col(pad(x, pads), kernel, out_sizes, strides, dilation, out=out)
    return out


def _compiled_patches(compiled, x, pads, kernel, strides, dilation, out) -> bool:
    """padded_patches' compiled gathers into `out` where one applies (True where it wrote it): a tap-major layout,
    or BLOCK_CHANNELS channels or more into a contiguous `out`."""
    if len(kernel) == 1:  # as 2D of height 1
        x, out, pads = x[:, None], out[:, None, :, None], ((0, 0), *pads)
        kernel, strides, dilation = (1, *kernel), (1, *strides), (1, *dilation)
    row = tap_rows(out)
    if row is not None:  # few channels' layout (Conv._patch_buffer): channels first, as the kernel reads them
        flat = as_strided(out, ((out[0, 0, 0].size - 1) * row + out[..., 0, 0, 0].size,), (out.itemsize,))
        compiled.im2col_taps(np.ascontiguousarray(np.moveaxis(x, -1, 1)), pads[0][0], pads[1][0], *kernel, *strides,
                             *dilation, *out.shape[1:3], row, flat)
        return True
    if x.shape[-1] >= BLOCK_CHANNELS and out.flags.c_contiguous:
        compiled.im2col(x, pads[0][0], pads[1][0], *kernel, *strides, *dilation, out)
        return True
    return False


def tap_rows(out):
    """How many elements apart patch array out's (n, out_h, out_w, kh, kw, c) taps lie where it is laid out tap-major,
    each tap's positions contiguous and the taps evenly spaced (Conv._patch_buffer's few-channel layout); else None."""
    if not out[:, :, :, 0, 0, 0].flags.c_contiguous:
        return None
    taps = [(size, stride // out.itemsize) for size, stride in zip(out.shape[3:], out.strides[3:])]
    row = min([stride for size, stride in taps if size > 1], default=0)
    inner = 1
    for size, stride in reversed(taps):
        if size > 1 and stride != row * inner:
            return None
        inner *= size
    return row if row >= out[..., 0, 0, 0].size or out[0, 0, 0].size == 1 else None


def patches(xp, kernel, out_sizes, strides, dilation):
    """A read-only (batch, *out_sizes, *kernel, channels) view of xp's patches: no copy."""
    step = xp.strides[1:-1]
    return as_strided(xp, (xp.shape[0], *out_sizes, *kernel, xp.shape[-1]),
                      (xp.strides[0], *(a * s for a, s in zip(step, strides)), *(a * d for a, d in zip(step, dilation)),
                       xp.strides[-1]), writeable=False)


def col2im_matmul(a2, kernel, padded_shape, out_sizes, strides, dilation):
    """sum over kernel offsets of (a2 @ kernel[offset].T) scattered into a zero padded-input-shaped array.

    With a Keras conv kernel (*k, in, out) and a2 the output gradient (positions, out) this is the input gradient
    of a convolution; with a transposed-conv kernel (*k, out, in) and a2 its input it is that layer's forward
    pass. Compiled (1D and 2D): one GEMM for every offset at once, then the scatter (dlcli/kernels/conv.py).
    """
    compiled = kernels.compiled("conv") if len(out_sizes) in (1, 2) else None
    if compiled is None:
        return col2im_matmul_numpy(a2, kernel, padded_shape, out_sizes, strides, dilation)
    taps, n, per_sample = kernel.shape[:-2], padded_shape[0], int(np.prod(out_sizes))
    # (in, taps * out_channels): each offset's product at once; a copy, its rows contiguous for blas.product
    weights = np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)
    dxp = np.empty(padded_shape, a2.dtype)
    if len(taps) == 1:  # 1D as 2D of height 1
        taps, strides, dilation, out_sizes = (1, *taps), (1, *strides), (1, *dilation), (1, *out_sizes)
    # a few samples at a time: their products stay in cache for the scatter, and the buffer is reused; the chunks
    # are the lanes' parts (engine/lanes.py), each lane with a buffer of its own
    chunk = max(1, CHUNK_FLOATS // (per_sample * weights.shape[1]))

    def scatter(run):
        products = np.empty((max(b - a for a, b in run) * per_sample, weights.shape[1]), a2.dtype)
        for start, stop in run:
            part = products[:(stop - start) * per_sample]
            blas.product(a2[start * per_sample:stop * per_sample], weights, out=part)
            compiled.col2im(part.reshape(stop - start, *out_sizes, -1), *taps, *strides, *dilation,
                            dxp[start:stop] if dxp.ndim == 4 else dxp[start:stop, None])
        return run
    lanes.run(scatter, even_chunks(n, chunk))
    return dxp


def even_chunks(n, most):
    """[(start, stop)] of n samples in the fewest chunks of at most `most`, of sizes differing by one at most: the
    lanes get equal work (64 samples in chunks of 7 were 9 of 7 and one of 1, 35 samples on one lane and 29 on the
    other; now 6 and 7, 32 each)."""
    return lanes.split(n, -(-n // most))


def col2im_matmul_numpy(a2, kernel, padded_shape, out_sizes, strides, dilation):
    """The twin: one small matmul per offset, added into place (in NumPy this beats one big matmul plus a strided
    col2im: its result is contiguous)."""
    dxp = np.zeros(padded_shape, a2.dtype)
    tmp = np.empty((a2.shape[0], kernel.shape[-2]), a2.dtype)
    block = (padded_shape[0], *out_sizes, kernel.shape[-2])
    for offset in offsets(kernel.shape[:-2]):
        np.dot(a2, kernel[offset].T, out=tmp)
        dxp[window(offset, out_sizes, strides, dilation)] += tmp.reshape(block)
    return dxp


# The chunks of a convolution run on lanes come in multiples of this many (2 or 4 lanes share them evenly); a conv
# whose patches are kept from forward for backward (few channels or few patches) has exactly this many
KEPT_CHUNKS = 4
# Winograd's F(2x2, 3x3) (kernels/winograd.py) replaces im2col + GEMM for 3x3 stride-1 convolutions with at least
# this many input channels (its forward GEMMs have the channels as their inner dimension), in training and inference.
# Training step, thread CPU forward / backward at batch 64, one BLAS thread, load ~10, im2col -> Winograd:
# 14x14x8 -> 16 'same' 0.92 / 1.70 -> 1.03 / 1.78 ms (a loss), 14x14x16 -> 32 2.17 / 4.29 -> 1.84 / 2.73,
# 12x12x16 -> 16 'valid' 0.72 / 1.40 -> 0.80 / 1.04
WINOGRAD_MIN_CHANNELS = 16
# G of F(2x2, 3x3): U = G g G^T turns a 3x3 kernel into the 4x4 one the tiles are multiplied with
WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
# G of F(4x4, 3x3) (inference): the 6x6 kernel of 6x6 tiles, computed in float64 (1/6 and 1/12 are not exact)
WINOGRAD_G_4X4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                           [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
# G of F(3x3, 3x3) (inference, small outputs): the 5x5 kernel of 5x5 tiles, in float64 as F(4x4)'s (sixths)
WINOGRAD_G_3X3 = np.array([[1 / 2, 0, 0], [-1 / 2, -1 / 2, -1 / 2], [-1 / 6, 1 / 6, -1 / 6], [1 / 6, 1 / 3, 2 / 3],
                           [0, 0, 1]])
WINOGRAD_GS = {2: WINOGRAD_G, 3: WINOGRAD_G_3X3, 4: WINOGRAD_G_4X4}  # by output block


def winograd_shaped(kernel_shape, strides, dilation, groups) -> bool:
    """A plain 3x3 stride-1 2D convolution with enough input channels."""
    return (tuple(kernel_shape[:2]) == (3, 3) and len(kernel_shape) == 4 and kernel_shape[2] >= WINOGRAD_MIN_CHANNELS
            and tuple(strides) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1)


def winograd_applies(kernel_shape, strides, dilation, groups) -> bool:
    """A plain 3x3 stride-1 2D convolution with enough input channels, and the compiled kernels to run it."""
    return winograd_shaped(kernel_shape, strides, dilation, groups) and kernels.compiled("winograd") is not None


def winograd_pools(out_sizes, pool) -> bool:
    """Whether an inference forward can pool its output in F(4x4)'s output transform (winograd_conv's `pooled`):
    4x4 output blocks, each holding whole windows of a max pooling whose windows tile the output (sizes dividing
    4: the book convnet's 2x2), on outputs of 7 rows and columns or more (where F(4x4) beats F(2x2); at some of
    them, 9x9 say, F(3x3) has fewer products, but the pooled transform also saves writing the output whole)."""
    return min(out_sizes) >= 7 and all(4 % p == 0 for p in pool)


def winograd_tiles(out_sizes, block=2):
    """(tiles_h, tiles_w): block x block output blocks (2, or 3 or 4 at inference) per column and row, the last ragged
    where the size is not a multiple."""
    return -(-out_sizes[0] // block), -(-out_sizes[1] // block)


def winograd_block(out_sizes) -> int:
    """The output block of an inference forward: the one with the fewest products, F(2x2)'s 16 per 2x2 block from
    4x4 tiles, F(3x3)'s 25 per 3x3 block from 5x5 tiles or F(4x4)'s 36 per 4x4 block from 6x6 tiles, counting the
    ragged last tiles whole (a tie to the smaller tile, whose transforms cost less). Thread CPU per inference
    forward, one BLAS thread, AMD EPYC at load 3.5-3.8, best of 15 alternating, F(2x2) / F(3x3) / F(4x4): the book
    convnet's conv 3 (512 x 5x5x64 -> 3x3x64) 3.92 / 1.73 / 2.39 ms; 128 samples 64 -> 64 'same' at 4x4 0.89 / 1.52
    / 0.69, 5x5 1.95 / 1.57 / 2.06, 6x6 1.90 / 1.57 / 2.09, 7x7 4.03 / 3.58 / 2.31; 64 samples 32 -> 32 at 8x8 0.66 /
    0.69 / 0.45, 9x9 1.06 / 0.75 / 0.86: the product counts rank them as measured. (Earlier, 43 samples at load
    ~15, F(2x2) / F(4x4): 11x11 32 -> 64 0.79 / 0.55, 14x14 32 -> 32 0.68 / 0.47.)"""
    def products(block):
        tiles_h, tiles_w = winograd_tiles(out_sizes, block)
        return tiles_h * tiles_w * (block + 2) ** 2
    return min((2, 3, 4), key=products)


def winograd_training_block(out_sizes, pooled=False) -> int:
    """The output block of a training forward: F(4x4) where the conv pools its output in F(4x4)'s transform
    (`pooled`), else winograd_block's, the one with the fewest products: F(4x4) at 4, 7, 8 and 10 and more rows and
    columns (the resnet's 14x14 and 7x7 convs), F(3x3) at 3, 5, 6 and 9 (the book convnet's conv 3), F(2x2) below.
    F(2x2) is the most exact (within 3 float32 eps of the largest gradient over tests/test_winograd.py's cases,
    F(3x3) and F(4x4) within 40). Forward + backward at batch 64, one thread, thread CPU, AMD EPYC at load ~6,
    best of 20 alternating, F(2x2) -> F(4x4): 14x14x32 -> 32 'same' 7.65 -> 5.92 ms with OpenBLAS's Haswell
    kernels, 5.08 -> 3.88 with its SkylakeX kernels; 7x7x64 -> 64 5.52 -> 3.70 and 3.63 -> 2.09."""
    return 4 if pooled else winograd_block(out_sizes)


def winograd_chunks(n, out_sizes, c, f, block=2):
    """[(start, stop)] of the samples transformed and multiplied at once: about 2 * CHUNK_FLOATS floats of
    tiles and products, so the GEMMs read what a transform has just written from cache, in a multiple of
    KEPT_CHUNKS chunks (so 2 or 4 lanes get equal shares: the resnet's 14x14x32 convs had 13, 7 on one lane and 6
    on the other). The lanes' parts (engine/lanes.py): they follow the shapes alone, so forward keeps, and backward
    finds, the same chunks on any number of lanes. The size matters little: thread CPU of forward + backward at batch
    64, one BLAS thread, rounds alternating, AMD EPYC at load ~12, chunks of about CHUNK_FLOATS against twice that:
    book convnet conv 2 16 chunks of 4 samples 1.63 + 3.09 ms, 8 of 8 1.56 + 2.86 (a second run 1.48 + 2.91, 1.40 +
    2.66); resnet 14x14x32 13 of 5 1.40 + 2.50, 8 of 8 1.36 + 2.52; 7x7x64 8 of 8 1.29 + 2.40, 4 of 16 1.38 + 2.60."""
    tiles_h, tiles_w = winograd_tiles(out_sizes, block)
    most = max(1, 2 * CHUNK_FLOATS // ((block + 2) ** 2 * tiles_h * tiles_w * (c + f)))
    return [(a, b) for a, b in lanes.split(n, KEPT_CHUNKS * -(-n // (KEPT_CHUNKS * most))) if a < b]


def _winograd_rows(samples, out_sizes, block=2):
    """Rows per tap of a chunk's transformed tiles: an odd count, so the taps' rows start at different cache sets
    (c and f are usually powers of 2: with an even count the output transform's 16 reads collided, 0.43 -> 0.72
    ms); the spare row is zeros, so it adds nothing to a product."""
    tiles_h, tiles_w = winograd_tiles(out_sizes, block)
    return samples * tiles_h * tiles_w | 1


def _winograd_buffer(samples, out_sizes, width, dtype, block=2):
    return _tile_buffer((block + 2) ** 2, _winograd_rows(samples, out_sizes, block), width, dtype)


def winograd_kernel(kernel, block=2, wide=None):
    """G_h k G_w^T of a (3, 3, c, f) kernel as ((block + 2) * (wide + 2), c, f), taps first (row-major): G_h of
    blocks of `block` output rows, G_w of `wide` columns (by default `block` too). F(2x2)'s G (halves) in the
    kernel's type, exact in float32; any other's (F(3)'s and F(4)'s sixths) in float64, rounded once at the end
    (kernels/winograd.kernel_tiles)."""
    c, f = kernel.shape[2:]
    wide = wide or block
    if block == wide == 2:
        g = WINOGRAD_G.astype(kernel.dtype)
        return (g @ (g @ kernel.reshape(3, -1)).reshape(4, 3, -1)).reshape(16, c, f)
    rows, cols = WINOGRAD_GS[block], WINOGRAD_GS[wide]
    u = np.empty((len(rows) * len(cols), c, f), kernel.dtype)
    kernels.compiled("winograd").kernel_tiles(np.ascontiguousarray(kernel).reshape(9, -1), rows, cols,
                                              u.reshape(len(u), -1))
    return u


_inference_kernels: dict = {}  # {(id(kernel), block, wide): (the kernel's bits then, their G_h k G_w^T)}


def inference_kernel(kernel, block, wide=None):
    """winograd_kernel(kernel, block, wide), kept for the next pass or call while the kernel keeps its bits (compared
    as integers: NaN and -0.0 too), so predict's passes share one transform where each made its own. The book
    convnet's predict at batch 512 made 15 transforms on one thread (3 passes of conv 2's four kinds of tile and conv
    3's one), 20 on two: 1.37 and 1.90 ms of CPU (AMD EPYC at load 12), now none after the first call. The bits, not
    the array, are the key: an optimizer or a user writes weights in place. Training transforms its kernel afresh
    each step (it changes every step)."""
    key = (id(kernel), block, wide)
    bits = kernel.view(f"u{kernel.itemsize}") if kernel.flags.c_contiguous else None
    kept = _inference_kernels.get(key)
    if kept is not None and bits is not None and kept[0].shape == bits.shape and np.array_equal(kept[0], bits):
        return kept[1]
    u = winograd_kernel(kernel, block, wide)
    if bits is not None:
        if len(_inference_kernels) >= 64:  # kernels of models gone (their ids may come back: the bits decide)
            _inference_kernels.clear()
        _inference_kernels[key] = (bits.copy(), u)
    return u


def winograd_conv(x, kernel, bias, out_sizes, pads, keep=None, block=None, pooled=None, arg=None, u=None):
    """conv(x, kernel) + bias for an input x (n, height, width, c) padded by `pads` ((top, bottom), (left, right):
    the transform reads the zeros, no padded copy is made) and a kernel (3, 3, c, f): each 2x2 output block from
    its 4x4 input tile, 16 GEMMs (tiles, c) @ (c, f) over the transformed tiles, a chunk of
    samples at a time (winograd_chunks) on the lanes. `keep` (a dict, {chunk start: its transformed tiles V})
    receives each chunk's V for the kernel gradient: (block + 2)^2 * tiles * c floats a sample, at batch 64 4.7 MB
    for each of the resnet's 14x14x32 convs in F(4x4) (6.4 MB in F(2x2), im2col's 9 * positions * c 14.5). Only a
    conv pooled in its pass keeps them (`keep` marks its training there); the others' backward transforms x again
    (the same V, the same bits): written to memory the tiles cost the forward more than their transform costs the
    backward. Resnet training steps under either OpenBLAS, 80-100 alternating, thread CPU, median, kept -> made again:
    b1's convs forward 1.33-1.40 -> 1.00-1.13 ms, backward 1.50-1.60 -> 1.73-1.82, the 7x7x64 ones 0.78-0.87 ->
    0.70-0.75 and 1.21-1.46 -> 1.25-1.53, the step 22.65 -> 22.42 and 22.26 -> 22.01 ms (Haswell, SkylakeX one thread)
    and 15.35 -> 15.08 (calling thread, 2 lanes, Haswell); and 16.5 MB less memory held through the step.
    Thread CPU time per inference pass of 43 samples, one BLAS thread, AMD EPYC at load 6-9, alternating with
    im2col + GEMM: book convnet conv 2 (13x13x32 -> 64) 2.57 -> 2.01 ms, conv 3 (5x5x64 -> 64, 4 tiles for 9
    outputs) 0.446 -> 0.431, the whole pass 4.31 -> 3.71. Of conv 2's 2.0 ms the 16 GEMMs take about 1.0 (100
    GFLOP/s) and each transform about 0.35. Inference takes 4x4 output blocks from 6x6 tiles (36 GEMMs) or 3x3
    blocks from 5x5 tiles (25), where winograd_block finds them faster (`block`: 2, 3 or 4; training's is
    winograd_training_block's): the book convnet's conv 2 0.79 -> 0.55 ms, its conv 3 at batch 512 3.92 -> 1.73 ms
    (one tile a sample). Error against float64 relative to the largest output there: F(2x2) 2.6e-7, F(4x4) 4.2e-6,
    im2col + GEMM 5.1e-7 (F(4x4)'s B^T and A^T hold 4, 5 and 8, its G sixths); over tests/test_winograd.py's cases
    at most 5, 16 and 28 float32 eps for F(2x2), F(3x3) and F(4x4).
    `pooled` (where winograd_pools): (pool, relu): the result is instead the max pooling of the output in `pool`
    windows at strides of their size (the rows and columns past the last whole window dropped), then max(., 0)
    where `relu`, taken in the output transform, so the output is never written whole (at inference
    _winograd_pooled). In training (`keep` and `arg`, pooled_arg's array, which receives where each maximum came
    from) every block is 4x4, F(4x4)'s tiles kept for backward: the book convnet's conv 2 and its pooling, thread
    CPU per training step at batch 64, one BLAS thread: see winograd_backward. `u`: winograd_kernel(kernel, block)
    if made already (training keeps it for backward)."""
    if pooled is not None and keep is None:
        return _winograd_pooled(x, kernel, bias, out_sizes, pads, *pooled)
    compiled = kernels.compiled("winograd")
    block = 4 if pooled is not None else block or (2 if keep is not None else winograd_block(out_sizes))
    input_tiles, output_tiles = {2: (compiled.input_tiles, compiled.output_tiles),
                                 3: (compiled.input_tiles_3x3, compiled.output_tiles_3x3),
                                 4: (compiled.input_tiles_4x4, compiled.output_tiles_4x4)}[block]
    n, c, f = x.shape[0], kernel.shape[2], kernel.shape[3]
    tiles_h, tiles_w = winograd_tiles(out_sizes, block)
    (top, _), (left, _) = pads
    if u is None:
        u = winograd_kernel(kernel, block) if keep is not None else inference_kernel(kernel, block)
    bias = np.zeros(f, kernel.dtype) if bias is None else bias
    if pooled is None:
        y = np.empty((n, *out_sizes, f), x.dtype)

        def write(m, start, stop):
            output_tiles(m, tiles_h, tiles_w, bias, y[start:stop])
    else:  # every block 4x4: the other kinds of tiles have no products (arrays never read)
        (pool_h, pool_w), relu = pooled
        y = np.empty((n, out_sizes[0] // pool_h, out_sizes[1] // pool_w, f), x.dtype)
        none = [np.empty((taps, 1, f), x.dtype) for taps in (24, 24, 16)]

        def write(m, start, stop):
            compiled.output_tiles_mixed_pooled(m, *none, tiles_h, 0, tiles_w, 0, bias, pool_h, pool_w, relu,
                                               y[start:stop], None if arg is None else arg[start:stop])
    chunks = winograd_chunks(n, out_sizes, c, f, block)
    # Fresh arrays each step: reusing the last step's measured the same, since malloc hands the freed ones back.
    # After a run's first steps glibc's dynamic mmap threshold (raised to the largest buffer freed) keeps them on
    # the heap: the resnet's training step makes 0-1 minor page faults (bench/conv_layers.py). A loop of this
    # forward alone (one thread, 14x14x32, batch 64) faults 1,736 times every other call, 3.2-5.2 ms against 1.9:
    # nothing else is allocated there, so the freed tiles are the heap's top, which malloc gives back to the kernel.
    if keep is not None:
        keep.update((start, _winograd_buffer(stop - start, out_sizes, c, x.dtype, block)) for start, stop in chunks)

    def products(run):
        most = max(stop - start for start, stop in run)
        v = None if keep is not None else _winograd_buffer(most, out_sizes, c, x.dtype, block)
        m = _winograd_buffer(most, out_sizes, f, x.dtype, block)
        for start, stop in run:
            # a smaller chunk: the first floats of the lane's buffers, contiguous (the spare zero row stays last)
            v_part = keep[start] if keep is not None else _rows_of(v, stop - start, out_sizes, block)
            m_part = _rows_of(m, stop - start, out_sizes, block)
            input_tiles(x[start:stop], top, left, tiles_h, tiles_w, v_part)
            blas.product(v_part, u, m_part)
            write(m_part, start, stop)
        return run
    lanes.run(products, chunks)
    return y


def _rows_of(buffer, samples, out_sizes, block=2):
    """A chunk's view of a lane's buffer, contiguous (the compiled transforms take each tap's rows as one vector):
    its rows of every tap, the spare row zeroed (rows of another chunk's layout may have been there)."""
    return _first_rows(buffer, _winograd_rows(samples, out_sizes, block))


def _first_rows(buffer, rows):
    if rows == buffer.shape[1]:
        part = buffer
    else:
        part = buffer.reshape(-1)[:len(buffer) * rows * buffer.shape[2]].reshape(len(buffer), rows, -1)
    part[:, rows - 1] = 0
    return part


def winograd_mixed_blocks(used) -> tuple[int, int]:
    """(blocks of 4, blocks of 2) of a pooled F(4x4)'s tiling of the `used` output rows (or columns): 4s, then one
    of 2 where 1 or 2 rows remain (3 remaining take a block of 4, its last row cropped)."""
    full, rest = divmod(used, 4)
    return (full, 1) if rest in (1, 2) else (full + (rest == 3), 0)


def _winograd_pooled(x, kernel, bias, out_sizes, pads, pool, relu):
    """winograd_conv's `pooled`: the max pooling in `pool` windows (then the relu) of conv(x, kernel) + bias, taken
    in the output transform, only the outputs the windows read computed: blocks of 4x4 from 6x6 tiles, the last row
    of blocks 2 high and the last column 2 wide where the windows read 4k + 2 rows or columns
    (kernels/winograd.input_tiles_mixed). The book convnet's conv 2 (11x11 outputs, 10x10 read) makes 256 products
    a sample per channel pair, not F(4x4)'s 324 (the transforms of the thinner tiles cost more per output). One
    thread, thread CPU, alternating call by call with every block 4x4 (the same kernels) in one process, AMD EPYC at
    load 7, two runs: a pass of 128 samples best / median 3.15-3.21 / 3.68-3.69 -> 2.80-2.93 / 3.23-3.30 ms; the
    book convnet's predict at batch 512 20.5 / 21.3-25.4 -> 18.8-19.1 / 20.0-23.8 ms."""
    compiled = kernels.compiled("winograd")
    n, c, f = x.shape[0], kernel.shape[2], kernel.shape[3]
    (top, _), (left, _) = pads
    (pool_h, pool_w) = pool
    pooled_sizes = (out_sizes[0] // pool_h, out_sizes[1] // pool_w)
    rows4, rows2 = winograd_mixed_blocks(pooled_sizes[0] * pool_h)
    cols4, cols2 = winograd_mixed_blocks(pooled_sizes[1] * pool_w)
    kinds = [(rows4 * cols4, 4, 4), (rows4 * cols2, 4, 2), (rows2 * cols4, 2, 4), (rows2 * cols2, 2, 2)]
    us = [inference_kernel(kernel, high, wide) for _, high, wide in kinds]  # (tiles a sample, block height, width)
    bias = np.zeros(f, kernel.dtype) if bias is None else bias
    y = np.empty((n, *pooled_sizes, f), x.dtype)

    def products(run):
        most = max(stop - start for start, stop in run)
        vs = [_tile_buffer(len(u), most * tiles | 1, c, x.dtype) for u, (tiles, _, _) in zip(us, kinds)]
        ms = [_tile_buffer(len(u), most * tiles | 1, f, x.dtype) for u, (tiles, _, _) in zip(us, kinds)]
        for start, stop in run:
            # a smaller chunk: the first floats of the lane's buffers, contiguous (the spare zero row stays last)
            v_parts = [_first_rows(v, (stop - start) * tiles | 1) for v, (tiles, _, _) in zip(vs, kinds)]
            m_parts = [_first_rows(m, (stop - start) * tiles | 1) for m, (tiles, _, _) in zip(ms, kinds)]
            compiled.input_tiles_mixed(x[start:stop], top, left, rows4, rows2, cols4, cols2, *v_parts)
            for v_part, u, m_part, (tiles, _, _) in zip(v_parts, us, m_parts, kinds):
                if tiles:
                    blas.product(v_part, u, m_part)
            compiled.output_tiles_mixed_pooled(*m_parts, rows4, rows2, cols4, cols2, bias, pool_h, pool_w, relu,
                                               y[start:stop])
        return run
    lanes.run(products, winograd_chunks(n, out_sizes, c, f, 4))
    return y


def _tile_buffer(taps, rows, width, dtype):
    buffer = np.empty((taps, rows, width), dtype)
    buffer[:, rows - 1:] = 0
    return buffer


def winograd_backward(g, kernel, x, out_sizes, pads, kept=None, kernel_grad=True, input_grad=True, bias_grad=True,
                      block=2, pooled=None, u=None, add_to=None, u_t=None):
    """(the kernel's gradient (3, 3, c, f) or None, the input's gradient (x's shape) or None, the
    bias's (f,) or None) of winograd_conv, from the output gradient g (n, out_h, out_w, f) after the activation's:
    its A-transform dM once per chunk, then dU = V^T dM (16 GEMMs, the chunks' products added in chunk order, so on
    any lanes) and dV = dM U^T (16 GEMMs) scattered back to the input by B dV B^T. The bias's gradient is dM's
    centre tap (its rows (1, 1) of A: the sum of each 2x2 block) summed over the tiles: a quarter of g's floats.
    V is the forward's `kept` tiles, or transformed again from x (a backward after an inference forward, as the
    gradient checks do). The input gradient is written unpadded and contiguous: the padded one's cropped view cost
    the layers before it a copy. `block`: the forward's (winograd_training_block), `u` its winograd_kernel if kept.
    `pooled` (the backward of a pooled training forward): (pool, relu, arg, y): g is then the pooled output y's
    gradient, which goes to where `arg` says each maximum came from (masked by y > 0 where `relu`) as each band
    of dY is made (kernels/winograd.pooled_gradient_tiles_4x4): the conv output's gradient is never written whole.
    Book convnet's conv 2 (13x13x32 -> 11x11x64) and its 2x2 pooling in training at batch 64, thread CPU, AMD EPYC
    at load ~5, best of 22 alternating, forward / backward: one BLAS thread, F(2x2) then the pooling's compiled
    passes 2.82 / 4.89 ms, F(4x4) then those passes 2.47 / 3.40, F(4x4) pooled in its transforms 1.94 / 3.31; the
    caller's part on 2 lanes 1.63 / 2.52 -> 0.99 / 1.82. F(4x4)'s gradients are less exact: within 40 float32 eps
    of the largest over tests/test_winograd.py's cases, where F(2x2)'s are within 3. `add_to`: an array (the
    kernel's accumulated gradient) the kernel's gradient is added to instead of returned, in lanes.defer (the
    chunks' dU summed and G^T dU G made while the caller waits for its lanes in a later run: on the caller alone
    0.1-0.25 ms a conv at the resnet's shapes). `u_t`: transposed_taps(u) if made already."""
    compiled = kernels.compiled("winograd")
    input_tiles, output_gradient_tiles, input_gradient_tiles = {
        2: (compiled.input_tiles, compiled.output_gradient_tiles, compiled.input_gradient_tiles),
        3: (compiled.input_tiles_3x3, compiled.output_gradient_tiles_3x3, compiled.input_gradient_tiles_3x3),
        4: (compiled.input_tiles_4x4, compiled.output_gradient_tiles_4x4, compiled.input_gradient_tiles_4x4)}[block]
    n, c, f = x.shape[0], kernel.shape[2], kernel.shape[3]
    tiles_h, tiles_w = winograd_tiles(out_sizes, block)
    (top, _), (left, _) = pads
    u = winograd_kernel(kernel, block) if u is None and input_grad else u
    u_t = transposed_taps(u) if input_grad and u_t is None else u_t
    dx = np.empty(x.shape, g.dtype) if input_grad else None
    g = np.ascontiguousarray(g)
    if pooled is None:
        def gradient_tiles(start, stop, dm):
            output_gradient_tiles(g[start:stop], tiles_h, tiles_w, dm)
    else:
        (pool_h, pool_w), relu, arg, y = pooled

        def gradient_tiles(start, stop, dm):
            compiled.pooled_gradient_tiles_4x4(g[start:stop], arg[start:stop], y[start:stop], relu, pool_h, pool_w,
                                               tiles_h, tiles_w, dm)
    centre = block + 3  # dM's tap (1, 1): A's row 1 is all ones, so it sums each block of dY

    def gradients(run):
        most = max(stop - start for start, stop in run)
        dm = _winograd_buffer(most, out_sizes, f, g.dtype, block)
        v = _winograd_buffer(most, out_sizes, c, g.dtype, block) if kernel_grad and not kept else None
        # dV in V's buffer (dU's product has read V by then): a chunk's buffers 1.2 MB, not 1.8, at the resnet's b1
        dv = (_winograd_buffer(most, out_sizes, c, g.dtype, block) if v is None else v) if input_grad else None
        sums = []
        for start, stop in run:
            dm_part = _rows_of(dm, stop - start, out_sizes, block)
            gradient_tiles(start, stop, dm_part)
            du = db = None
            if kernel_grad:
                if kept:
                    v_part = kept[start]
                else:
                    v_part = _rows_of(v, stop - start, out_sizes, block)
                    input_tiles(x[start:stop], top, left, tiles_h, tiles_w, v_part)
                du = blas.product(v_part.transpose(0, 2, 1), dm_part)  # V^T read in place
            if bias_grad:
                db = dm_part[centre].sum(0)
            if input_grad:
                dv_part = _rows_of(dv, stop - start, out_sizes, block)
                blas.product(dm_part, u_t, dv_part)
                input_gradient_tiles(dv_part, top, left, tiles_h, tiles_w, dx[start:stop])
            sums.append((du, db))
        return sums
    sums = lanes.run(gradients, winograd_chunks(n, out_sizes, c, f, block))
    db = sums[0][1]
    for _, db_part in sums[1:] if bias_grad else ():  # in chunk order, whichever lane made each
        db += db_part
    if not kernel_grad:
        return None, dx, db
    if add_to is None:
        return _winograd_kernel_gradient([du for du, _ in sums], block), dx, db
    lanes.defer(lambda: np.add(add_to, _winograd_kernel_gradient([du for du, _ in sums], block), out=add_to))
    return None, dx, db


def transposed_taps(u):
    """U's taps transposed, (taps, f, c), contiguous: the input gradient's products dM U^T read its rows whole."""
    return np.ascontiguousarray(u.transpose(0, 2, 1))


def _winograd_kernel_gradient(parts, block):
    """dW = G^T dU G (3, 3, c, f) of the chunks' dU (taps, c, f), summed in chunk order (so on any lanes)."""
    du = parts[0]
    for du_part in parts[1:]:
        du += du_part
    c, f = du.shape[1:]
    if block == 2:  # the transpose of U = G k G^T, taps (a, b) -> (i, j)
        gt = WINOGRAD_G.T.astype(du.dtype)
        dw = (gt @ (gt @ du.reshape(4, -1)).reshape(3, 4, -1).transpose(1, 0, 2).reshape(4, -1)).reshape(3, 3, c, f)
        return dw.transpose(1, 0, 2, 3)
    dw = np.empty((3, 3, c, f), du.dtype)  # F(3x3)'s and F(4x4)'s G in float64, rounded once
    kernels.compiled("winograd").kernel_gradient(du.reshape(len(du), -1), WINOGRAD_GS[block], dw.reshape(9, -1))
    return dw


def pooled_conv(xp, kernel, bias, dilation, pool, pooled_sizes, relu, arg=None):
    """A stride-1 2D convolution on few channels (< BLOCK_CHANNELS) whose output only a max pooling with tiling
    windows reads: max-pooled conv(xp, kernel) + bias, then max(., 0) where `relu`, (n, *pooled_sizes, filters), the
    conv's output never written out whole. In training `arg` (pooled_arg's array) receives where each maximum came
    from, which pooled_conv_backward reads. A few samples at a time (about CHUNK_FLOATS / 2 of patches and
    products, so the pooling reads the products from cache; the chunks are the lanes' parts) the patches are
    gathered in "wide rows": every position of the padded input's width, so each kernel tap's row of patches is one
    contiguous slice of the flat input (a channel's, strided by the channel count) rather than an im2col copy per
    output row; the columns past the output's width are computed and not read. Book convnet's first conv and
    pooling, thread CPU per 48 samples, one BLAS thread: im2col + GEMM + pooling of the whole output ~1.1 ms ->
    0.48 ms. The GEMM is blas.product's, its products into a lane's buffer in cache (unlike a few-channel conv's
    whole output, conv.py): under OpenBLAS's Haswell kernels the block product, the book convnet's conv forward in
    training steps 0.69 / 0.81 -> 0.57 / 0.70 ms best / median (one thread, load 7). At inference a 3x3 kernel on
    one channel under a 2x2 pooling (MNIST's first conv) is computed directly instead (kernels/conv.pooled_conv_3x3):
    128 images, one thread, thread CPU, best of 15 alternating, AMD EPYC at load 16, 1.67 -> 0.66 ms (6.7 -> 2.6 ms
    per batch of 512)."""
    n, height, width, c = xp.shape
    kh, kw, _, f = kernel.shape
    compiled = kernels.compiled("conv")
    if arg is None and compiled is not None and (kh, kw, c) == (3, 3, 1) and tuple(dilation) == (1, 1) \
            and tuple(pool) == (2, 2):  # inference on MNIST's images: written directly, no GEMM (kernels/conv.py)
        y = np.empty((n, *pooled_sizes, f), xp.dtype)
        weights = np.ascontiguousarray(kernel.reshape(9, f))
        bias = np.zeros(f, xp.dtype) if bias is None else bias
        x = xp.reshape(n, height, width)

        def direct_part(run):
            for start, stop in run:
                compiled.pooled_conv_3x3(x[start:stop], weights, bias, relu, y[start:stop])
            return run
        lanes.run(direct_part, batch_parts(n))
        return y
    taps, per_sample = kh * kw * c, height * width
    reach = (kh - 1) * dilation[0] * width + (kw - 1) * dilation[1]  # the last tap's offset into the flat input
    weights = kernel.reshape(taps, f)
    if bias is not None:
        weights = np.vstack([weights, bias[None]])
    y = np.empty((n, *pooled_sizes, f), xp.dtype)

    def pooled_part(run):
        most = max(b - a for a, b in run)
        cols = np.empty((len(weights), most * per_sample), xp.dtype)  # (taps [+ ones], wide positions)
        cols[taps:] = 1  # the bias row
        z = np.empty((most * per_sample, f), xp.dtype)
        for start, stop in run:
            positions = (stop - start) * per_sample
            flat = xp[start:stop].reshape(-1, c)
            count = positions - reach  # the positions whose patches lie in the chunk: every output's among them
            for t, (p, q, ch) in enumerate(itertools.product(range(kh), range(kw), range(c))):
                offset = p * dilation[0] * width + q * dilation[1]
                cols[t, :count] = flat[offset:offset + count, ch]
            cols[:taps, count:positions] = 0  # products never read, but not of whatever the memory held
            products = z[:positions]
            blas.product(cols[:, :positions].T, weights, out=products)
            tile_max(products.reshape(stop - start, height, width, f), pool, pooled_sizes, relu, y[start:stop],
                     None if arg is None else arg[start:stop])
        return run
    lanes.run(pooled_part, pooled_conv_chunks(xp.shape, kernel.shape))
    return y


def pooled_conv_chunks(shape, kernel_shape):
    """[(start, stop)] of the samples pooled_conv gathers and multiplies at once (its backward takes the same)."""
    n, height, width, _ = shape
    kh, kw, c, f = kernel_shape
    return even_chunks(n, max(1, CHUNK_FLOATS // (2 * height * width * (f + kh * kw * c + 1))))


def pooled_arg(y_shape, pool):
    """The array of where each pooled maximum came from: its flat offset in its window, one byte where it fits."""
    return np.empty(y_shape, np.uint8 if np.prod(pool) < 256 else np.int32)


def pooled_conv_backward(g, y, arg, xp, kernel, dilation, pool, relu, kernel_grad=True, input_grad=True,
                         bias_grad=True):
    """(the kernel's gradient or None, the padded input's or None, the bias's or None) of pooled_conv in training,
    from its output's gradient g, its output y (the relu's mask where `relu`) and `arg`: each pooled gradient goes
    to the patch its maximum came from, straight into the kernel's and bias's sums (and the input's), with no
    scatter into a gradient of the whole conv output. Compiled: chunk by chunk on the lanes, each chunk's sums
    added in chunk order (the same bits on any number of lanes)."""
    compiled = kernels.compiled("conv")
    if compiled is None:
        return pooled_conv_backward_numpy(g, y, arg, xp, kernel, dilation, pool, relu, kernel_grad, input_grad,
                                          bias_grad)
    kh, kw, c, f = kernel.shape
    taps = kh * kw * c
    weights = np.ascontiguousarray(kernel.reshape(taps, f))
    g = np.ascontiguousarray(g)
    sums_wanted = kernel_grad or bias_grad
    dxp = np.empty(xp.shape, g.dtype) if input_grad else None
    nothing = np.empty((0, 0, 0, 0), g.dtype)

    def gradients(run):
        parts = []
        for start, stop in run:
            sums = np.zeros((taps + 1, f) if sums_wanted else (0, 0), g.dtype)
            compiled.pooled_conv_backward(g[start:stop], y[start:stop], arg[start:stop], xp[start:stop], weights,
                                          kh, kw, *dilation, *pool, relu, sums,
                                          nothing if dxp is None else dxp[start:stop])
            parts.append(sums)
        return parts
    parts = lanes.run(gradients, pooled_conv_chunks(xp.shape, kernel.shape))
    sums = parts[0]
    for part in parts[1:]:  # in chunk order, whichever lane made each
        sums += part
    return (sums[:taps].reshape(kernel.shape) if kernel_grad else None, dxp,
            sums[taps] if bias_grad else None)


def pooled_conv_backward_numpy(g, y, arg, xp, kernel, dilation, pool, relu, kernel_grad=True, input_grad=True,
                               bias_grad=True):
    """The twin: for each window offset k the gradient of the outputs whose maximum sat there, then per kernel tap
    one product with the input rows those outputs' patches read (strided views, the windows' step apart)."""
    kh, kw, c, f = kernel.shape
    g = g * (y > 0) if relu else g
    n, out_h, out_w, _ = g.shape
    grads = np.zeros(kernel.shape, g.dtype) if kernel_grad else None
    dxp = np.zeros(xp.shape, g.dtype) if input_grad else None
    at = np.empty(arg.shape, bool)
    for k, (a, b) in enumerate(offsets(pool)):
        np.equal(arg, arg.dtype.type(k), out=at)
        gk = (g * at).reshape(-1, f)
        for p, q in offsets((kh, kw)):
            r, s = a + p * dilation[0], b + q * dilation[1]
            index = (slice(None), slice(r, r + pool[0] * (out_h - 1) + 1, pool[0]),
                     slice(s, s + pool[1] * (out_w - 1) + 1, pool[1]))
            if grads is not None:
                grads[p, q] += xp[index].reshape(-1, c).T @ gk
            if dxp is not None:
                dxp[index] += (gk @ kernel[p, q].T).reshape(n, out_h, out_w, c)
    return grads, dxp, g.reshape(-1, f).sum(0) if bias_grad else None


def tile_max(z, pool, out_sizes, relu, out, arg=None):
    """out = the window maxima of z (n, height, width, c) in 2D windows `pool` that tile its first out_sizes * pool
    rows and columns, then max(out, 0) where `relu`; `arg` (out's shape), if given, receives each maximum's flat
    offset in its window (the first maximum wins, as max_pool)."""
    compiled = kernels.compiled("pooling")
    if compiled is not None:
        compiled.tile_max(z, *pool, relu, out, arg)
        return out
    crop = z[:, :out_sizes[0] * pool[0], :out_sizes[1] * pool[1]]
    if arg is None:
        out[...] = window_max_numpy(crop, pool, out_sizes, pool)
    else:
        out[...], arg[...] = max_pool_numpy(crop, pool, out_sizes, pool)
    return np.maximum(out, 0, out=out) if relu else out


def _compiled_pooling(pool):
    """The Numba pooling kernels (2D windows; 1D runs as 2D with height 1), or None for the NumPy twin below."""
    return kernels.compiled("pooling") if len(pool) in (1, 2) else None


def _as_2d(pool, out_sizes, strides, *arrays):
    """1D pooling as 2D pooling of height 1: (n, steps, c) -> (n, 1, steps, c)."""
    if len(pool) == 2:
        return (*pool, *strides, *out_sizes), arrays
    return (1, pool[0], 1, strides[0], 1, out_sizes[0]), tuple(a[:, None] for a in arrays)


def max_pool(xp, pool, out_sizes, strides, relu=False):
    """(window maxima, then max(., 0) where `relu`; the flat in-window offset of each maximum)."""
    compiled = _compiled_pooling(pool)
    if compiled is None:
        y, arg = max_pool_numpy(xp, pool, out_sizes, strides)
        return (np.maximum(y, 0, out=y) if relu else y), arg  # as ReLU.forward_ after it
    (ph, pw, sh, sw, oh, ow), (x2,) = _as_2d(pool, out_sizes, strides, xp)
    arg = np.empty((xp.shape[0], oh, ow, xp.shape[-1]), np.uint8 if np.prod(pool) < 256 else np.int32)
    y = np.empty(arg.shape, xp.dtype)

    def pool_part(run):
        for start, stop in run:
            compiled.max_pool(x2[start:stop], ph, pw, sh, sw, relu, arg[start:stop], y[start:stop])
        return run
    lanes.run(pool_part, batch_parts(len(y)))
    return y.reshape(xp.shape[0], *out_sizes, -1), arg.reshape(y.shape[0], *out_sizes, -1)


def batch_parts(n):
    """[(start, stop)]: the samples split evenly over the lanes (engine/lanes.py), for kernels that treat each
    sample alone (their results do not depend on the split)."""
    return lanes.split(n, lanes.count())


def max_pool_numpy(xp, pool, out_sizes, strides):
    """Window maxima and the flat in-window offset of each (first maximum wins, as TF's MaxPoolGrad).

    With offsets visited in order and a strict `>`, the argmax is the last offset k that beat the running maximum,
    i.e. the largest k * (v_k > max so far): two in-place ufuncs per offset (masked copies are ~10x slower).
    """
    y = arg = better = None
    for k, offset in enumerate(offsets(pool)):
        v = xp[window(offset, out_sizes, strides)]
        if y is None:
            y = v.copy()
            arg = np.zeros(y.shape, np.uint8 if np.prod(pool) < 256 else np.int32)
            better = np.empty(y.shape, bool)
            continue
        np.greater(v, y, out=better)
        np.maximum(y, v, out=y)
        if arg.dtype == np.uint8:  # bool is a byte: k * better in place
            step = better.view(np.uint8)
            step *= np.uint8(k)
        else:
            step = np.multiply(better, arg.dtype.type(k), dtype=arg.dtype)
        np.maximum(arg, step, out=arg)
    return y, arg


def window_max(xp, pool, out_sizes, strides):
    compiled = _compiled_pooling(pool)
    if compiled is None:
        return window_max_numpy(xp, pool, out_sizes, strides)
    (ph, pw, sh, sw, oh, ow), (x2,) = _as_2d(pool, out_sizes, strides, xp)
    return compiled.window_max(x2, ph, pw, sh, sw, oh, ow).reshape(xp.shape[0], *out_sizes, -1)


def window_max_numpy(xp, pool, out_sizes, strides):
    """Window maxima only (inference): a running np.maximum, about 3x faster than max_pool's argmax bookkeeping."""
    y = None
    for offset in offsets(pool):
        v = xp[window(offset, out_sizes, strides)]
        y = v.copy() if y is None else np.maximum(y, v, out=y)
    return y


def max_pool_backward(grad, arg, padded_shape, pool, out_sizes, strides, relu_y=None):
    """The padded input's gradient of max_pool, from its output's gradient; `relu_y`: max_pool's output where it
    applied the ReLU (the gradient masked by relu_y > 0 first, as ReLU.backward). The compiled kernel zeroes what
    no window covers itself, each lane its samples, not the caller the whole array first."""
    compiled = _compiled_pooling(pool)
    if compiled is None:
        if relu_y is not None:
            grad = grad * (relu_y > 0)
        return max_pool_backward_numpy(grad, arg, padded_shape, pool, out_sizes, strides)
    dxp = np.empty(padded_shape, grad.dtype)
    relu_y = np.empty((0,) * grad.ndim, grad.dtype) if relu_y is None else np.ascontiguousarray(relu_y)
    (ph, pw, sh, sw, _, _), (g2, a2, r2, d2) = _as_2d(pool, out_sizes, strides, np.ascontiguousarray(grad), arg,
                                                      relu_y, dxp)

    def spread_part(run):
        for start, stop in run:
            compiled.max_pool_backward(g2[start:stop], a2[start:stop], r2[start:stop], d2[start:stop], ph, pw, sh,
                                       sw)
        return run
    lanes.run(spread_part, batch_parts(len(dxp)))
    return dxp


def _tiled(pool, strides, out_sizes, padded_shape) -> bool:
    """Windows that tile the input exactly write every element once: no zero fill needed."""
    return all(s == p and m * s == n for s, p, m, n in zip(strides, pool, out_sizes, padded_shape[1:-1]))


def max_pool_backward_numpy(grad, arg, padded_shape, pool, out_sizes, strides):
    disjoint = all(s >= p for s, p in zip(strides, pool))
    dxp = (np.empty if _tiled(pool, strides, out_sizes, padded_shape) else np.zeros)(padded_shape, grad.dtype)
    hit = np.empty(arg.shape, bool)
    for k, offset in enumerate(offsets(pool)):
        index = window(offset, out_sizes, strides)
        np.equal(arg, arg.dtype.type(k), out=hit)
        if disjoint:  # each input is in one window: write in place, no temporary
            np.multiply(grad, hit, out=dxp[index])
        else:
            dxp[index] += grad * hit
    return dxp


def window_sum(xp, pool, out_sizes, strides):
    total = None
    for offset in offsets(pool):
        v = xp[window(offset, out_sizes, strides)]
        total = v.copy() if total is None else total.__iadd__(v)
    return total


def window_spread(grad, padded_shape, pool, out_sizes, strides):
    """Adjoint of window_sum: every input in a window receives that window's gradient."""
    dxp = np.zeros(padded_shape, grad.dtype)
    for offset in offsets(pool):
        dxp[window(offset, out_sizes, strides)] += grad
    return dxp
