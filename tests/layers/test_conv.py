import itertools

import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError, ShapeError
from dlcli.kernels import gemm
from tests.gradcheck import check_layer

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
GRADIENT_CASES = {
    "Conv1D": [({"filters": 3, "kernel_size": 3}, (7, 2), {}),
               ({"filters": 4, "kernel_size": 3, "groups": 2, "strides": 2, "padding": "same"}, (7, 6), {}),
               ({"filters": 2, "kernel_size": 2, "strides": 2, "padding": "same", "activation": "tanh"}, (7, 3), {}),
               ({"filters": 2, "kernel_size": 3, "padding": "causal", "dilation_rate": 2}, (6, 2), {}),
               ({"filters": 2, "kernel_size": 3, "use_bias": False}, (5, 9), {}),
               # padded, 8 channels or more, no bias: the compiled gather reads the unpadded input
               ({"filters": 2, "kernel_size": 3, "padding": "causal", "use_bias": False}, (6, 8), {})],
    "Conv2D": [({"filters": f, "kernel_size": k, "strides": s, "padding": p, "dilation_rate": d}, shape, {})
               for (f, k, s, p, d), shape in zip(
                   [(2, 3, 1, "valid", 1), (3, 2, 2, "same", 1), (2, (3, 2), (2, 1), "valid", 1),
                    (2, 3, 1, "same", 2), (2, 2, 3, "same", 1), (3, 3, 2, "valid", 1)],
                   [(5, 6, 2), (5, 7, 3), (7, 5, 2), (6, 5, 2), (7, 7, 1), (7, 6, 9)])]
              + [({"filters": 3, "kernel_size": 3, "activation": "relu", "use_bias": False}, (5, 5, 2), {}),
                 ({"filters": 4, "kernel_size": 3, "groups": 4, "padding": "same", "activation": "tanh"}, (4, 5, 4), {}),
                 ({"filters": 3, "kernel_size": 2, "groups": 3, "use_bias": False, "dilation_rate": 2}, (5, 5, 6),
                  {}),
                 # the resnet's stride-2 conv: padded, 8 channels or more, no bias (the compiled gather)
                 ({"filters": 3, "kernel_size": 3, "strides": 2, "padding": "same", "use_bias": False}, (5, 6, 9), {}),
                 # 16 channels: Winograd on the compiled path, at inference and in training (odd outputs)
                 ({"filters": 3, "kernel_size": 3, "padding": "same", "activation": "tanh"}, (5, 4, 16), {}),
                 ({"filters": 2, "kernel_size": 3}, (5, 6, 16), {"training": True})],
    "Conv3D": [({"filters": 2, "kernel_size": 2}, (3, 4, 3, 2), {}),
               ({"filters": 2, "kernel_size": (2, 3, 2), "strides": 2, "padding": "same"}, (3, 5, 4, 1), {})],
    "Conv2DTranspose": [({"filters": 2, "kernel_size": 3}, (3, 4, 2), {}),
                        ({"filters": 2, "kernel_size": 3, "strides": 2, "padding": "same"}, (3, 3, 2), {}),
                        ({"filters": 3, "kernel_size": 4, "strides": 2, "padding": "same"}, (2, 3, 1), {}),
                        ({"filters": 2, "kernel_size": 2, "strides": 3}, (3, 2, 2), {}),
                        ({"filters": 2, "kernel_size": 3, "strides": 2, "output_padding": 1}, (2, 3, 2), {}),
                        ({"filters": 2, "kernel_size": 3, "dilation_rate": 2, "padding": "same",
                          "activation": "tanh"}, (4, 3, 9), {})],
    "DepthwiseConv2D": [({"kernel_size": 3}, (5, 4, 2), {}),
                        ({"kernel_size": 2, "strides": 2, "padding": "same", "depth_multiplier": 2}, (5, 5, 3), {}),
                        ({"kernel_size": 3, "dilation_rate": 2, "activation": "tanh"}, (6, 5, 2), {})],
    "Conv1DTranspose": [({"filters": 2, "kernel_size": 3}, (4, 2), {}),
                        ({"filters": 3, "kernel_size": 4, "strides": 2, "padding": "same"}, (3, 2), {}),
                        ({"filters": 2, "kernel_size": 3, "strides": 2, "output_padding": 1, "activation": "tanh"},
                         (3, 9), {})],
    "Conv3DTranspose": [({"filters": 2, "kernel_size": 2, "strides": 2}, (2, 3, 2, 2), {}),
                        ({"filters": 2, "kernel_size": (3, 2, 2), "padding": "same", "dilation_rate": (1, 2, 1)},
                         (3, 2, 3, 1), {})],
    "DepthwiseConv1D": [({"kernel_size": 3}, (6, 2), {}),
                        ({"kernel_size": 2, "strides": 2, "padding": "same", "depth_multiplier": 2,
                          "activation": "tanh"}, (5, 3), {})],
    "SeparableConv1D": [({"filters": 3, "kernel_size": 3, "dilation_rate": 2}, (7, 2), {}),
                        ({"filters": 2, "kernel_size": 2, "padding": "same", "depth_multiplier": 2,
                          "use_bias": False}, (5, 3), {})],
    "SeparableConv2D": [({"filters": 3, "kernel_size": 3}, (5, 4, 2), {}),
                        ({"filters": 2, "kernel_size": 2, "strides": 2, "padding": "same", "depth_multiplier": 2,
                          "use_bias": False}, (5, 3, 2), {})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts, kernel_path):
    layer = layers.LAYERS.get(name)(**args)
    out = check_layer(layer, shape, **opts)
    assert out.shape[1:] == tuple(layer.output_shape(shape))


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_gathers_patches_a_few_samples_at_a_time_with_the_same_result(monkeypatch, use_bias, kernel_path):
    """Chunks of 2 samples and a last chunk of 1 (conv_math.CHUNK_FLOATS made small) against one chunk."""
    from dlcli.layers import conv_math as cm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 6, 7, 9)).astype(np.float32)
    grad = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
    kernel = rng.standard_normal((2, 2, 9, 4)).astype(np.float32)
    results = []
    for floats in (10**9, 2 * 3 * 4 * (2 * 2 * 9 + 1)):
        monkeypatch.setattr(cm, "CHUNK_FLOATS", floats)
        layer = layers.Conv2D(4, 2, strides=2, padding="same", use_bias=use_bias, activation="relu")
        layer.build(x.shape[1:])
        layer.kernel.value[...] = kernel
        for p in layer.weights:
            p.grad = np.zeros_like(p.value)
        layer.input_grad_needed = True
        y = layer.forward(x, training=True)
        assert (layer.cols is None) == (floats < 10**9)  # chunked: nothing kept for backward
        results.append([y, layer.backward(grad)] + [p.grad.copy() for p in layer.weights])
    for chunked, whole in zip(results[1], results[0]):
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    check_layer(layers.Conv2D(3, 3, padding="same"), (5, 4, 9), batch=5)  # the gradient check, chunked


