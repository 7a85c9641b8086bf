"""A Conv2D that pools its own output (engine/graph.py's poolable pairs): a few-channel one through
conv_math.pooled_conv (in training too, with pooled_conv_backward), a Winograd-shaped one in its output transform
(winograd.output_tiles_mixed_pooled; in training every block 4x4, with pooled_gradient_tiles_4x4 after it). The
tiling max pooling kernel against its NumPy twin (bit for bit, the positions of the maxima included), the fused
convolutions against the layers run as written (pooled_conv and its backward within float32 rounding, the Winograd
one's 4x4 blocks bit for bit against F(4x4)'s unfused output and backward, its blocks of 2 against the float64
convolution), a gradient check through each fused pair on both kernel paths, the same bits on 1, 2 and 3 lanes, and
the passes that fuse against those that do not."""
import numpy as np
import pytest

from dlcli import kernels, layers, models, optimizers
from dlcli.diagnostics import to_float64
from dlcli.engine import blas, lanes
from dlcli.layers import conv_math as cm
from tests.gradcheck import assert_close, numeric_grad


@pytest.mark.parametrize("shape,pool,out", [((3, 9, 12, 5), (2, 2), (4, 5)), ((2, 8, 8, 3), (2, 2), (4, 4)),
                                            ((2, 9, 10, 4), (3, 2), (3, 4)), ((2, 7, 9, 2), (1, 3), (7, 3))])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_arg", [False, True])
def test_tile_max_equals_its_numpy_twin(monkeypatch, shape, pool, out, relu, dtype, with_arg):
    """z wider than the windows cover (a pooled conv's wide rows): the columns and rows past them are never read.
    In training the positions of the maxima too: the first of tied maxima, as max_pool (TF's MaxPoolGrad)."""
    rng = np.random.default_rng(0)
    z = rng.integers(-3, 4, shape).astype(dtype)  # many ties and zeros
    z.flat[::7] = rng.standard_normal(z.flat[::7].size)
    z.flat[5], z.flat[9] = np.nan, -np.inf  # NaN propagates as np.maximum does
    z[:, out[0] * pool[0]:] = 99  # never read
    z[:, :, out[1] * pool[1]:] = 99
    results, args = [], []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        assert (kernels.compiled("pooling") is not None) == (path == "numba")
        arg = cm.pooled_arg((shape[0], *out, shape[-1]), pool) if with_arg else None
        results.append(cm.tile_max(z, pool, out, relu, np.empty((shape[0], *out, shape[-1]), dtype), arg))
        args.append(arg)
    np.testing.assert_array_equal(*results)
    assert np.nanmax(results[0]) < 99 and (not relu or np.nanmin(results[0]) >= 0)
    if with_arg:
        np.testing.assert_array_equal(*args)
        crop = z[:, :out[0] * pool[0], :out[1] * pool[1]]
        np.testing.assert_array_equal(args[0], cm.max_pool_numpy(crop, pool, out, pool)[1])


def reference(xp, kernel, bias, dilation, pool, pooled, relu):
    """Conv, max pooling and relu as the layers compute them, in float64."""
    out = tuple(n - (k - 1) * d for n, k, d in zip(xp.shape[1:3], kernel.shape[:2], dilation))
    cols = cm.im2col(xp.astype(np.float64), kernel.shape[:2], out, (1, 1), dilation)
    z = cols.reshape(-1, kernel[..., 0].size) @ kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    z = z.reshape(*cols.shape[:3], -1) + (0 if bias is None else bias)
    y = cm.window_max_numpy(z, pool, pooled, pool)
    return np.maximum(y, 0) if relu else y


# (input shape, kernel size, dilation, pool): the book convnet's first conv (at inference kernels/conv.pooled_conv_3x3,
# as another with an odd output row its windows leave out), several channels, a rectangular kernel, dilation, an
# output the windows do not tile (its last row and column read by no window), a 3x2 window
CASES = [((7, 28, 28, 1), (3, 3), (1, 1), (2, 2)), ((3, 27, 30, 1), (3, 3), (1, 1), (2, 2)),
         ((5, 10, 11, 3), (2, 4), (1, 1), (2, 2)), ((4, 12, 9, 2), (3, 3), (2, 1), (2, 2)),
         ((6, 9, 9, 1), (2, 2), (1, 1), (3, 2))]


