"""Noise layers (keras.layers GaussianNoise, GaussianDropout, AlphaDropout): random only while training, the
identity at inference (and in ONNX). Their noise comes from the layer's seeded generator, like Dropout's. And
ActivityRegularization, the identity that adds a penalty on its input to the training loss."""
import math

import numpy as np

from dlcli.engine.layer import Layer, register
from dlcli.errors import ConfigError
from dlcli.layers.core import noise_shape


class _Noise(Layer):
    supports_masking = True

    def __init__(self, seed: int | None = None, **kw):
        super().__init__(**kw)
        self.seed = seed  # Keras' argument; the run's seed drives self.rng

    def backward(self, grad):
        return grad if self.factor is None else grad * self.factor

    def to_onnx(self, g, x, in_shape, mask):
        return x  # the identity at inference


def _rate(layer: str, rate) -> float:
    if not 0 <= rate < 1:
        raise ConfigError(f"{layer}: rate must be in [0, 1) (as in Keras); got {rate}")
    return float(rate)


@register("GaussianNoise")
class GaussianNoise(_Noise):
    """x + N(0, stddev^2) while training."""

    def __init__(self, stddev: float, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        if stddev < 0:
            raise ConfigError(f"GaussianNoise: stddev cannot be negative; got {stddev}")
        self.stddev = float(stddev)

    def forward(self, x, training=False):
        self.factor = None
        if not training or not self.stddev:
            return x
        return x + self.rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype) * x.dtype.type(self.stddev)


@register("GaussianDropout")
class GaussianDropout(_Noise):
    """x * N(1, rate / (1 - rate)) while training: multiplicative noise with dropout's variance."""

    def __init__(self, rate: float, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.rate = _rate("GaussianDropout", rate)

    def forward(self, x, training=False):
        self.factor = None
        if not training or not self.rate:
            return x
        stddev = math.sqrt(self.rate / (1 - self.rate))
        self.factor = (1 + self.rng.standard_normal(x.shape, dtype=np.float32) * np.float32(stddev)).astype(x.dtype)
        return x * self.factor


@register("AlphaDropout")
class AlphaDropout(_Noise):
    """Dropout for SELU networks (Klambauer et al. 2017): dropped units become SELU's negative saturation value and
    a * x + b restores the mean and variance (Keras' formula)."""

    def __init__(self, rate: float, noise_shape: list[int | None] | None = None, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.rate, self.noise_shape = _rate("AlphaDropout", rate), noise_shape

    def forward(self, x, training=False):
        self.factor = None
        if not training or not self.rate:
            return x
        shape = noise_shape(self, x.shape)
        kept = (self.rng.random(shape, dtype=np.float32) >= self.rate).astype(x.dtype)
        alpha_p = -1.6732632423543772 * 1.0507009873554805
        a = ((1 - self.rate) * (1 + self.rate * alpha_p ** 2)) ** -0.5
        b = -a * alpha_p * self.rate
        self.factor = np.broadcast_to(kept * x.dtype.type(a), x.shape)
        return (x * self.factor + ((1 - kept) * alpha_p * a + b)).astype(x.dtype, copy=False)


@register("ActivityRegularization")
class ActivityRegularization(Layer):
    """The identity, adding (l1 * sum|x| + l2 * sum x^2) / batch size to the training loss (Keras' L1L2 activity
    regularizer, divided by the batch size as Keras 3 does) and its gradient to the input's. Counted in the
    training loss and its gradients; evaluation losses leave it out (dlcli adds weight penalties only there)."""

    supports_masking = True

    def __init__(self, l1: float = 0.0, l2: float = 0.0, **kw):
        super().__init__(**kw)
        if l1 < 0 or l2 < 0:
            raise ConfigError(f"ActivityRegularization: l1 and l2 cannot be negative; got {l1}, {l2}")
        self.l1, self.l2 = float(l1), float(l2)
        self.x = None

    def forward(self, x, training=False):
        self.x = x if training else None
        return x

    def regularization_loss(self) -> float:
        if self.x is None:
            return 0.0
        x = self.x
        return float(self.l1 * np.abs(x).sum(dtype=np.float64) + self.l2 * np.square(x).sum(dtype=np.float64)) \
            / len(x)

    def backward(self, grad):
        if self.x is None:
            return grad
        x, scale = self.x, self.x.dtype.type(1 / len(self.x))
        return grad + (self.l1 * scale) * np.sign(x) + (2 * self.l2 * scale) * x

    def to_onnx(self, g, x, in_shape, mask):
        return x  # the identity at inference