def naive_conv2d(x, kernel, bias, strides, padding, dilation):
    """Direct loops over output positions: the reference, TF's definition (same pads: extra at bottom/right)."""
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    sh, sw = strides
    dh, dw = dilation
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + ekh - h, 0), max((ow - 1) * sw + ekw - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (h - ekh) // sh + 1, (w - ekw) // sw + 1
    y = np.zeros((n, oh, ow, f))
    for i, j in itertools.product(range(oh), range(ow)):
        for a, b in itertools.product(range(kh), range(kw)):
            y[:, i, j] += x[:, i * sh + a * dh, j * sw + b * dw] @ kernel[a, b]
    return y + bias


@pytest.mark.parametrize("strides,padding,dilation", [((1, 1), "valid", (1, 1)), ((2, 2), "same", (1, 1)),
                                                      ((2, 1), "same", (1, 1)), ((1, 1), "same", (2, 3)),
                                                      ((3, 2), "valid", (1, 1))])
def test_conv2d_matches_naive_loops_in_keras_layout(strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 7, 3))
    conv = layers.Conv2D(4, (3, 2), strides=strides, padding=padding, dilation_rate=dilation, dtype="float64")
    conv.ensure_built(x.shape[1:])
    conv.bias.value = rng.normal(size=4)
    assert conv.kernel.value.shape == (3, 2, 3, 4)
    expected = naive_conv2d(x, conv.kernel.value, conv.bias.value, strides, padding, dilation)
    np.testing.assert_allclose(conv.forward(x), expected, rtol=1e-10, atol=1e-12)


