import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import check_layer

# Gradient-check table: layer type -> list of (constructor args, input shape without batch, check options).
GRADIENT_CASES = {
    "ZeroPadding2D": [({}, (3, 2, 2), {}), ({"padding": [[1, 0], [2, 3]]}, (2, 3, 1), {})],
    "Cropping2D": [({"cropping": 1}, (4, 5, 2), {}), ({"cropping": [[0, 2], [1, 0]]}, (5, 3, 1), {})],
    "UpSampling2D": [({}, (2, 3, 2), {}), ({"size": [3, 1]}, (2, 2, 1), {})],
    "SpatialDropout2D": [({"rate": 0.5}, (3, 3, 4), {"training": True}), ({"rate": 0.5}, (2, 2, 3), {})],
    "ZeroPadding1D": [({}, (3, 2), {}), ({"padding": [0, 2]}, (2, 3), {})],
    "ZeroPadding3D": [({}, (2, 2, 1, 2), {}), ({"padding": [[1, 0], [0, 1], [2, 0]]}, (1, 2, 2, 1), {})],
    "Cropping1D": [({}, (4, 2), {}), ({"cropping": [0, 2]}, (5, 1), {})],
    "Cropping3D": [({}, (3, 4, 3, 1), {}), ({"cropping": [1, 0, 2]}, (3, 2, 5, 2), {})],
    "UpSampling1D": [({}, (3, 2), {}), ({"size": 3}, (2, 1), {})],
    "UpSampling3D": [({}, (2, 1, 2, 2), {}), ({"size": [1, 2, 3]}, (2, 2, 1, 1), {})],
    "SpatialDropout1D": [({"rate": 0.5}, (4, 3), {"training": True})],
    "SpatialDropout3D": [({"rate": 0.5}, (2, 2, 2, 3), {"training": True})],
    "RepeatVector": [({"n": 3}, (4,), {})],
    "Permute": [({"dims": [2, 1]}, (3, 4), {}), ({"dims": [3, 1, 2]}, (2, 3, 4), {})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts):
    layer = layers.LAYERS.get(name)(**args)
    out = check_layer(layer, shape, **opts)
    assert out.shape[1:] == tuple(layer.output_shape(shape))


def test_padding_and_cropping_follow_keras_forms():
    x = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)
    y = layers.ZeroPadding2D(((1, 2), (0, 1)))(x)
    assert y.shape == (2, 6, 5, 1) and np.array_equal(y[:, 1:4, 0:4], x) and y[:, 0].sum() == 0
    assert layers.ZeroPadding2D(2).output_shape((3, 4, 1)) == (7, 8, 1)
    assert layers.ZeroPadding2D((1, 2)).output_shape((3, 4, 1)) == (5, 8, 1)
    c = layers.Cropping2D(((1, 0), (1, 2)))(x)
    assert np.array_equal(c, x[:, 1:, 1:2])
    with pytest.raises(ShapeError, match="'crop'.*removes everything"):
        layers.Cropping2D(2, name="crop").output_shape((3, 4, 1))
    with pytest.raises(ConfigError):
        layers.ZeroPadding2D("wide")


def test_upsampling_repeats_nearest():
    x = np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)
    y = layers.UpSampling2D((2, 3))(x)
    np.testing.assert_array_equal(y[0, :, :, 0], np.repeat(np.repeat(x[0, :, :, 0], 2, 0), 3, 1))


def test_spatial_dropout_drops_whole_channels():
    x = np.ones((8, 5, 5, 16), np.float32)
    drop = layers.SpatialDropout2D(0.5)
    assert np.array_equal(drop(x), x)
    y = drop.forward(x, training=True)
    per_map = y.reshape(8, 25, 16)
    assert (per_map.min(1) == per_map.max(1)).all() and set(np.unique(y)) <= {0.0, 2.0}



def test_spatial_dropout_drops_whole_channels_and_n_d_forms():
    drop = layers.SpatialDropout1D(0.5)
    drop.ensure_built((6, 8), np.random.default_rng(0))
    y = drop.forward(np.ones((4, 6, 8), np.float32), training=True)
    assert set(np.unique(y)) <= {0.0, 2.0} and (y == y[:, :1]).all()  # one draw per (sample, channel)
    assert layers.ZeroPadding3D(2).padding == ((2, 2),) * 3 and layers.Cropping1D(3).cropping == ((3, 3),)
    assert layers.UpSampling3D(2).output_shape((2, 3, 4, 5)) == (4, 6, 8, 5)
    with pytest.raises(ShapeError, match="expects inputs \\(batch, steps, channels\\)"):
        layers.ZeroPadding1D().output_shape((3, 4, 5))
    with pytest.raises(ConfigError, match="Permute: dims must be a permutation"):
        layers.Permute([1, 3])