@pytest.mark.parametrize("shape,kernel_size,dilation,pool", CASES)
@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("use_bias,relu", [(True, True), (False, False)])
def test_pooled_conv_equals_the_conv_and_pooling_to_rounding(monkeypatch, shape, kernel_size, dilation, pool, path,
                                                             use_bias, relu):
    monkeypatch.setenv("DLCLI_KERNELS", path)
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 2 * shape[1] * shape[2] * 40 * 2)  # two samples a chunk: seams, a short one
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((*kernel_size, shape[-1], 8)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32) if use_bias else None
    out = tuple(n - (k - 1) * d for n, k, d in zip(shape[1:3], kernel_size, dilation))
    pooled = tuple(m // p for m, p in zip(out, pool))
    y = cm.pooled_conv(x, kernel, bias, dilation, pool, pooled, relu)
    expected = reference(x, kernel, bias, dilation, pool, pooled, relu)
    assert y.dtype == np.float32 and y.shape == expected.shape == (shape[0], *pooled, 8)
    atol = 8 * np.finfo(np.float32).eps * np.abs(expected).max()
    np.testing.assert_allclose(y, expected, rtol=0, atol=atol)
    arg = cm.pooled_arg(y.shape, pool)  # training: the maxima (of the GEMM's sums), and where they came from
    np.testing.assert_allclose(cm.pooled_conv(x, kernel, bias, dilation, pool, pooled, relu, arg), expected, rtol=0,
                               atol=atol)
    assert arg.max() < np.prod(pool)


@pytest.mark.skipif(not kernels.compiled("gemm").AVX512, reason="the block product runs on AVX-512 CPUs only")
def test_pooled_conv_in_training_takes_the_block_product_under_avx2_openblas_with_the_same_bits_on_any_lanes(
        monkeypatch):
    """Where OpenBLAS runs AVX2 kernels (this workplace) each chunk's product goes through the block product: within
    rounding of OpenBLAS's, the same bits and maxima on 1, 2 and 3 lanes."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 2 * 28 * 28 * 40 * 2)  # two samples a chunk
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, 28, 28, 1)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 1, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)

    def run(avx512_blas, count):
        monkeypatch.setattr(blas, "avx512_kernels", lambda: avx512_blas)
        monkeypatch.setattr(lanes, "count", lambda: count)
        arg = cm.pooled_arg((7, 13, 13, 32), (2, 2))
        return cm.pooled_conv(x, kernel, bias, (1, 1), (2, 2), (13, 13), True, arg), arg

    block = [run(False, count) for count in (1, 2, 3)]
    assert blas.block_products() is not None
    for y, arg in block[1:]:
        np.testing.assert_array_equal(y, block[0][0])
        np.testing.assert_array_equal(arg, block[0][1])
    matmul = run(True, 1)[0]
    np.testing.assert_allclose(block[0][0], matmul, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(matmul).max())


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_3x3_conv_on_one_channel_is_written_directly_at_inference(monkeypatch, relu, dtype):
    """kernels/conv.pooled_conv_3x3 at inference (compiled kernels), the GEMM in training and on the NumPy path:
    within rounding of each other, NaN propagated alike, the same bits however the batch is split over lanes."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    compiled, used = kernels.compiled("conv"), []
    direct = compiled.pooled_conv_3x3
    monkeypatch.setattr(compiled, "pooled_conv_3x3", lambda *a: used.append(len(a[0])) or direct(*a))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 16, 15, 1)).astype(dtype)
    x[2, 5, 6, 0] = np.nan
    kernel = rng.standard_normal((3, 3, 1, 20)).astype(dtype)
    bias = rng.standard_normal(20).astype(dtype)
    results = []
    for count in (1, 2, 3):
        monkeypatch.setattr(lanes, "count", lambda count=count: count)
        results.append(cm.pooled_conv(x, kernel, bias, (1, 1), (2, 2), (7, 6), relu))
    assert sum(used) == 3 * len(x)
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])
    used.clear()
    training = cm.pooled_conv(x, kernel, bias, (1, 1), (2, 2), (7, 6), relu, cm.pooled_arg(results[0].shape, (2, 2)))
    monkeypatch.setenv("DLCLI_KERNELS", "numpy")
    twin = cm.pooled_conv(x, kernel, bias, (1, 1), (2, 2), (7, 6), relu)
    assert not used and results[0].dtype == dtype
    assert np.isnan(results[0][2]).any() and not np.isnan(results[0][3:]).any()
    atol = 16 * np.finfo(dtype).eps * np.nanmax(np.abs(twin))
    np.testing.assert_allclose(results[0], twin, rtol=0, atol=atol)
    np.testing.assert_allclose(training, twin, rtol=0, atol=atol)