def test_conv2d_transpose_is_the_adjoint_of_conv2d():
    """<conv(x), y> == <x, conv_transpose(y)> with the same kernel, so the layouts match Keras/TF."""
    rng = np.random.default_rng(1)
    for strides, padding, size in [(2, "same", 6), (2, "valid", 7), (1, "valid", 5), (3, "same", 9), (1, "same", 5)]:
        conv = layers.Conv2D(3, 3, strides=strides, padding=padding, use_bias=False, dtype="float64")
        conv.ensure_built((size, size, 2))
        x = rng.normal(size=(2, size, size, 2))
        y = conv.forward(x)
        tconv = layers.Conv2DTranspose(2, 3, strides=strides, padding=padding, use_bias=False, dtype="float64")
        tconv.ensure_built(y.shape[1:])
        tconv.kernel.value = conv.kernel.value  # (kh, kw, in, out) of the conv is (kh, kw, filters, in) here
        g = rng.normal(size=y.shape)
        back = tconv.forward(g)
        assert back.shape == x.shape
        assert np.isclose((y * g).sum(), (x * back).sum())


def test_conv2d_transpose_output_shapes_follow_keras():
    cases = [((3, 3, 2), dict(kernel_size=3, strides=2, padding="same"), (6, 6, 5)),
             ((3, 3, 2), dict(kernel_size=3, strides=2), (7, 7, 5)),
             ((3, 3, 2), dict(kernel_size=2, strides=3), (9, 9, 5)),
             ((3, 3, 2), dict(kernel_size=3, strides=2, padding="same", output_padding=0), (5, 5, 5))]
    for shape, args, expected in cases:
        assert layers.Conv2DTranspose(5, **args).output_shape(shape) == expected


def test_depthwise_and_separable_match_keras_weight_layouts():
    d = layers.DepthwiseConv2D(3, depth_multiplier=2)
    y = d(np.ones((1, 5, 5, 3), np.float32))
    assert [w.shape for w in d.get_weights()] == [(3, 3, 3, 2), (6,)] and y.shape == (1, 3, 3, 6)
    s = layers.SeparableConv2D(4, 3, depth_multiplier=2)
    s(np.ones((1, 5, 5, 3), np.float32))
    assert [p.name for p in s.weights] == ["depthwise_kernel", "pointwise_kernel", "bias"]
    assert [w.shape for w in s.get_weights()] == [(3, 3, 3, 2), (1, 1, 6, 4), (4,)]


