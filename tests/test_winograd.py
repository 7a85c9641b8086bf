"""Convolution through Winograd's F(2x2, 3x3) (kernels/winograd.py), forward and both gradients, and at inference
F(3x3, 3x3) and F(4x4, 3x3), against its twin,
im2col + one GEMM and col2im (DLCLI_KERNELS=numpy): the same sums in another order, so equal within float32
rounding."""
import numpy as np
import pytest

from dlcli import kernels, layers
from dlcli.engine import blas
from dlcli.layers import conv_math as cm

# (input shape, filters, padding): even and odd outputs (a ragged last tile), 'same' and 'valid', rectangular,
# the book convnet's second and third convs, a 2x2 output (one tile), F(3x3)'s sizes (3x3 tiles whole, 5x4 ragged)
CASES = [((5, 13, 13, 32), 64, "valid"), ((3, 8, 8, 16), 24, "same"), ((4, 7, 10, 16), 8, "same"),
         ((3, 5, 5, 64), 64, "valid"), ((2, 4, 4, 16), 5, "valid"), ((9, 14, 14, 32), 32, "same"),
         ((3, 9, 9, 16), 8, "same"), ((2, 5, 4, 16), 9, "same")]


def reference(xp, kernel, bias, out_sizes):
    """The convolution in float64: im2col and one product."""
    cols = cm.im2col(xp.astype(np.float64), (3, 3), out_sizes, (1, 1), (1, 1))
    y = cols.reshape(-1, kernel[..., 0].size) @ kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    return y.reshape(*cols.shape[:3], -1) + (0 if bias is None else bias)