def full_gradients(g, y, arg, xp, kernel, dilation, pool, relu):
    """The backward of the layers as written, in float64: the relu's mask, the pooling's scatter of g to the
    positions in arg, then the convolution's gradients from the whole output gradient."""
    kh, kw, c, f = kernel.shape
    out = tuple(n - (k - 1) * d for n, k, d in zip(xp.shape[1:3], (kh, kw), dilation))
    g = g.astype(np.float64) * (y > 0) if relu else g.astype(np.float64)
    dz = np.zeros((len(xp), *out, f))
    covered = cm.max_pool_backward_numpy(g, arg, (len(xp), *(m * p for m, p in zip(g.shape[1:3], pool)), f), pool,
                                         g.shape[1:3], pool)
    dz[:, :covered.shape[1], :covered.shape[2]] = covered
    cols = cm.im2col(xp.astype(np.float64), (kh, kw), out, (1, 1), dilation).reshape(-1, kh * kw * c)
    kernel_grad = (cols.T @ dz.reshape(-1, f)).reshape(kernel.shape)
    input_grad = cm.col2im_matmul_numpy(dz.reshape(-1, f), kernel.astype(np.float64), xp.shape, out, (1, 1), dilation)
    return kernel_grad, input_grad, dz.reshape(-1, f).sum(0)


