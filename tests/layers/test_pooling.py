import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer


def distinct(shape, seed=0):
    """Inputs without ties, so max pooling's gradient is well defined under central differences."""
    return [np.random.default_rng(seed).permutation(np.prod((3, *shape))).reshape(3, *shape) / 7.0]


def pool_cases(rank, shapes):
    args = [{}, {"pool_size": 3, "strides": 2}, {"pool_size": 2, "padding": "same"},
            {"pool_size": 3, "strides": 1, "padding": "same"}, {"pool_size": 2, "strides": 3}]
    return [(a, s, {}) for a, s in zip(args, shapes)]


SHAPES_1D = [(6, 2), (7, 3), (5, 2), (4, 1), (8, 2)]
SHAPES_2D = [(4, 6, 2), (7, 5, 2), (5, 3, 1), (4, 3, 2), (7, 8, 1)]

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
GRADIENT_CASES = {
    "MaxPooling1D": pool_cases(1, SHAPES_1D),
    "MaxPooling2D": pool_cases(2, SHAPES_2D) + [({"pool_size": (2, 3), "strides": (1, 2)}, (5, 7, 2), {})],
    "MaxPooling3D": [({}, (4, 4, 5, 2), {}), ({"pool_size": 2, "padding": "same"}, (3, 5, 3, 1), {})],
    "AveragePooling1D": pool_cases(1, SHAPES_1D),
    "AveragePooling2D": pool_cases(2, SHAPES_2D) + [({"pool_size": (2, 3), "strides": (1, 2)}, (5, 7, 2), {})],
    "AveragePooling3D": [({"pool_size": 2, "padding": "same"}, (3, 5, 3, 1), {})],
    "GlobalMaxPooling1D": [({}, (5, 3), {}), ({"keepdims": True}, (4, 2), {})],
    "GlobalMaxPooling2D": [({}, (3, 4, 2), {})],
    "GlobalMaxPooling3D": [({}, (2, 3, 4, 2), {})],
    "GlobalAveragePooling1D": [({}, (5, 3), {}),
                               ({}, (4, 2), {"mask": np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)})],
    "GlobalAveragePooling2D": [({}, (3, 4, 2), {}), ({"keepdims": True}, (3, 3, 1), {})],
    "GlobalAveragePooling3D": [({}, (2, 3, 4, 2), {})],
    # windows that overlap where a size does not divide (7 -> 3: [0, 3), [2, 5), [4, 7)), that tile, that grow
    "AdaptiveMaxPooling1D": [({"output_size": 3}, (7, 2), {}), ({"output_size": 4}, (3, 2), {})],
    "AdaptiveMaxPooling2D": [({"output_size": [3, 2]}, (7, 4, 2), {}), ({"output_size": 2}, (5, 5, 1), {})],
    "AdaptiveMaxPooling3D": [({"output_size": [2, 3, 1]}, (3, 5, 2, 2), {})],
    "AdaptiveAveragePooling1D": [({"output_size": 3}, (7, 2), {}), ({"output_size": 4}, (3, 2), {})],
    "AdaptiveAveragePooling2D": [({"output_size": [3, 2]}, (7, 4, 2), {})],
    "AdaptiveAveragePooling3D": [({"output_size": [2, 3, 1]}, (3, 5, 2, 2), {})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts, kernel_path):
    layer = layers.LAYERS.get(name)(**args)
    inputs = distinct(shape) if "Max" in name else None
    out = check_layer(layer, shape, inputs=inputs, **opts)
    assert out.shape[1:] == tuple(layer.output_shape(shape))


def naive_pool(x, pool, strides, padding, reduce):
    n, h, w, c = x.shape
    if padding == "same":
        oh, ow = -(-h // strides[0]), -(-w // strides[1])
        ph, pw = max((oh - 1) * strides[0] + pool[0] - h, 0), max((ow - 1) * strides[1] + pool[1] - w, 0)
        top, left = ph // 2, pw // 2
    else:
        oh, ow, top, left = (h - pool[0]) // strides[0] + 1, (w - pool[1]) // strides[1] + 1, 0, 0
    y = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * strides[0] - top, j * strides[1] - left
            win = x[:, max(r0, 0):r0 + pool[0], max(c0, 0):c0 + pool[1]]
            y[:, i, j] = reduce(win, axis=(1, 2))
    return y


@pytest.mark.parametrize("kind,reduce", [("MaxPooling2D", np.max), ("AveragePooling2D", np.mean)])
@pytest.mark.parametrize("pool,strides,padding", [((2, 2), None, "valid"), ((3, 3), (2, 2), "same"),
                                                  ((2, 3), (1, 2), "same"), ((3, 2), (2, 1), "valid")])
def test_pooling_matches_naive_windows(kind, reduce, pool, strides, padding, kernel_path):
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3))
    layer = layers.LAYERS.get(kind)(pool, strides, padding, dtype="float64")
    expected = naive_pool(x, pool, strides or pool, padding, reduce)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12)


def test_max_pool_gradient_goes_to_the_first_maximum_only(kernel_path):
    pool = layers.MaxPooling2D()
    x = np.zeros((1, 2, 2, 1), np.float32)
    pool(x)
    np.testing.assert_array_equal(pool.backward(np.ones((1, 1, 1, 1), np.float32))[0, :, :, 0], [[1, 0], [0, 0]])


def test_pooling_1d_on_sequences_and_float32():
    y = layers.MaxPooling1D(2)(np.ones((2, 9, 4), np.float32))
    assert y.shape == (2, 4, 4) and y.dtype == np.float32
    assert layers.AveragePooling1D(3, padding="same").output_shape((10, 4)) == (4, 4)
    assert layers.GlobalAveragePooling1D().output_shape((None, 4)) == (4,)


def test_pool_larger_than_input_names_the_layer():
    with pytest.raises(ShapeError, match="'shrunk'.*larger than its input"):
        layers.MaxPooling2D(4, name="shrunk").output_shape((3, 3, 8))
    with pytest.raises(ShapeError, match="'g'"):
        layers.GlobalMaxPooling2D(name="g").output_shape((3, 8))


@pytest.mark.parametrize("size,out,windows", [(7, 3, [[0, 1, 2], [2, 3, 4], [4, 5, 6]]), (6, 3, [[0, 1], [2, 3], [4, 5]]),
                                               (3, 5, [[0], [0, 1], [1], [1, 2], [2]]), (5, 2, [[0, 1, 2], [2, 3, 4]])])
def test_adaptive_windows_are_pytorchs(size, out, windows):
    from dlcli.layers.pooling import adaptive_windows

    index, length = adaptive_windows(size, out)
    assert [list(row[:n]) for row, n in zip(index, length)] == windows


def test_adaptive_pooling_takes_any_input_size():
    x = np.arange(2 * 9 * 5 * 3, dtype=np.float32).reshape(2, 9, 5, 3)
    pool = layers.AdaptiveAveragePooling2D(output_size=[3, 1])
    assert pool.output_shape((9, 5, 3)) == (3, 1, 3) and pool.output_shape((40, 2, 3)) == (3, 1, 3)
    np.testing.assert_allclose(pool(x)[:, :, 0], x.reshape(2, 3, 3, 5, 3).mean((2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(layers.AdaptiveMaxPooling2D(output_size=[3, 1])(x)[:, :, 0], x[:, 2::3, -1])
    with pytest.raises(ConfigError, match="channels_last only"):
        layers.AdaptiveMaxPooling1D(output_size=2, data_format="channels_first")
