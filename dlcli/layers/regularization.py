"""Noise layers (keras.layers GaussianNoise, GaussianDropout, AlphaDropout): random only while training, the
identity at inference (and in ONNX). Their noise comes from the layer's seeded generator, like Dropout's."""
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