@pytest.mark.parametrize("shape,kernel_size,dilation,pool", CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_pooled_conv_backward_equals_the_layers_backward_to_rounding_on_both_paths(monkeypatch, shape, kernel_size,
                                                                                   dilation, pool, relu):
    """The kernel's, the input's and the bias's gradients from the pooled gradient and the maxima's positions, chunk
    by chunk (several chunks, a short one), against the scatter and the whole conv output's gradient in float64."""
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 2 * shape[1] * shape[2] * 40 * 2)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * (rng.random(shape) < 0.6)).astype(np.float32)  # zeros: tied maxima
    kernel = rng.standard_normal((*kernel_size, shape[-1], 8)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    out = tuple(n - (k - 1) * d for n, k, d in zip(shape[1:3], kernel_size, dilation))
    pooled = tuple(m // p for m, p in zip(out, pool))
    arg = cm.pooled_arg((shape[0], *pooled, 8), pool)
    y = cm.pooled_conv(x, kernel, bias, dilation, pool, pooled, relu, arg)
    g = rng.standard_normal(y.shape).astype(np.float32)
    expected = full_gradients(g, y, arg, x, kernel, dilation, pool, relu)
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        got = cm.pooled_conv_backward(g, y, arg, x, kernel, dilation, pool, relu)
        for a, b in zip(got, expected):
            assert a.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=32 * np.finfo(np.float32).eps * np.abs(b).max())
        kernel_grad, input_grad, bias_grad = cm.pooled_conv_backward(g, y, arg, x, kernel, dilation, pool, relu,
                                                                     kernel_grad=False, input_grad=False)
        assert kernel_grad is None and input_grad is None
        np.testing.assert_array_equal(bias_grad, got[2])


def convnet(seed=0):
    """The book convnet's shape, smaller: its first conv and pooling fuse at inference, the second's do not (32
    channels); a Conv2D with strides and a pooling with overlapping windows never do."""
    model = models.Sequential([
        layers.Conv2D(8, 3, activation="relu", input_shape=(14, 14, 1)), layers.MaxPooling2D(2),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
        layers.Dense(10, activation="softmax")])
    model.build(rng=np.random.default_rng(seed))
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_only_few_channel_or_winograd_convs_under_tiling_poolings_pool_their_own_output():
    """The second conv of convnet() reads 8 channels: neither few (< 8) nor Winograd's (>= 16)."""
    model = convnet()
    assert model.graph.poolable == model.graph.poolable_in_training == {id(model.layers[1])}
    img = layers.Input((12, 12, 1))
    strided = layers.MaxPooling2D(2)(layers.Conv2D(4, 3, strides=2, activation="relu")(img))
    overlapping = layers.MaxPooling2D(2, strides=1)(layers.Conv2D(4, 3, activation="relu")(img))
    same = layers.MaxPooling2D(2, padding="same")(layers.Conv2D(4, 3, activation="relu")(img))
    assert models.Model(img, [strided, overlapping, same]).graph.poolable == set()
    wide = layers.Input((12, 12, 16))
    pooled = [layers.MaxPooling2D(p) for p in [2, (4, 2), 3]]
    outs = [p(layers.Conv2D(8, 3, activation="relu")(wide)) for p in pooled]
    outs.append(layers.MaxPooling2D(2)(layers.Conv2D(8, 3, dilation_rate=2, activation="relu")(wide)))
    graph = models.Model(wide, outs).graph
    assert graph.poolable == {id(pooled[0]), id(pooled[1])}  # windows dividing 4
    assert graph.poolable_in_training == graph.poolable  # F(4x4)'s pooled transform keeps the maxima's places


def test_a_few_channel_conv_behind_another_layer_pools_its_own_output_at_inference_only():
    """Its input gradient is needed in training, which the fused backward pays more for than the pair apart."""
    img = layers.Input((12, 12, 1))
    scaled = layers.Rescaling(1 / 255)(img)
    pool = layers.MaxPooling2D(2)
    graph = models.Model(img, pool(layers.Conv2D(4, 3, activation="relu")(scaled))).graph
    assert graph.poolable == {id(pool)} and graph.poolable_in_training == set()


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_predict_fuses_and_gives_the_outputs_of_the_layers_as_written(monkeypatch, path):
    """predict (fused, side by side) against model(x) (a forward that fuses nothing), then a training step, which
    fuses too (the conv keeps where each maximum came from for its backward), against one that does not."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    rng = np.random.default_rng(1)
    x = rng.random((30, 14, 14, 1)).astype(np.float32) * (rng.random((30, 14, 14, 1)) < 0.4)  # MNIST-like zeros
    y = rng.integers(0, 10, 30)
    fused, plain = convnet(), convnet()
    conv, pool = fused.layers[0], fused.layers[1]
    calls, pooled_conv = [], cm.pooled_conv

    def counted(*args):
        calls.append(args[0].shape[0])
        return pooled_conv(*args)
    monkeypatch.setattr(cm, "pooled_conv", counted)
    monkeypatch.setattr(blas, "threads", lambda: 2)
    monkeypatch.setattr(models, "PREDICT_ROWS", 8)
    np.testing.assert_allclose(fused.predict(x), plain(x), rtol=1e-5, atol=1e-6)
    assert sum(calls) == 32 and conv.pool_after is pool and pool.pooled_before
    assert fused.evaluate(x, y, batch_size=7) == pytest.approx(plain.evaluate(x, y, batch_size=7), rel=1e-6)
    monkeypatch.setattr(blas, "threads", lambda: 1)
    plain.graph.poolable_in_training = set()  # its step runs the conv and the pooling apart
    fused.train_step([x], [y])
    plain.train_step([x], [y])
    assert conv.pool_after is pool and pool.pooled_before and not conv.activation_moved
    assert plain.layers[0].pool_after is None and plain.layers[0].activation_moved
    for a, b in zip(fused.weights, plain.weights):
        np.testing.assert_allclose(a.value, b.value, rtol=1e-5, atol=1e-6)


def test_evaluate_runs_side_by_side_with_each_pass_s_logits():
    """Several outputs, one with a fused softmax + cross-entropy (read from the logits of the graph or replica that
    ran the pass) and one not: the same sums on 1 and 3 threads, pass for pass."""
    rng = np.random.default_rng(2)
    inp = layers.Input((6,))
    h = layers.Dense(8, activation="relu")(inp)
    model = models.Model(inp, [layers.Dense(4, activation="softmax", name="cls")(h), layers.Dense(2, name="reg")(h)])
    model.compile(optimizer="adam", loss=["sparse_categorical_crossentropy", "mse"], metrics=[["accuracy"], []])
    assert model.fused[0] is not None and model.fused[1] is None
    x = rng.standard_normal((103, 6)).astype(np.float32)
    ys = [rng.integers(0, 4, 103), rng.standard_normal((103, 2)).astype(np.float32)]
    results = []
    for threads in (1, 3):
        blas_threads = blas.threads
        blas.threads = lambda t=threads: t
        try:
            results.append(model.evaluate(x, ys, batch_size=5, return_dict=True))
        finally:
            blas.threads = blas_threads
    assert results[0] == results[1]
    outs = model.graph.forward([x], training=False)  # one pass of every sample: the same mean
    assert results[0]["cls_loss"] == pytest.approx(model.compute_loss(ys, outs, with_grads=False)[1][0], rel=1e-5)


# (input shape, filters, padding, pool): the book convnet's conv 2 (13x13x32 -> 11x11x64, its last row and column
# read by no window: 10x10 read, so blocks of 4, 4 and 2 each way), 'same' under 4x4 windows, 2x4 windows on a
# rectangular output, 9x9 read whole (blocks of 4, 4 and 2 of which 1 is read), 10x13 read under 2x1 windows
WINOGRAD_CASES = [((5, 13, 13, 32), 64, "valid", (2, 2)), ((3, 14, 14, 16), 24, "same", (4, 4)),
                  ((4, 9, 11, 16), 8, "same", (2, 4)), ((3, 11, 11, 16), 8, "valid", (1, 1)),
                  ((4, 12, 15, 16), 8, "valid", (2, 1))]


def gemm_rows_keep_their_bits(dtype) -> bool:
    """Whether BLAS gives a row of a GEMM's product the same bits in a product of fewer rows: OpenBLAS's own choice
    of kernels on AVX-512 CPUs does, its Haswell kernels (OPENBLAS_CORETYPE=Haswell) round the last rows otherwise."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((37, 32)).astype(dtype), rng.standard_normal((32, 64)).astype(dtype)
    return all(np.array_equal(a[:rows] @ b, (a @ b)[:rows]) for rows in (9, 19))


@pytest.mark.parametrize("shape,filters,padding,pool", WINOGRAD_CASES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_pools_in_its_output_transform(monkeypatch, shape, filters, padding, pool, relu, dtype):
    """The pooling (and ReLU) in the output transform, computing only the outputs its windows read: its 4x4 blocks
    give the bits of F(4x4)'s output pooled as the layers pool it (the bias added after the maximum rounds the same:
    rounding is monotonic) where BLAS gives a GEMM's rows their bits whatever the row count (the mixed tiling's
    GEMMs have fewer rows than F(4x4)'s); the last row and column of blocks, 2 high or wide where the windows read
    4k + 1 or 4k + 2 rows or columns, within F(4x4)'s rounding (64 eps of the largest output, as test_winograd.py)
    of the float64 convolution pooled; NaN propagates (to its sample only)."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 36 * 16 * (shape[-1] + filters))  # about two samples a chunk: seams
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    x[0, 2, 3, 1] = np.nan
    kernel = (rng.standard_normal((3, 3, shape[-1], filters)) / np.sqrt(9 * shape[-1])).astype(dtype)
    bias = rng.standard_normal(filters).astype(dtype)
    out, pads = cm.geometry(shape[1:-1], (3, 3), (1, 1), padding, (1, 1))
    pooled = tuple(m // p for m, p in zip(out, pool))
    assert cm.winograd_pools(out, pool)
    y = cm.winograd_conv(x, kernel, bias, out, pads, pooled=(pool, relu))
    assert y.dtype == dtype and y.shape == (shape[0], *pooled, filters)
    assert np.isnan(y[0]).any() and not np.isnan(y[1:]).any()

    def pool_of(z):
        p = cm.window_max_numpy(z[:, :pooled[0] * pool[0], :pooled[1] * pool[1]], pool, pooled, pool)
        return np.maximum(p, 0) if relu else p
    fours = [cm.winograd_mixed_blocks(m * p)[0] * 4 // p for m, p in zip(pooled, pool)]  # pooled rows, columns
    in_fours = y[:, :fours[0], :fours[1]]
    unfused = pool_of(cm.winograd_conv(x, kernel, bias, out, pads, block=4))[:, :fours[0], :fours[1]]
    if gemm_rows_keep_their_bits(dtype):
        np.testing.assert_array_equal(in_fours, unfused)
    else:  # the same products from GEMMs of other row counts: F(4x4)'s rounding, as below
        eps = np.finfo(dtype).eps
        np.testing.assert_allclose(in_fours, unfused, rtol=0, atol=64 * eps * np.nanmax(np.abs(unfused)))
    xp = cm.pad(x[1:].astype(np.float64), pads)
    cols = cm.im2col(xp, (3, 3), out, (1, 1), (1, 1))
    z = (cols.reshape(-1, 9 * shape[-1]) @ kernel.reshape(-1, filters).astype(np.float64)).reshape(
        *cols.shape[:3], filters) + bias
    expected = pool_of(z)
    np.testing.assert_allclose(y[1:], expected, rtol=0, atol=64 * np.finfo(dtype).eps * np.abs(expected).max())


def test_the_pooled_tiling_ends_in_a_block_of_2_where_1_or_2_rows_are_left():
    """Blocks of 4, then 2 where the windows read 4k + 1 or 4k + 2 rows (the book convnet's conv 2 reads 10 of 11)."""
    assert [cm.winograd_mixed_blocks(used) for used in (4, 5, 6, 7, 8, 9, 10, 11)] == [
        (1, 0), (1, 1), (1, 1), (2, 0), (2, 0), (2, 1), (2, 1), (3, 0)]


@pytest.mark.parametrize("shape,filters,padding,pool", WINOGRAD_CASES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_pools_in_training_bit_for_bit(monkeypatch, shape, filters, padding, pool, relu, dtype):
    """In training F(4x4)'s pooled transform also gives where each maximum came from, and its backward takes the
    pooled gradient to dM band by band: the bits of F(4x4)'s output pooled by tile_max (the first of tied maxima:
    a zero corner of x makes outputs equal to the bias) and of max_pool_backward's scatter then F(4x4)'s backward."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 36 * 16 * (shape[-1] + filters))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    x[:, :6, :6] = 0
    kernel = (rng.standard_normal((3, 3, shape[-1], filters)) / np.sqrt(9 * shape[-1])).astype(dtype)
    bias = rng.standard_normal(filters).astype(dtype)
    out, pads = cm.geometry(shape[1:-1], (3, 3), (1, 1), padding, (1, 1))
    pooled = tuple(m // p for m, p in zip(out, pool))
    tiles, arg = {}, cm.pooled_arg((shape[0], *pooled, filters), pool)
    y = cm.winograd_conv(x, kernel, bias, out, pads, tiles, pooled=(pool, relu), arg=arg)
    whole_tiles = {}
    z = cm.winograd_conv(x, kernel, bias, out, pads, whole_tiles, block=4)
    expected, expected_arg = np.empty_like(y), np.empty_like(arg)
    cm.tile_max(z, pool, pooled, relu, expected, expected_arg)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(arg, expected_arg)
    if np.prod(pool) > 1:  # ties: the first maximum, offset 0
        assert (arg > 0).any() and (arg == 0).mean() > 1 / np.prod(pool)
    g = rng.standard_normal(y.shape).astype(dtype)
    got = cm.winograd_backward(g, kernel, x, out, pads, tiles, block=4, pooled=(pool, relu, arg, y))
    dz = cm.max_pool_backward(g, arg, z.shape, pool, pooled, pool, y if relu else None)
    for a, b in zip(got, cm.winograd_backward(dz, kernel, x, out, pads, whole_tiles, block=4)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)


def test_winograd_pools_only_where_4x4_blocks_hold_whole_windows():
    assert [cm.winograd_pools(out, pool) for out, pool in [((11, 11), (2, 2)), ((7, 9), (4, 1)), ((11, 11), (3, 3)),
                                                           ((6, 6), (2, 2)), ((12, 12), (2, 8))]] == [
        True, True, False, False, False]


def winograd_convnet(side):
    """Both convs pool their own output at inference: the first reads 1 channel (pooled_conv), the second 16
    (Winograd: F(4x4) with the pooling from 7x7 outputs, side 20; F(2x2) then its own pooling at 5x5, side 16)."""
    model = models.Sequential([
        layers.Conv2D(16, 3, activation="relu", input_shape=(side, side, 1)), layers.MaxPooling2D(2),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
        layers.Dense(10, activation="softmax")])
    model.build(rng=np.random.default_rng(0))
    return model


@pytest.mark.parametrize("side,fused", [(20, True), (16, False)])
@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_predict_pools_a_winograd_conv_s_output_as_the_layers_written(monkeypatch, side, fused, path):
    """predict (side by side) against model(x) (nothing fused; F(4x4) there too, at inference), on both kernel
    paths: the NumPy one (im2col + GEMM, then the conv's own tile_max) within float32 rounding of the compiled one.
    A training step afterwards finds the pooling whole again."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    rng = np.random.default_rng(1)
    x = rng.random((30, side, side, 1)).astype(np.float32)
    model = winograd_convnet(side)
    conv, pool = model.layers[2], model.layers[3]
    assert id(pool) in model.graph.poolable
    calls = []
    if path == "numba":
        compiled = kernels.compiled("winograd")
        kernel = compiled.output_tiles_mixed_pooled
        monkeypatch.setattr(compiled, "output_tiles_mixed_pooled", lambda m, *a: calls.append(len(m)) or kernel(m, *a))
    monkeypatch.setattr(blas, "threads", lambda: 2)
    monkeypatch.setattr(models, "PREDICT_ROWS", 8)
    predicted = model.predict(x)
    assert conv.pool_after is pool and pool.pooled_before and bool(calls) == (fused and path == "numba")
    plain = model(x)
    np.testing.assert_allclose(predicted, plain, rtol=1e-6, atol=1e-7)
    if path == "numba":
        monkeypatch.setenv("DLCLI_KERNELS", "numpy")
        np.testing.assert_allclose(predicted, model.predict(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side,fused", [(20, True), (16, False)])
@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("threads", [1, 2])
def test_training_pools_a_winograd_conv_s_output_as_the_layers_written(monkeypatch, side, fused, path, threads):
    """Two SGD steps where the Winograd conv pools its own output (F(4x4)'s pooled transform keeping where each
    maximum came from at 7x7 outputs; at 5x5 F(2x2)'s output written whole and pooled by the conv, as on the NumPy
    path) against two where the conv and the pooling run apart: the same weights, bit for bit where both run one
    convolution, else to F(4x4)'s rounding against F(2x2)'s (gradients within ~40 float32 eps of the largest)."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    monkeypatch.setattr(blas, "threads", lambda: threads)
    rng = np.random.default_rng(1)
    x = rng.random((30, side, side, 1)).astype(np.float32)
    y = rng.integers(0, 10, 30)
    model, apart = winograd_convnet(side), winograd_convnet(side)
    apart.graph.poolable_in_training = {id(apart.layers[1])}  # the first conv's (few channels) as in `model`
    calls = []
    if path == "numba":
        compiled = kernels.compiled("winograd")
        kernel = compiled.pooled_gradient_tiles_4x4
        monkeypatch.setattr(compiled, "pooled_gradient_tiles_4x4", lambda g, *a: calls.append(len(g)) or kernel(g, *a))
    for m in (model, apart):
        m.compile(optimizer=optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        for _ in range(2):
            m.train_step([x], [y])
    conv, pool = model.layers[2], model.layers[3]
    assert conv.pool_after is pool and pool.pooled_before and sum(calls) == (60 if fused and path == "numba" else 0)
    assert apart.layers[2].pool_after is None and apart.layers[2].activation_moved
    for a, b in zip(model.weights, apart.weights):
        if fused and path == "numba":
            np.testing.assert_allclose(a.value, b.value, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(a.value, b.value)


# (input shape of a sample, where its chunks are cut): a few-channel conv (pooled_conv), and one on 16 channels
# (compiled: Winograd's F(4x4) with the pooling in its output transform, 3 x 3 tiles of 4 x 4 outputs, ragged)
PAIRS = {"few": ((10, 9, 2), lambda n: cm.pooled_conv_chunks((n, 10, 9, 2), (3, 3, 2, 6))),
         "winograd": ((12, 11, 16), lambda n: cm.winograd_chunks(n, (12, 11), 16, 6, 4))}


def fused_pair(kind="few", dtype="float32"):
    """A conv (same padding) reading the model's input, so it pools its own output in training too; the passes
    below ask for the input gradient (need_input_grads), so the fused one is checked as well."""
    img = layers.Input(PAIRS[kind][0])
    x = layers.Conv2D(6, 3, padding="same", activation="relu", bias_initializer="ones", name="conv")(img)
    x = layers.MaxPooling2D(2, name="pool")(x)  # 10 x 9 -> 5 x 4: the last column belongs to no window (11 -> 5)
    out = layers.Dense(3, name="out")(layers.Flatten()(x))
    model = models.Model(img, out)
    rng = np.random.default_rng(0)
    for p in model.weights:  # the same weights in every model made here
        p.value[...] = rng.uniform(-0.6, 0.6, p.value.shape)
    if dtype == "float64":
        to_float64(model)
    return model


def training_pass(model, x, observer=None):
    """(output, input gradient, every weight's gradient) of one training forward and backward."""
    for p in model.trainable_weights:
        p.grad = np.zeros_like(p.value)
    out = model.graph.forward([x], training=True, observer=observer)[0]
    r = np.random.default_rng(5).standard_normal(out.shape).astype(out.dtype)
    dx = model.graph.backward([r], need_input_grads=True, observer=observer)[0]
    return [out, dx] + [p.grad.copy() for p in model.trainable_weights]


class Watcher:
    """An observer: observed passes run the layers as written."""

    def forward(self, node, output):
        pass

    def backward(self, node, output_grad, input_grad):
        pass


def mnist_like(shape, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * (rng.random(shape) < 0.4)).astype(np.float32)


@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("kind", PAIRS)
def test_a_training_pass_fuses_and_equals_the_layers_as_written(monkeypatch, path, kind):
    """The same output (F(4x4)'s against F(2x2)'s to float32 rounding), and gradients to rounding: F(4x4)'s are
    within 64 float32 eps of the largest (measured up to 40 over tests/test_winograd.py's cases)."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    model = fused_pair(kind)
    assert model.graph.poolable == model.graph.poolable_in_training == {id(model.get_layer("pool"))}
    x = mnist_like((7, *PAIRS[kind][0]))
    fused = training_pass(model, x)
    assert model.get_layer("conv").pool_after is model.get_layer("pool")
    written = training_pass(model, x, Watcher())
    assert model.get_layer("conv").pool_after is None
    eps = (64 if kind == "winograd" and path == "numba" else 16) * np.finfo(np.float32).eps
    if kind == "few":
        np.testing.assert_array_equal(fused[0], written[0])
    for a, b in zip(fused, written):
        np.testing.assert_allclose(a, b, rtol=0, atol=eps * np.abs(b).max())


@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("kind", PAIRS)
def test_gradient_check_through_the_fused_pair(monkeypatch, path, kind):
    """d(sum(r * output)) / d(input and every weight) of a float64 training pass against central differences."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    model = fused_pair(kind, dtype="float64")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, *PAIRS[kind][0]))
    r = rng.standard_normal((3, 3))

    def loss():
        return float((model.graph.forward([x], training=True)[0] * r).sum())
    for p in model.trainable_weights:
        p.grad = np.zeros_like(p.value)
    model.graph.forward([x], training=True)
    assert model.get_layer("conv").pool_after is not None
    dx = model.graph.backward([r], need_input_grads=True)[0]
    grads = {p.path: p.grad.copy() for p in model.trainable_weights}
    assert_close(dx, numeric_grad(loss, x, max_checks=40), "input")
    for p in model.trainable_weights:
        assert_close(grads[p.path], numeric_grad(loss, p.value, max_checks=40), p.path)


@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("kind", PAIRS)
def test_the_fused_pair_gives_the_same_bits_on_one_two_and_three_lanes(monkeypatch, path, kind):
    monkeypatch.setenv("DLCLI_KERNELS", path)
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 1 << 11)  # many chunks at this small shape
    x = mnist_like((23, *PAIRS[kind][0]))
    results = []
    for count in (1, 2, 3):
        monkeypatch.setattr(lanes, "count", lambda count=count: count)
        results.append(training_pass(fused_pair(kind), x))
    assert len(PAIRS[kind][1](23)) > 3
    for one, two, three in zip(*results):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)