@pytest.mark.parametrize("groups,channels", [(2, 6), (3, 3)])
def test_grouped_conv_is_one_conv_per_block_of_channels(groups, channels):
    """Keras' groups: input channels and filters in `groups` consecutive blocks, filter block j convolving channel
    block j alone; the kernel (*k, in/groups, filters). Checked against separate Conv2Ds on the channel slices."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 6, channels)).astype(np.float32)
    grouped = layers.Conv2D(groups * 2, 3, strides=2, padding="same", groups=groups)
    y = grouped(x)
    kernel, bias = grouped.get_weights()
    assert kernel.shape == (3, 3, channels // groups, groups * 2)
    size = channels // groups
    for j in range(groups):
        single = layers.Conv2D(2, 3, strides=2, padding="same")
        single.ensure_built(x.shape[1:-1] + (size,))
        single.set_weights([kernel[..., 2 * j:2 * j + 2], bias[2 * j:2 * j + 2]])
        np.testing.assert_allclose(y[..., 2 * j:2 * j + 2], single(x[..., size * j:size * (j + 1)]), atol=1e-6)
    assert grouped.flops(x.shape[1:]) == groups * single.flops((*x.shape[1:-1], size))
    with pytest.raises(ConfigError, match="filters \\(5\\) must be a multiple of groups \\(2\\)"):
        layers.Conv2D(5, 3, groups=2)
    with pytest.raises(ConfigError, match="its input's 3 channels must be a multiple of groups \\(2\\)"):
        layers.Conv2D(4, 3, groups=2).ensure_built((5, 5, 3))


@pytest.mark.parametrize("rank,shape", [(1, (9, 4)), (2, (8, 7, 4))])
def test_depthwise_and_separable_flops_count_their_multiply_adds(rank, shape):
    """A depthwise convolution is a Conv with one filter per input channel and depth multiplier: its FLOPs are
    those of that Conv on one input channel, times the channels; a separable one adds its 1x1 pointwise Conv."""
    conv = {1: layers.Conv1D, 2: layers.Conv2D}[rank]
    depthwise = {1: layers.DepthwiseConv1D, 2: layers.DepthwiseConv2D}[rank]
    separable = {1: layers.SeparableConv1D, 2: layers.SeparableConv2D}[rank]
    args = dict(kernel_size=3, strides=2, padding="same")
    one_channel = conv(2, **args).flops((*shape[:-1], 1))  # depth_multiplier 2 filters over one channel
    assert depthwise(depth_multiplier=2, **args).flops(shape) == shape[-1] * one_channel > 0
    mid = depthwise(depth_multiplier=2, **args).output_shape(shape)
    pointwise = conv(5, kernel_size=1).flops(mid)
    assert separable(5, depth_multiplier=2, **args).flops(shape) == shape[-1] * one_channel + pointwise
    # 8x7 same-padded at stride 2 is 4x4 outputs; 4 channels x 2 each, 9 taps: 2 * 16 * 9 * 8 multiply-adds
    assert rank == 1 or depthwise(depth_multiplier=2, **args).flops(shape) == 2 * 16 * 9 * 8


def test_depthwise_channel_order_is_channel_major():
    """Output channel c * depth_multiplier + m reads input channel c only (TF's ordering)."""
    d = layers.DepthwiseConv2D(1, depth_multiplier=2, use_bias=False, dtype="float64")
    d.ensure_built((2, 2, 3))
    d.kernel.value = np.arange(6.0).reshape(1, 1, 3, 2)
    y = d.forward(np.broadcast_to(np.array([1.0, 10.0, 100.0]), (1, 2, 2, 3)))
    np.testing.assert_allclose(y[0, 0, 0], [0, 1, 20, 30, 400, 500])


def test_conv_is_float32_end_to_end_and_1d_works_on_sequences():
    conv = layers.Conv1D(8, 5, padding="same", activation="relu")
    y = conv(np.ones((4, 20, 3), np.float32))
    assert y.dtype == np.float32 and y.shape == (4, 20, 8)
    assert conv.backward(np.ones_like(y)).dtype == np.float32
    assert layers.Conv1D(4, 3, padding="causal").output_shape((None, 6)) == (None, 4)


def test_conv_kernel_larger_than_input_names_the_layer():
    with pytest.raises(ShapeError, match="'too_big'.*larger than its input"):
        layers.Conv2D(4, 5, name="too_big").output_shape((3, 3, 1))
    with pytest.raises(ShapeError, match="'flat'.*expects inputs of shape"):
        layers.Conv2D(4, 3, name="flat").output_shape((28, 28))
    with pytest.raises(ConfigError, match="strides > 1 cannot be combined"):
        layers.Conv2D(4, 3, strides=2, dilation_rate=2)
    with pytest.raises(ConfigError, match="padding"):
        layers.Conv2D(4, 3, padding="causal")


def test_conv_config_round_trips_and_initialisation_follows_keras():
    conv = layers.Conv2D(32, 3, activation="relu", name="c")
    config = conv.get_config()
    assert config["filters"] == 32 and config["kernel_size"] == 3 and config["padding"] == "valid"
    again = layers.Conv2D(**{k: v for k, v in config.items() if k != "type"})
    assert again.get_config() == config
    conv.ensure_built((28, 28, 1))
    # glorot_uniform with Keras' conv fans: fan_in = 9 * 1, fan_out = 9 * 32
    assert np.abs(conv.kernel.value).max() <= np.sqrt(6 / (9 + 288))


def test_book_convnet_shapes_and_parameter_count_match_keras():
    """Chollet's MNIST convnet: Keras' summary shows these shapes and 93,322 parameters."""
    stack = [layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2), layers.Conv2D(64, 3, activation="relu"),
             layers.MaxPooling2D(2), layers.Conv2D(64, 3, activation="relu"), layers.Flatten(),
             layers.Dense(64, activation="relu"), layers.Dense(10, activation="softmax")]
    t = layers.Input((28, 28, 1))
    shapes = []
    for layer in stack:
        t = layer(t)
        shapes.append(t.shape)
    assert shapes == [(26, 26, 32), (13, 13, 32), (11, 11, 64), (5, 5, 64), (3, 3, 64), (576,), (64,), (10,)]
    assert [layer.count_params() for layer in stack] == [320, 0, 18496, 0, 36928, 0, 36928, 650]
    assert sum(layer.count_params() for layer in stack) == 93322
    x = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    for layer in stack:
        x = layer.forward(x, training=True)
    assert x.shape == (2, 10) and x.dtype == np.float32