@pytest.mark.parametrize("shape,filters,padding", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("block", [2, 3, 4])
def test_winograd_equals_the_convolution_to_rounding(monkeypatch, shape, filters, padding, dtype, use_bias, block):
    """F(2x2) and, at inference, F(3x3) and F(4x4): their 5x5 and 6x6 tiles (ragged last ones on most sizes here)
    and larger constants (3, 4, 5, 8, halves and sixths) round more than F(2x2) does: within 32 and 64 eps of the
    largest output where F(2x2) stays within 16 (measured at most 16, 28 and 5)."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 16 * 36 * 96 * 2)  # two samples per chunk: seams and a short last one
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    kernel = (rng.standard_normal((3, 3, shape[-1], filters)) / np.sqrt(9 * shape[-1])).astype(dtype)
    bias = rng.standard_normal(filters).astype(dtype) if use_bias else None
    out, pads = cm.geometry(shape[1:-1], (3, 3), (1, 1), padding, (1, 1))
    y = cm.winograd_conv(x, kernel, bias, out, pads, block=block)
    expected = reference(cm.pad(x, pads), kernel, bias, out)
    assert y.dtype == dtype and y.shape == expected.shape == (shape[0], *out, filters)
    # float32 rounding of sums of 9 * channels products of unit-scale values: a few eps of the largest output
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(y, expected, rtol=0, atol={2: 16, 3: 32, 4: 64}[block] * eps * np.abs(expected).max())


def test_inference_takes_the_blocks_with_the_fewest_products(monkeypatch):
    """winograd_block's rule, which ranked every measured size as its times did: F(4x4) on the book convnet's conv 2
    (11x11 outputs), F(3x3) on its conv 3 (3x3: one 5x5 tile) and at 5, 6 and 9, F(2x2) on 2x2 and 2x4; in
    training too, and F(4x4) wherever the conv pools its output (F(4x4)'s pooled transform:
    tests/test_pooled_conv.py), as winograd_training_block says."""
    sizes = [(11, 11), (7, 7), (14, 7), (4, 4), (8, 8), (6, 6), (3, 3), (5, 5), (9, 9), (6, 20), (2, 2), (2, 4)]
    assert [cm.winograd_block(s) for s in sizes] == [4, 4, 4, 4, 4, 3, 3, 3, 3, 3, 2, 2]
    assert [cm.winograd_training_block(s) for s in sizes] == [cm.winograd_block(s) for s in sizes]
    assert cm.winograd_training_block((11, 11), pooled=True) == 4
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    compiled, used = kernels.compiled("winograd"), []
    for name in ("input_tiles", "input_tiles_3x3", "input_tiles_4x4"):
        monkeypatch.setattr(compiled, name,
                            lambda *a, _name=name, _f=getattr(compiled, name): used.append(_name) or _f(*a))
    for side, block in [(13, "input_tiles_4x4"), (5, "input_tiles_3x3"), (4, "input_tiles")]:
        x = np.random.default_rng(0).standard_normal((2, side, side, 16)).astype(np.float32)
        conv = layers.Conv2D(8, 3)
        conv.build(x.shape[1:])
        used.clear()
        conv.forward(x, training=False)
        assert set(used) == {block}
        used.clear()
        conv.forward(x, training=True)
        assert set(used) == {block}


def run_conv(path, monkeypatch, shape, filters, padding, use_bias, training=True, kernel_grad=True, input_grad=True):
    """A Conv2D's (output, input gradient, kernel gradient, bias gradient) on one kernel path, after a ReLU."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    conv = layers.Conv2D(filters, 3, padding=padding, activation="relu", use_bias=use_bias)
    conv.build(shape[1:])
    conv.kernel.value[...] = rng.standard_normal(conv.kernel.value.shape) / np.sqrt(9 * shape[-1])
    if use_bias:
        conv.bias.value[...] = rng.standard_normal(filters) * 0.1
    for p in conv.weights:
        p.grad = np.zeros_like(p.value)
    conv.kernel.grad = conv.kernel.grad if kernel_grad else None
    conv.input_grad_needed = input_grad
    y = conv.forward(x, training=training)
    dx = conv.backward(rng.standard_normal(y.shape).astype(np.float32))
    return [y, dx] + [p.grad for p in conv.weights]


TRAINING_CASES = CASES + [((65, 9, 7, 16), 7, "same"), ((1, 6, 5, 17), 3, "valid"), ((65, 6, 6, 32), 16, "valid"),
                          ((1, 11, 11, 16), 8, "same")]


@pytest.mark.parametrize("shape,filters,padding", TRAINING_CASES)
@pytest.mark.parametrize("use_bias", [True, False])
def test_training_gives_the_twins_output_and_gradients_to_rounding(monkeypatch, shape, filters, padding, use_bias):
    """Training transforms the input's tiles again for the kernel gradient, and both gradients run in the Winograd
    domain: batch sizes 1 and 65, odd output sizes (ragged tiles), 'same' and 'valid', several chunks."""
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 16 * 36 * 96 * 2)
    winograd = run_conv("numba", monkeypatch, shape, filters, padding, use_bias)
    twin = run_conv("numpy", monkeypatch, shape, filters, padding, use_bias)
    for name, a, b in zip(("output", "input gradient", "kernel gradient", "bias gradient"), winograd, twin):
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32, name
        # sums of up to 9 * channels (input gradient: 9 * filters; kernel's: the batch's positions) products; F(3x3)'s
        # and F(4x4)'s larger constants round more (measured at most 38 eps of the largest, F(2x2) 2)
        eps = {2: 16, 3: 64, 4: 64}[cm.winograd_training_block(cm.geometry(shape[1:-1], (3, 3), (1, 1), padding,
                                                                            (1, 1))[0])]
        np.testing.assert_allclose(a, b, rtol=0, atol=eps * np.finfo(np.float32).eps * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("shape,filters,padding", TRAINING_CASES)
@pytest.mark.parametrize("block", [2, 3, 4])
@pytest.mark.parametrize("openblas_avx512", [True, False])
def test_each_block_s_training_gradients_equal_the_convolution_s_to_rounding(monkeypatch, shape, filters, padding,
                                                                              block, openblas_avx512):
    """F(2x2)'s, F(3x3)'s and F(4x4)'s backward (training takes the one with the fewest products, and F(4x4) where
    the conv pools its output in F(4x4)'s transform: winograd_training_block), on a whole output gradient: the
    kernel's, input's and bias's gradients against the float64 convolution's, within 64 float32 eps of the largest
    (measured at most 3, 16 and 40); from the kept tiles or tiles made again, the same bits, and only the gradients
    asked for. The products in OpenBLAS, or (where it runs other kernels on an AVX-512 CPU) in the block product,
    V^T read in place for the kernel's gradient (engine/blas.product)."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(blas, "avx512_kernels", lambda: openblas_avx512)
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 16 * 36 * 96 * 2)  # a few samples per chunk: seams and a short last one
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, shape[-1], filters)) / np.sqrt(9 * shape[-1])).astype(np.float32)
    out, pads = cm.geometry(shape[1:-1], (3, 3), (1, 1), padding, (1, 1))
    tiles = {}
    y = cm.winograd_conv(x, kernel, None, out, pads, tiles, block=block)
    g = rng.standard_normal(y.shape).astype(np.float32)
    got = cm.winograd_backward(g, kernel, x, out, pads, tiles, block=block)
    xp = cm.pad(x.astype(np.float64), pads)
    cols = cm.im2col(xp, (3, 3), out, (1, 1), (1, 1)).reshape(-1, 9 * shape[-1])
    g64 = g.reshape(-1, filters).astype(np.float64)
    expected = [(cols.T @ g64).reshape(kernel.shape),
                cm.unpad(cm.col2im_matmul_numpy(g64, kernel.astype(np.float64), xp.shape, out, (1, 1), (1, 1)), pads),
                g64.sum(0)]
    for name, a, b in zip(("kernel", "input", "bias"), got, expected):
        assert a.dtype == np.float32 and a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=0, atol=64 * np.finfo(np.float32).eps * np.abs(b).max(), err_msg=name)
    again = cm.winograd_backward(g, kernel, x, out, pads, None, block=block)
    for a, b in zip(got, again):
        np.testing.assert_array_equal(a, b)
    kernel_only = cm.winograd_backward(g, kernel, x, out, pads, tiles, input_grad=False, bias_grad=False,
                                       block=block)
    assert kernel_only[1] is None and kernel_only[2] is None
    np.testing.assert_array_equal(kernel_only[0], got[0])


@pytest.mark.parametrize("kernel_grad,input_grad", [(True, False), (False, True)])
def test_training_computes_only_the_gradients_asked_for(monkeypatch, kernel_grad, input_grad):
    shape, filters = (5, 9, 8, 16), 8
    winograd = run_conv("numba", monkeypatch, shape, filters, "same", True, True, kernel_grad, input_grad)
    twin = run_conv("numpy", monkeypatch, shape, filters, "same", True, True, kernel_grad, input_grad)
    assert (winograd[1] is None) == (not input_grad) and (winograd[2] is None) == (not kernel_grad)
    for a, b in zip(winograd, twin):  # F(4x4): the twins test's 64 eps (2e-6, 17 eps, failed by 30 under SkylakeX)
        if b is not None:
            np.testing.assert_allclose(a, b, rtol=0, atol=64 * np.finfo(np.float32).eps * np.abs(b).max())


def test_each_call_of_a_shared_conv_keeps_its_own_input(monkeypatch):
    """Two calls of one layer before their backwards (a shared layer): each call's gradients equal those of a layer
    called once, and a second backward after one forward gives the first's again. Backward transforms each call's
    input again (no tiles kept where no pooling runs in the conv's pass)."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((2, 4, 8, 8, 16)).astype(np.float32)
    conv = layers.Conv2D(8, 3, padding="same")
    conv.build(x1.shape[1:])
    conv.input_grad_needed = True
    grad = rng.standard_normal((4, 8, 8, 8)).astype(np.float32)

    def step(*xs):
        """Forward of each x, then their backwards in reverse order: [(dx, kernel gradient)] per x."""
        states = []
        for x in xs:
            conv.forward(x, training=True)
            assert conv.tiles is None and conv.x is x
            states.append(dict(vars(conv)))  # what the graph executor keeps of each call of a shared layer
        results = []
        for state in reversed(states):
            vars(conv).update(state)
            conv.kernel.grad = np.zeros_like(conv.kernel.value)
            conv.bias.grad = np.zeros_like(conv.bias.value)
            results.append((conv.backward(grad), conv.kernel.grad.copy()))
        return results[::-1]
    [alone1], [alone2] = step(x1), step(x2)
    conv.kernel.grad[...] = 0
    again = conv.backward(grad), conv.kernel.grad
    for (dx, dk), (dx_alone, dk_alone) in zip([again] + step(x1, x2), [alone2, alone1, alone2]):
        np.testing.assert_array_equal(dx, dx_alone)
        np.testing.assert_array_equal(dk, dk_alone)


def test_conv2d_predicts_the_same_on_both_paths_and_backward_still_works(monkeypatch):
    """A Conv2D's inference forward on each path, then a backward pass after it (gradient checks call backward
    after an inference forward): gradients do not depend on the path the forward took."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 9, 11, 16)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 16, 8)) * 0.1).astype(np.float32)
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        conv = layers.Conv2D(8, 3, padding="same", activation="relu")
        conv.build(x.shape[1:])
        conv.kernel.value[...], conv.bias.value[...] = kernel, 0.3
        y = conv.forward(x, training=False)
        conv.kernel.grad, conv.bias.grad = np.zeros_like(conv.kernel.value), np.zeros_like(conv.bias.value)
        conv.input_grad_needed = True
        dx = conv.backward(np.ones_like(y))
        results.append((y, dx, conv.kernel.grad, conv.bias.grad))
    for compiled, twin in zip(*results):
        np.testing.assert_allclose(compiled, twin, rtol=1e-5, atol=1e-5 * np.abs(twin).max())


@pytest.mark.parametrize("kernel_shape,strides,dilation,groups", [
    ((3, 3, 16, 8), (2, 2), (1, 1), 1), ((3, 3, 16, 8), (1, 1), (2, 2), 1), ((3, 3, 8, 8), (1, 1), (1, 1), 2),
    ((5, 5, 16, 8), (1, 1), (1, 1), 1), ((3, 3, 1, 32), (1, 1), (1, 1), 1), ((3, 3, 3, 16, 8), (1, 1, 1), (1, 1, 1), 1),
    ((3, 16, 8), (1,), (1,), 1)])
def test_winograd_is_only_for_plain_3x3_stride_1_2d_convolutions_on_enough_channels(kernel_shape, strides, dilation,
                                                                                     groups):
    assert not cm.winograd_applies(kernel_shape, strides, dilation, groups)


def test_winograd_runs_only_with_the_compiled_kernels(monkeypatch):
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    assert cm.winograd_applies((3, 3, 16, 8), (1, 1), (1, 1), 1) and kernels.compiled("winograd") is not None
    monkeypatch.setenv("DLCLI_KERNELS", "numpy")
    assert not cm.winograd_applies((3, 3, 16, 8), (1, 1), (1, 1), 1)


def test_inference_transforms_a_kernel_once_while_its_bits_stay(monkeypatch):
    """Predict's passes share a kernel's transform (conv_math.inference_kernel); one written in place, as an
    optimizer or a user writes weights, is transformed anew, even where only a zero's sign changed; training
    transforms its kernel every step."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    transformed = []
    winograd_kernel = cm.winograd_kernel
    monkeypatch.setattr(cm, "winograd_kernel", lambda *a: transformed.append(a[1:]) or winograd_kernel(*a))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 16)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 16, 8)) / 12).astype(np.float32)
    out, pads = cm.geometry((8, 8), (3, 3), (1, 1), "same", (1, 1))
    first = cm.winograd_conv(x, kernel, None, out, pads, block=4)
    np.testing.assert_array_equal(cm.winograd_conv(x, kernel, None, out, pads, block=4), first)
    assert len(transformed) == 1
    for value in (1.5, 0.0, -0.0):
        kernel[1, 1, 0, 0] = value
        y = cm.winograd_conv(x, kernel, None, out, pads, block=4)
        np.testing.assert_allclose(y, reference(cm.pad(x, pads), kernel, None, out), rtol=0, atol=1e-5)
    assert len(transformed) == 4
    cm.winograd_conv(x, kernel, None, out, pads, keep={})
    cm.winograd_conv(x, kernel, None, out, pads, keep={})
    assert len(transformed) == 6


