"""Layers keras.applications defines for its own models, under their names there (ConvNeXt's LayerScale and
StochasticDepth, Inception-ResNet-v2's CustomScaleLayer): import-keras maps them by module and name, never by running
their code."""
import numpy as np

from dlcli.engine.layer import Layer, register
from dlcli.errors import ConfigError, ShapeError
from dlcli.layers.merge import _Merge, _onnx_aligned


@register("LayerScale")
class LayerScale(Layer):
    """x * gamma per feature of the last axis (Touvron et al. 2021); gamma (projection_dim,) starts at init_values."""

    supports_masking = True
    keras_package = "keras.applications"

    def __init__(self, init_values: float, projection_dim: int, **kw):
        super().__init__(**kw)
        self.init_values, self.projection_dim = float(init_values), int(projection_dim)

    def build(self, input_shape):
        if input_shape[-1] != self.projection_dim:
            raise ConfigError(f"LayerScale '{self.name}': projection_dim {self.projection_dim} must be the inputs' "
                              f"last axis ({input_shape[-1]})")
        self.gamma = self.add_weight("gamma", (self.projection_dim,), {"type": "constant", "value": self.init_values})

    def forward(self, x, training=False):
        self.x = x
        return x * self.gamma.value

    def backward(self, grad):
        if self.gamma.grad is not None:
            self.gamma.grad += (grad * self.x).reshape(-1, self.projection_dim).sum(0)
        return grad * self.gamma.value

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        return g.value(g.op("Mul", [x.name, g.weight(self, self.gamma.value, "gamma")], self.name), x.rank)


@register("StochasticDepth")
class StochasticDepth(Layer):
    """While training, each sample's whole input is dropped with probability drop_path_rate and the rest scaled by
    1 / (1 - rate) (Huang et al. 2016; keras.applications.convnext's floor(keep + U[0, 1)) draw); the identity at
    inference and in ONNX."""

    supports_masking = True
    keras_package = "keras.applications"

    def __init__(self, drop_path_rate: float, **kw):
        super().__init__(**kw)
        if not 0 <= drop_path_rate < 1:
            raise ConfigError(f"StochasticDepth: drop_path_rate must be in [0, 1); got {drop_path_rate}")
        self.drop_path_rate = float(drop_path_rate)

    def forward(self, x, training=False):
        self.scale = None
        if not training or self.drop_path_rate == 0:
            return x
        keep = 1 - self.drop_path_rate
        kept = np.floor(keep + self.rng.random((len(x),) + (1,) * (x.ndim - 1)))
        self.scale = (kept / keep).astype(x.dtype)
        return x * self.scale

    def backward(self, grad):
        return grad if self.scale is None else grad * self.scale

    def to_onnx(self, g, x, in_shape, mask):
        return x  # the identity at inference


@register("CustomScaleLayer")
class CustomScaleLayer(_Merge):
    """inputs[0] + inputs[1] * scale: Inception-ResNet-v2's scaled residual branch (Szegedy et al. 2016), as
    keras.applications.inception_resnet_v2 defines it (the scale a float32 multiply, as Keras' Python float)."""

    keras_package = "keras.applications"

    def __init__(self, scale: float, **kw):
        super().__init__(**kw)
        self.scale = float(scale)

    def output_shape(self, input_shape):
        if not isinstance(input_shape, list) or len(input_shape) != 2:
            raise ShapeError(f"CustomScaleLayer '{self.name}' takes [shortcut, residual]; it was called on "
                             f"{input_shape}")
        return super().output_shape(input_shape)

    def _merge(self, xs):
        return xs[0] + xs[1] * np.float32(self.scale)

    def _partials(self, grad):
        return [grad, grad * np.float32(self.scale)]

    def to_onnx(self, g, xs, in_shape, mask):
        xs = _onnx_aligned(g, xs)
        residual = g.op("Mul", [xs[1].name, g.weight(self, np.array(self.scale, np.float32), "scale")])
        return g.value(g.op("Add", [xs[0].name, residual], self.name), xs[0].rank, xs[0].first)