def test_stacked_pools_too_small_fail_at_shape_time_naming_the_layer():
    t = layers.Input((8, 8, 1))
    t = layers.MaxPooling2D(2)(layers.Conv2D(4, 3)(t))
    with pytest.raises(ShapeError, match="'conv_late'"):
        layers.Conv2D(4, 5, name="conv_late")(t)


def test_every_image_layer_config_round_trips():
    from tests.layers import test_normalization, test_pooling, test_preprocessing, test_reshaping

    tables = [GRADIENT_CASES, test_pooling.GRADIENT_CASES, test_normalization.GRADIENT_CASES,
              test_reshaping.GRADIENT_CASES, test_preprocessing.GRADIENT_CASES]
    for table in tables:
        for name, cases in table.items():
            for args, _, _ in cases:
                config = layers.LAYERS.get(name)(**args).get_config()
                again = layers.LAYERS.get(name)(**{k: v for k, v in config.items() if k != "type"})
                assert again.get_config() == config, name


# The im2col convs (blas.product's users in conv.py and conv_math.col2im_matmul): the resnet's stride-2 conv and its
# 1x1 projection, a few-channel conv with a bias (forward in np.dot), 1D, and a transposed conv (col2im forward)
IM2COL_CASES = [(lambda: layers.Conv2D(7, 3, strides=2, padding="same", use_bias=False), (9, 13, 10, 12)),
                (lambda: layers.Conv2D(6, 1, strides=2), (9, 7, 8, 10)),
                (lambda: layers.Conv2D(5, 3, padding="same"), (9, 8, 8, 1)),
                (lambda: layers.Conv1D(6, 3, padding="causal"), (9, 20, 9)),
                (lambda: layers.Conv2DTranspose(6, 3, strides=2, padding="same"), (9, 5, 5, 10))]


@pytest.mark.skipif(not gemm.AVX512, reason="the block product runs on AVX-512 CPUs only")
@pytest.mark.parametrize("make,shape", IM2COL_CASES)
def test_im2col_convs_take_the_block_product_under_avx2_openblas_with_the_same_bits_on_any_lanes(monkeypatch, make,
                                                                                                 shape):
    """Where OpenBLAS runs AVX2 kernels (this workplace) the products go through the block product: within rounding
    of OpenBLAS's, the same bits on 1, 2 and 3 lanes (each element's sum in a fixed order, chunks summed in order)."""
    from dlcli.engine import blas, lanes
    from dlcli.layers import conv_math as cm

    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(cm, "CHUNK_FLOATS", 1 << 10)  # several chunks
    monkeypatch.setattr(lanes, "SHORT_FLOATS", 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    real, calls = blas.product, []
    monkeypatch.setattr(blas, "product", lambda a, b, out=None: calls.append(a.shape) or real(a, b, out))

    def run(avx512_blas, count):
        monkeypatch.setattr(blas, "avx512_kernels", lambda: avx512_blas)
        monkeypatch.setattr(lanes, "count", lambda: count)
        layer = make()
        layer.build(shape[1:])
        layer.input_grad_needed = True
        for p in layer.weights:
            p.value[...] = np.random.default_rng(1).uniform(-1, 1, p.value.shape)
            p.grad = np.zeros_like(p.value)
        y = layer.forward(x, training=True)
        dx = layer.backward(np.random.default_rng(2).standard_normal(y.shape).astype(np.float32))
        return [y, dx] + [p.grad.copy() for p in layer.weights]

    matmul = run(True, 1)
    block = [run(False, count) for count in (1, 2, 3)]
    assert calls and blas.block_products() is not None
    for got, want in zip(block[0], matmul):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    for one, two, three in zip(*block):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)
