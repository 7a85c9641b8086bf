"""keras.applications' own layers (ConvNeXt's LayerScale and StochasticDepth, Inception-ResNet-v2's CustomScaleLayer): gradient checks and their
training-time behaviour; tests/test_keras_catalogue.py compares them with Keras' classes."""
import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError
from tests.gradcheck import check_layer

GRADIENT_CASES = {
    "LayerScale": [({"init_values": 0.1, "projection_dim": 4}, (3, 4), {})],
    "CustomScaleLayer": [({"scale": 0.17}, [(3, 4), (3, 4)], {}), ({"scale": -2.0}, [(2, 3), (3,)], {})],
    "StochasticDepth": [({"drop_path_rate": 0.5}, (2, 3), {"training": True, "batch": 6}),
                        ({"drop_path_rate": 0.5}, (4,), {})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients(name, args, shape, opts):
    check_layer(layers.LAYERS.get(name)(**args), shape, **opts)


def test_stochastic_depth_drops_whole_samples_while_training():
    layer = layers.StochasticDepth(drop_path_rate=0.25)
    layer.ensure_built((3, 4), np.random.default_rng(0))
    x = np.ones((4000, 3, 4), np.float32)
    assert layer.forward(x) is x
    y = layer.forward(x, training=True)
    per_sample = y.reshape(len(y), -1)
    assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}
    assert (per_sample.min(1) == per_sample.max(1)).all()  # a sample is kept or dropped whole
    assert (per_sample[:, 0] == 0).mean() == pytest.approx(0.25, abs=0.02)


def test_layer_scale_starts_at_init_values():
    layer = layers.LayerScale(init_values=1e-6, projection_dim=3)
    layer.ensure_built((5, 3))
    assert [p.name for p in layer.weights] == ["gamma"] and np.all(layer.gamma.value == np.float32(1e-6))
    with pytest.raises(ConfigError, match="projection_dim 4 must be the inputs' last axis"):
        layers.LayerScale(init_values=0.1, projection_dim=4).ensure_built((5, 3))
