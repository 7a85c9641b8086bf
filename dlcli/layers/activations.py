"""Activation layers (keras.layers.ReLU, LeakyReLU, PReLU, ELU, Softmax): Keras' arguments and defaults. All but
PReLU are an activation function with the layer's arguments (dlcli.engine.activations keeps the math and its ONNX
emission); PReLU learns its negative slopes."""
import numpy as np

from dlcli.engine import activations, initializers
from dlcli.engine.layer import Layer, register
from dlcli.errors import ConfigError, ShapeError
from dlcli.layers.core import Activation


def _non_negative(layer: str, **values):
    for name, value in values.items():
        if value is not None and value < 0:
            raise ConfigError(f"{layer}: {name} cannot be negative (as in Keras); got {value}")


@register("ReLU")
class ReLU(Activation):
    """z above `threshold` (capped at `max_value`), negative_slope * (z - threshold) below it."""

    def __init__(self, max_value: float | None = None, negative_slope: float = 0.0, threshold: float = 0.0, **kw):
        _non_negative("ReLU", max_value=max_value, negative_slope=negative_slope, threshold=threshold)
        super().__init__(activations.ReLU(negative_slope, max_value, threshold), **kw)


@register("LeakyReLU")
class LeakyReLU(Activation):
    """max(z, negative_slope * z); the layer's default slope is 0.3 (the function's, 0.2)."""

    def __init__(self, negative_slope: float = 0.3, **kw):
        _non_negative("LeakyReLU", negative_slope=negative_slope)
        super().__init__(activations.LeakyReLU(negative_slope), **kw)


@register("ELU")
class ELU(Activation):
    """z for z > 0, alpha * (exp(z) - 1) below."""

    def __init__(self, alpha: float = 1.0, **kw):
        super().__init__(activations.ELU(alpha), **kw)


@register("Softmax")
class Softmax(Activation):
    """Softmax over `axis` (an int or a list, counting the batch axis as Keras does). With a mask (from the layer
    below), masked positions get -1e9 before and 0 after, as Keras; the mask must broadcast to the input."""

    activation_last = False  # the mask makes it more than an element-wise function

    def __init__(self, axis: int | list[int] = -1, **kw):
        super().__init__(activations.Softmax(axis), **kw)

    def forward(self, x, training=False):
        mask = self.input_mask
        if mask is None:
            self.keep = None
            return self.activation.forward(x)
        try:
            self.keep = np.broadcast_to(mask.astype(bool), x.shape)
        except ValueError:
            raise ShapeError(f"Softmax '{self.name}': the mask of shape {mask.shape} does not broadcast to the input "
                             f"of shape {x.shape} (Keras refuses it too)") from None
        return np.where(self.keep, self.activation.forward(np.where(self.keep, x, -1e9)), 0).astype(x.dtype)

    def backward(self, grad):
        if self.keep is None:
            return self.activation.backward(grad)
        return np.where(self.keep, self.activation.backward(np.where(self.keep, grad, 0)), 0).astype(grad.dtype)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        if mask is None:
            return g.value(self.activation.to_onnx(g, x.name, self.name), x.rank)
        keep = g.cast(mask, "bool")  # broadcast from the right, as NumPy (and Keras) do
        masked = g.op("Where", [keep, x.name, g.scalar(-1e9)])
        y = g.op("Where", [keep, self.activation.to_onnx(g, masked), g.scalar(0.0)], self.name)
        return g.value(y, x.rank)


@register("PReLU")
class PReLU(Layer):
    """max(z, 0) + alpha * min(z, 0) with a learned alpha per input element, shared along `shared_axes` (1-based
    with the batch axis, as Keras: shared_axes [1, 2] for images gives one slope per channel)."""

    supports_masking = True

    def __init__(self, alpha_initializer="zeros", alpha_regularizer=None, alpha_constraint=None,
                 shared_axes: int | list[int] | None = None, **kw):
        super().__init__(**kw)
        if alpha_constraint is not None:
            raise ConfigError("PReLU: alpha_constraint is not supported by dlcli")
        self.alpha_initializer = initializers.get(alpha_initializer)
        self.alpha_regularizer = alpha_regularizer
        self.shared_axes = None if shared_axes is None else \
            [int(a) for a in (shared_axes if isinstance(shared_axes, (list, tuple)) else [shared_axes])]

    def _alpha_shape(self, input_shape):
        shape = list(input_shape)
        for axis in self.shared_axes or ():
            if not 1 <= axis <= len(shape):
                raise ShapeError(f"PReLU '{self.name}': shared axis {axis} is not an axis of inputs (None, "
                                 f"{', '.join(map(str, input_shape))}) (axes count from 1, after the batch)")
            shape[axis - 1] = 1
        return tuple(shape)

    def build(self, input_shape):
        self.alpha = self.add_weight("alpha", self._alpha_shape(input_shape), self.alpha_initializer,
                                     self.alpha_regularizer)

    def forward(self, x, training=False):
        self.negative = np.minimum(x, 0)
        return np.maximum(x, 0) + self.alpha.value * self.negative

    def backward(self, grad):
        if self.alpha.grad is not None:
            shared = tuple(i for i, (a, g) in enumerate(zip((1, *self.alpha.value.shape), grad.shape)) if a != g)
            self.alpha.grad += (grad * self.negative).sum(shared, keepdims=True).reshape(self.alpha.value.shape)
        return np.where(self.negative < 0, grad * self.alpha.value, grad) if self.input_grad_needed else None

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        return g.value(g.op("PRelu", [x.name, g.weight(self, self.alpha.value, "alpha")], self.name), x.rank)
