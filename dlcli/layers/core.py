"""Core layers: Dense, Activation, Identity, Flatten, Reshape, Dropout (Keras' arguments and defaults)."""
import numpy as np

from dlcli.engine import activations, initializers
from dlcli.engine.layer import Layer, register
from dlcli.errors import ShapeError
from dlcli.registry import Size


@register("Dense")
class Dense(Layer):
    """y = activation(x @ kernel + bias) over the last axis. Kernel layout (in, out) as in Keras."""

    activation_last = True

    def __init__(self, units: Size, activation: str | None = None, use_bias: bool = True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, **kw):
        super().__init__(**kw)
        self.units, self.use_bias = int(units), use_bias
        self.activation = activations.get(activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer, self.bias_regularizer = kernel_regularizer, bias_regularizer

    def build(self, input_shape):
        if len(input_shape) == 0:
            raise ShapeError(f"Dense '{self.name}' needs at least rank-2 input (batch, features); got a scalar")
        self.kernel = self.add_weight("kernel", (input_shape[-1], self.units), self.kernel_initializer,
                                      self.kernel_regularizer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.units,), self.bias_initializer, self.bias_regularizer)

    def output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def flops(self, input_shape):
        return 2 * int(np.prod(input_shape)) * self.units

    def forward(self, x, training=False):
        self.x = x
        z = x @ self.kernel.value
        if self.use_bias:
            z += self.bias.value
        return activations.activate_owned(self, z)

    def backward(self, grad):
        grad = self.activation_backward(grad)
        x2, g2 = self.x.reshape(-1, self.x.shape[-1]), grad.reshape(-1, self.units)
        if self.kernel.grad is not None:
            self.kernel.grad += x2.T @ g2
        if self.use_bias and self.bias.grad is not None:
            self.bias.grad += g2.sum(0)
        return grad @ self.kernel.value.T if self.input_grad_needed else None

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        y = g.op("MatMul", [x.name, g.weight(self, self.kernel.value, "kernel")])
        if self.use_bias:
            y = g.op("Add", [y, g.weight(self, self.bias.value, "bias")])
        return g.activate(self.activation, g.value(y, x.rank), self.name)


@register("Activation")
class Activation(Layer):
    activation_last = True
    supports_masking = True

    def __init__(self, activation: str | dict, **kw):
        super().__init__(**kw)
        self.activation = activations.get(activation)

    def output_shape(self, input_shape):
        return self.activation.output_shape(input_shape)  # glu halves its axis

    def forward(self, x, training=False):
        return self.activate(x)

    def backward(self, grad):
        return self.activation_backward(grad)

    def to_onnx(self, g, x, in_shape, mask):
        return g.activate(self.activation, x, self.name)


@register("Identity")
class Identity(Layer):
    """The input unchanged (Keras' placeholder layer), mask included."""

    supports_masking = True

    def forward(self, x, training=False):
        return x

    def backward(self, grad):
        return grad

    def to_onnx(self, g, x, in_shape, mask):
        return x


@register("Flatten")
class Flatten(Layer):
    """(batch, d1, d2, ...) -> (batch, d1 * d2 * ...); a view, not a copy, for contiguous input."""

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training=False):
        self.in_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad):
        return grad.reshape(self.in_shape)

    def to_onnx(self, g, x, in_shape, mask):
        return g.value(g.op("Flatten", [g.last(x).name], self.name, axis=1), 2)  # channels-last order, as dlcli's


@register("Reshape")
class Reshape(Layer):
    """Reshape the non-batch axes to `target_shape` (one entry may be -1, as in Keras)."""

    def __init__(self, target_shape: list[int], **kw):
        super().__init__(**kw)
        self.target_shape = tuple(int(s) for s in target_shape)

    def output_shape(self, input_shape):
        size, target = int(np.prod(input_shape)), list(self.target_shape)
        if target.count(-1) > 1:
            raise ShapeError(f"Reshape '{self.name}': at most one -1 in target_shape {self.target_shape}")
        known = int(np.prod([s for s in target if s != -1]))
        if -1 in target:
            if known == 0 or size % known:
                raise ShapeError(f"Reshape '{self.name}' cannot reshape {size} values into {self.target_shape}")
            target[target.index(-1)] = size // known
        elif known != size:
            raise ShapeError(f"Reshape '{self.name}' cannot reshape input of shape {tuple(input_shape)} "
                             f"({size} values) into {self.target_shape} ({known} values)")
        return tuple(target)

    def forward(self, x, training=False):
        self.in_shape = x.shape
        return x.reshape((x.shape[0], *self.output_shape(x.shape[1:])))

    def backward(self, grad):
        return grad.reshape(self.in_shape)

    def to_onnx(self, g, x, in_shape, mask):
        out = self.output_shape(in_shape)
        return g.value(g.op("Reshape", [g.last(x).name, g.ints([0, *out])], self.name), len(out) + 1)


def noise_shape(layer, shape) -> tuple:
    """The shape of a dropout mask: Keras' noise_shape gives one entry per axis, the batch's included, None for the
    input's size there and 1 to share one draw along that axis ([None, 1, 1, None]: one per sample and channel)."""
    spec = layer.noise_shape
    if spec is None:
        return shape
    if len(spec) != len(shape):
        raise ShapeError(f"{type(layer).__name__} '{layer.name}': noise_shape {list(spec)} needs one entry per axis "
                         f"of the input, batch included (as Keras), for inputs of rank {len(shape)}")
    return tuple(d if n is None else int(n) for n, d in zip(spec, shape))


@register("Dropout")
class Dropout(Layer):
    """Inverted dropout (Keras): zero a `rate` fraction while training and scale the rest by 1 / (1 - rate)."""

    supports_masking = True

    def __init__(self, rate: float, noise_shape: list[int | None] | None = None, **kw):
        super().__init__(**kw)
        if not 0 <= rate < 1:
            raise ShapeError(f"Dropout '{self.name}': rate must be in [0, 1); got {rate}")
        self.rate, self.noise_shape = float(rate), noise_shape

    def forward(self, x, training=False):
        if not training or self.rate == 0:
            self.scale = None
            return x
        shape = noise_shape(self, x.shape)
        keep = self.rng.random(shape, dtype=np.float32) >= self.rate
        self.scale = keep.astype(x.dtype) / np.asarray(1 - self.rate, x.dtype)
        return x * self.scale

    def backward(self, grad):
        return grad if self.scale is None else grad * self.scale

    def to_onnx(self, g, x, in_shape, mask):
        return x  # the identity at inference
