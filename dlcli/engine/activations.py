"""Element-wise activations as small objects: `forward(z)` caches what `backward(grad)` needs.

Formulas and constants follow `keras.activations` (e.g. selu's alpha/scale, gelu exact by default, leaky_relu's
negative_slope 0.2). `get(name)` returns a fresh instance because each caches its own forward values. Activations
with arguments (celu's alpha, the shrinks' threshold, glu's axis ...) take Keras' names and defaults, given in a
config as a mapping: `activation: {type: soft_shrink, threshold: 0.3}`.
"""
import inspect

import numpy as np

from dlcli import kernels
from dlcli.engine import lanes
from dlcli.registry import Registry

ACTIVATIONS = Registry("activation", name_attribute="name")


def _into(values, out):
    """`values` written into `out` when one is given (output_derivative's out=)."""
    if out is None:
        return values
    out[...] = values
    return out


class Activation:
    """`to_onnx(g, x, hint)` emits the same function with the ONNX Builder `g` (dlcli.interop.onnx_graph) on the
    tensor named x and returns the output's name; `channels_last` ones act along an axis, so the Builder hands them
    Keras' layout."""

    name = "linear"  # a registered class's first name (set by ACTIVATIONS.register)
    channels_last = False
    # d act / dz as a function of the output y = act(z), where one exists: a recurrent layer caches only its
    # outputs, so it accepts exactly these activations. A staticmethod (y, out=None) on the class, or None.
    output_derivative = None
    # max over a window commutes with it, gradients included (graph.py moves it after a max pooling)
    commutes_with_max = False

    def forward(self, z):
        return z

    def forward_(self, z, bias=None):
        """forward(z + bias) for a z nobody else holds (a layer's fresh pre-activation): may overwrite it (ReLU
        does); `bias` (over the last axis) is added in place first."""
        if bias is not None:
            z += bias
        return self.forward(z)

    def backward(self, grad):
        return grad

    def output_shape(self, input_shape):
        return input_shape

    def to_onnx(self, g, x, hint=None):
        raise NotImplementedError

    def get_config(self) -> dict:
        """The constructor's arguments (none for most): what `get` needs to make a fresh copy."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "args", "kwargs")]
        return {n: getattr(self, n) for n in names}


@ACTIVATIONS.register("linear", "identity")
class Linear(Activation):
    def to_onnx(self, g, x, hint=None):
        return x

    @staticmethod
    def output_derivative(y, out=None):
        return _into(np.ones_like(y), out)


@ACTIVATIONS.register("relu")
class ReLU(Activation):
    """max(z, 0), or with Keras' arguments: z above `threshold` (capped at `max_value`), negative_slope *
    (z - threshold) below it (keras.activations.relu; with only negative_slope, max(z, negative_slope * z))."""

    # relu(max z) == max(relu z), and the gradients match: a window whose maximum is <= 0 gets none either way, and
    # otherwise the first maximum of z is the first maximum of relu(z). Only said of the plain relu.
    commutes_with_max = True

    def __init__(self, negative_slope: float = 0.0, max_value: float | None = None, threshold: float = 0.0):
        self.negative_slope, self.threshold = float(negative_slope), float(threshold)
        self.max_value = None if max_value is None else float(max_value)
        self.plain = not self.negative_slope and not self.threshold and self.max_value is None
        self.commutes_with_max = self.plain

    def forward(self, z):
        if not self.plain:
            return self._general(z)
        # the output, not a mask: inference skips the comparison, and y > 0 exactly where z > 0
        self.y = np.maximum(z, 0)
        return self.y

    def forward_(self, z, bias=None):
        if bias is not None:
            compiled = kernels.compiled("activations") if self.plain else None
            if compiled is not None and z.flags.c_contiguous and z.dtype == bias.dtype and bias.shape == z.shape[-1:]:
                compiled.bias_relu(z.reshape(-1, bias.size), bias)  # one pass where the twin below makes two
                self.y = z
                return z
            z += bias
        if not self.plain:
            return self._general(z)
        # in place: no batch-sized allocation (and its page faults), 20% of the book convnet's predict before
        self.y = np.maximum(z, 0, out=z)
        return self.y

    def _general(self, z):
        slope = self.negative_slope
        if slope and self.max_value is None and not self.threshold:  # Keras calls leaky_relu here
            positive = (z > 0) == (slope <= 1)
            self.slope = np.where(positive, 1, slope).astype(z.dtype)
            return np.where(positive, z, slope * z).astype(z.dtype, copy=False)
        above = z > self.threshold
        y = np.where(above, z, 0).astype(z.dtype, copy=False)
        self.slope = above.astype(z.dtype)
        if self.max_value is not None:
            self.slope *= y < self.max_value
            y = np.minimum(y, self.max_value).astype(z.dtype, copy=False)
        if slope:
            below = z < self.threshold
            y -= slope * np.where(below, self.threshold - z, 0).astype(z.dtype, copy=False)
            self.slope += slope * below
        return y

    def backward(self, grad):
        if not self.plain:
            return grad * self.slope
        compiled = kernels.compiled("activations")
        if compiled is None or grad.shape != self.y.shape or grad.dtype != self.y.dtype or \
                not (grad.flags.c_contiguous and self.y.flags.c_contiguous):
            return grad * (self.y > 0)  # the NumPy twin
        # on the lanes' ranges (an Add's ReLU in a residual block: its gradient goes to both inputs)
        return lanes.flat_parts(lambda out, g, y: compiled.relu_backward(g, y, out), np.empty_like(grad), grad,
                                self.y)

    def backward_sum(self, grad, other):
        """backward(grad + other), a fan-out's two gradients (engine/layer.GradientSum) added on the lanes as they
        are read, where the graph added them first in a pass of their own (on the calling thread alone where one
        was strided): the same bits. `other` may be strided (a conv's input gradient cut from its padded one):
        NumPy adds it at full speed, each lane its samples, and the mask follows while the sum is in cache."""
        compiled = kernels.compiled("activations") if self.plain else None
        if compiled is None or any(a.shape != self.y.shape or a.dtype != self.y.dtype for a in (grad, other)) or \
                not (grad.flags.c_contiguous and self.y.flags.c_contiguous):
            return self.backward(grad + other)
        out = np.empty_like(grad)
        if other.flags.c_contiguous:
            return lanes.flat_parts(lambda o, g, h, y: compiled.relu_backward_sum(g, h, y, o), out, grad, other,
                                    self.y)

        def part(a, b):
            summed = np.add(grad[a:b], other[a:b], out=out[a:b]).reshape(-1)
            compiled.relu_backward_in_place(summed, self.y[a:b].reshape(-1))
        lanes.run(lambda runs: [part(a, b) for a, b in runs], lanes.split(len(out), lanes.FLAT_PARTS if
                  out.size >= lanes.FLAT_FLOATS else 1), out.size < lanes.SHORT_FLOATS)
        return out

    def to_onnx(self, g, x, hint=None):
        slope = self.negative_slope
        if self.plain:
            return g.op("Relu", [x], hint)
        if slope and self.max_value is None and not self.threshold:
            return g.op("Max", [x, g.op("Mul", [x, g.scalar(slope)])], hint)
        y = g.op("Where", [g.op("Greater", [x, g.scalar(self.threshold)]), x, g.scalar(0.0)])
        if self.max_value is not None:
            y = g.op("Min", [y, g.scalar(self.max_value)])
        if slope:
            below = g.op("Relu", [g.op("Sub", [g.scalar(self.threshold), x])])
            y = g.op("Sub", [y, g.op("Mul", [below, g.scalar(slope)])])
        return g.op("Identity", [y], hint)

    @staticmethod
    def output_derivative(y, out=None):
        return _into((y > 0).astype(y.dtype), out)


@ACTIVATIONS.register("sigmoid")
class Sigmoid(Activation):
    def to_onnx(self, g, x, hint=None):
        return g.op("Sigmoid", [x], hint)

    def forward(self, z):
        self.y = sigmoid(z)
        return self.y

    def backward(self, grad):
        return grad * self.y * (1 - self.y)

    @staticmethod
    def output_derivative(y, out=None):
        out = np.subtract(1, y, out=out)
        out *= y
        return out


@ACTIVATIONS.register("tanh")
class Tanh(Activation):
    def to_onnx(self, g, x, hint=None):
        return g.op("Tanh", [x], hint)

    def forward(self, z):
        self.y = np.tanh(z)
        return self.y

    def backward(self, grad):
        return grad * (1 - self.y * self.y)

    @staticmethod
    def output_derivative(y, out=None):
        out = np.multiply(y, y, out=out)
        return np.subtract(1, out, out=out)


@ACTIVATIONS.register("softmax")
class Softmax(Activation):
    """exp(z) / sum(exp(z)) over `axis` (an axis of the batch tensor, or a list of them, as Keras)."""

    channels_last = True

    def __init__(self, axis: int | list[int] = -1):
        self.axis = axis if isinstance(axis, int) else [int(a) for a in axis]

    def _axes(self):
        return self.axis if isinstance(self.axis, int) else tuple(self.axis)

    def forward(self, z):
        self.y = softmax(z, self._axes())
        return self.y

    def backward(self, grad):
        return self.y * (grad - (grad * self.y).sum(self._axes(), keepdims=True))

    def to_onnx(self, g, x, hint=None):
        if isinstance(self.axis, int):
            return g.op("Softmax", [x], hint, axis=self.axis)
        e = g.op("Exp", [g.op("Sub", [x, g.reduce("ReduceMax", x, self.axis)])])
        return g.op("Div", [e, g.reduce("ReduceSum", e, self.axis)], hint)


@ACTIVATIONS.register("log_softmax")
class LogSoftmax(Activation):
    channels_last = True

    def __init__(self, axis: int = -1):
        self.axis = int(axis)

    def forward(self, z):
        y = log_softmax(z, self.axis)
        self.p = np.exp(y)
        return y

    def backward(self, grad):
        return grad - self.p * grad.sum(self.axis, keepdims=True)

    def to_onnx(self, g, x, hint=None):
        return g.op("LogSoftmax", [x], hint, axis=self.axis)


@ACTIVATIONS.register("elu")
class ELU(Activation):
    alpha = 1.0  # what output_derivative (recurrent layers, the name only) assumes

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    def to_onnx(self, g, x, hint=None):
        return g.op("Elu", [x], hint, alpha=self.alpha)

    def forward(self, z):
        self.z = z
        return np.where(z > 0, z, self.alpha * np.expm1(np.minimum(z, 0)))

    def backward(self, grad):
        return grad * np.where(self.z > 0, 1, self.alpha * np.exp(np.minimum(self.z, 0)))

    @staticmethod
    def output_derivative(y, out=None):
        # for z <= 0: y = alpha (e^z - 1), so alpha e^z = y + alpha
        return _into(np.where(y > 0, 1, y + ELU.alpha).astype(y.dtype), out)


@ACTIVATIONS.register("selu")
class SELU(Activation):
    # Constants from Klambauer et al. (2017), as keras.activations.selu.
    alpha, scale = 1.6732632423543772, 1.0507009873554805

    def to_onnx(self, g, x, hint=None):
        return g.op("Selu", [x], hint, alpha=self.alpha, gamma=self.scale)

    def forward(self, z):
        self.z = z
        return self.scale * np.where(z > 0, z, self.alpha * np.expm1(np.minimum(z, 0)))

    def backward(self, grad):
        return grad * self.scale * np.where(self.z > 0, 1, self.alpha * np.exp(np.minimum(self.z, 0)))

    @staticmethod
    def output_derivative(y, out=None):
        # for z <= 0: y = scale alpha (e^z - 1), so scale alpha e^z = y + scale alpha
        return _into(np.where(y > 0, SELU.scale, y + SELU.scale * SELU.alpha).astype(y.dtype), out)


@ACTIVATIONS.register("gelu")
class GELU(Activation):
    """Exact GELU x * Phi(x), Keras' default (`approximate=False`)."""

    def forward(self, z):
        self.z = z
        self.cdf = 0.5 * (1 + erf(z / np.sqrt(2)))
        return z * self.cdf

    def backward(self, grad):
        pdf = np.exp(-0.5 * self.z * self.z) / np.sqrt(2 * np.pi)
        return grad * (self.cdf + self.z * pdf)

    def to_onnx(self, g, x, hint=None):  # exact: x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2
        erf = g.op("Erf", [g.op("Div", [x, g.scalar(np.sqrt(2.0))])])
        half = g.op("Mul", [x, g.scalar(0.5)])
        return g.op("Mul", [half, g.op("Add", [erf, g.scalar(1.0)])], hint)


@ACTIVATIONS.register("leaky_relu")
class LeakyReLU(Activation):
    """max(z, negative_slope * z) (keras.activations.leaky_relu: 0.2 by default; the LeakyReLU layer's is 0.3)."""

    def __init__(self, negative_slope: float = 0.2):
        self.negative_slope = float(negative_slope)

    def forward(self, z):
        self.positive = (z > 0) == (self.negative_slope <= 1)  # a slope above 1 makes the negative side the max
        return np.where(self.positive, z, self.negative_slope * z).astype(z.dtype, copy=False)

    def to_onnx(self, g, x, hint=None):
        if self.negative_slope <= 1:
            return g.op("LeakyRelu", [x], hint, alpha=self.negative_slope)
        return g.op("Max", [x, g.op("Mul", [x, g.scalar(self.negative_slope)])], hint)

    def backward(self, grad):
        return np.where(self.positive, grad, self.negative_slope * grad)


@ACTIVATIONS.register("softplus")
class Softplus(Activation):
    def forward(self, z):
        self.z = z
        return np.logaddexp(0, z)

    def backward(self, grad):
        return grad * sigmoid(self.z)

    def to_onnx(self, g, x, hint=None):
        return g.op("Softplus", [x], hint)

    @staticmethod
    def output_derivative(y, out=None):
        # sigmoid(z) = 1 - e^-softplus(z)
        return _into(-np.expm1(-y), out)


@ACTIVATIONS.register("swish", "silu")
class Swish(Activation):
    def forward(self, z):
        self.z, self.s = z, sigmoid(z)
        return z * self.s

    def backward(self, grad):
        return grad * (self.s * (1 + self.z * (1 - self.s)))

    def to_onnx(self, g, x, hint=None):
        return g.op("Mul", [x, g.op("Sigmoid", [x])], hint)


# --- the rest of keras.activations (Keras 3.15); formulas as its numpy backend (keras/src/backend/numpy/nn.py) ---
class _Masked(Activation):
    """Activations whose derivative is a 0/1 (or constant) mask of the input: forward keeps the slope per element."""

    def backward(self, grad):
        return grad * self.slope


@ACTIVATIONS.register("relu6")
class ReLU6(_Masked):
    def to_onnx(self, g, x, hint=None):
        return g.op("Clip", [x, g.scalar(0.0), g.scalar(6.0)], hint)

    def forward(self, z):
        self.slope = ((z > 0) & (z < 6)).astype(z.dtype)
        return np.minimum(np.maximum(z, 0), 6).astype(z.dtype, copy=False)


@ACTIVATIONS.register("hard_sigmoid")
class HardSigmoid(_Masked):
    """clip(z / 6 + 1/2, 0, 1) (Keras 3's slope 1/6, not Keras 2's 0.2)."""

    def to_onnx(self, g, x, hint=None):
        return g.op("HardSigmoid", [x], hint, alpha=1 / 6, beta=0.5)

    def forward(self, z):
        y = z / 6 + 0.5
        self.slope = ((y > 0) & (y < 1)) / z.dtype.type(6)
        return np.clip(y, 0, 1).astype(z.dtype, copy=False)


@ACTIVATIONS.register("hard_silu", "hard_swish")
class HardSilu(Activation):
    """z * hard_sigmoid(z)."""

    def to_onnx(self, g, x, hint=None):  # HardSwish needs opset 14
        return g.op("Mul", [x, g.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)], hint)

    def forward(self, z):
        self.z, self.h = z, HardSigmoid()
        self.s = self.h.forward(z)
        return z * self.s

    def backward(self, grad):
        return grad * (self.s + self.z * self.h.slope)


@ACTIVATIONS.register("mish")
class Mish(Activation):
    """z * tanh(softplus(z))."""

    def to_onnx(self, g, x, hint=None):  # Mish needs opset 18
        return g.op("Mul", [x, g.op("Tanh", [g.op("Softplus", [x])])], hint)

    def forward(self, z):
        self.z = z
        self.t = np.tanh(np.logaddexp(0, z)).astype(z.dtype, copy=False)
        return z * self.t

    def backward(self, grad):
        return grad * (self.t + self.z * (1 - self.t * self.t) * sigmoid(self.z))


@ACTIVATIONS.register("softsign")
class Softsign(Activation):
    """z / (1 + |z|)."""

    def to_onnx(self, g, x, hint=None):
        return g.op("Softsign", [x], hint)

    def forward(self, z):
        self.d = 1 + np.abs(z)
        return z / self.d

    def backward(self, grad):
        return grad / (self.d * self.d)


@ACTIVATIONS.register("exponential")
class Exponential(Activation):
    def to_onnx(self, g, x, hint=None):
        return g.op("Exp", [x], hint)

    def forward(self, z):
        self.y = np.exp(z)
        return self.y

    def backward(self, grad):
        return grad * self.y

    @staticmethod
    def output_derivative(y, out=None):
        return _into(y, out)


@ACTIVATIONS.register("celu")
class CELU(Activation):
    """max(z, 0) + alpha * expm1(min(z, 0) / alpha)."""

    def to_onnx(self, g, x, hint=None):
        return g.op("Celu", [x], hint, alpha=self.alpha)

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    def forward(self, z):
        self.z = z
        return np.maximum(z, 0) + self.alpha * np.expm1(np.minimum(z, 0) / self.alpha)

    def backward(self, grad):
        return grad * np.where(self.z > 0, 1, np.exp(np.minimum(self.z, 0) / self.alpha))


@ACTIVATIONS.register("glu")
class GLU(Activation):
    """a * sigmoid(b) for the two halves [a, b] of `axis`: the output has half the input's size along it."""

    channels_last = True

    def to_onnx(self, g, x, hint=None):
        size = g.op("Gather", [g.op("Shape", [x]), g.ints([self.axis])])
        half = g.op("Div", [size, g.ints([2])])
        axes = g.ints([self.axis])
        a = g.op("Slice", [x, g.ints([0]), half, axes])
        b = g.op("Slice", [x, half, size, axes])
        return g.op("Mul", [a, g.op("Sigmoid", [b])], hint)

    def __init__(self, axis: int = -1):
        self.axis = int(axis)

    def output_shape(self, input_shape):
        shape = list(input_shape)
        axis = self.axis if self.axis < 0 else self.axis - 1  # input_shape has no batch axis
        shape[axis] //= 2
        return tuple(shape)

    def forward(self, z):
        if z.shape[self.axis] % 2:
            from dlcli.errors import ShapeError
            raise ShapeError(f"glu splits axis {self.axis} in two halves; its size {z.shape[self.axis]} is odd")
        self.a, b = np.split(z, 2, self.axis)
        self.s = sigmoid(b)
        return self.a * self.s

    def backward(self, grad):
        return np.concatenate([grad * self.s, grad * self.a * self.s * (1 - self.s)], self.axis)


@ACTIVATIONS.register("log_sigmoid")
class LogSigmoid(Activation):
    """-softplus(-z)."""

    def to_onnx(self, g, x, hint=None):
        return g.op("Neg", [g.op("Softplus", [g.op("Neg", [x])])], hint)

    def forward(self, z):
        self.z = z
        return -np.logaddexp(0, -z)

    def backward(self, grad):
        return grad * sigmoid(-self.z)


@ACTIVATIONS.register("hard_tanh")
class HardTanh(_Masked):
    def to_onnx(self, g, x, hint=None):
        return g.op("Clip", [x, g.scalar(-1.0), g.scalar(1.0)], hint)

    def forward(self, z):
        self.slope = (np.abs(z) < 1).astype(z.dtype)
        return np.clip(z, -1, 1)


@ACTIVATIONS.register("hard_shrink")
class HardShrink(_Masked):
    """z where |z| > threshold, else 0."""

    def to_onnx(self, g, x, hint=None):
        return g.op("Shrink", [x], hint, lambd=self.threshold, bias=0.0)

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)

    def forward(self, z):
        self.slope = (np.abs(z) > self.threshold).astype(z.dtype)
        return z * self.slope


@ACTIVATIONS.register("soft_shrink")
class SoftShrink(_Masked):
    """z - threshold above it, z + threshold below -threshold, else 0."""

    def to_onnx(self, g, x, hint=None):
        return g.op("Shrink", [x], hint, lambd=self.threshold, bias=self.threshold)

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)

    def forward(self, z):
        self.slope = (np.abs(z) > self.threshold).astype(z.dtype)
        return (z - np.sign(z) * self.threshold) * self.slope


@ACTIVATIONS.register("tanh_shrink")
class TanhShrink(Activation):
    """z - tanh(z)."""

    def to_onnx(self, g, x, hint=None):
        return g.op("Sub", [x, g.op("Tanh", [x])], hint)

    def forward(self, z):
        self.t = np.tanh(z)
        return z - self.t

    def backward(self, grad):
        return grad * self.t * self.t


@ACTIVATIONS.register("sparse_plus")
class SparsePlus(Activation):
    """0 for z <= -1, (z + 1)^2 / 4 for -1 < z < 1, z from 1."""

    def to_onnx(self, g, x, hint=None):
        shifted = g.op("Add", [g.op("Clip", [x, g.scalar(-1.0), g.scalar(1.0)]), g.scalar(1.0)])
        quadratic = g.op("Mul", [g.op("Mul", [shifted, shifted]), g.scalar(0.25)])
        return g.op("Where", [g.op("Less", [x, g.scalar(1.0)]), quadratic, x], hint)

    def forward(self, z):
        self.z = z
        return np.where(z <= -1, 0, np.where(z < 1, 0.25 * (z + 1) ** 2, z)).astype(z.dtype, copy=False)

    def backward(self, grad):
        z = self.z
        return grad * np.where(z <= -1, 0, np.where(z < 1, 0.5 * (z + 1), 1)).astype(z.dtype, copy=False)


@ACTIVATIONS.register("sparse_sigmoid")
class SparseSigmoid(_Masked):
    """0 for z <= -1, (z + 1) / 2 for -1 < z < 1, 1 from 1."""

    def to_onnx(self, g, x, hint=None):
        half = g.op("Mul", [g.op("Add", [x, g.scalar(1.0)]), g.scalar(0.5)])
        return g.op("Clip", [half, g.scalar(0.0), g.scalar(1.0)], hint)

    def forward(self, z):
        self.slope = (np.abs(z) < 1) * z.dtype.type(0.5)
        return np.clip(0.5 * (z + 1), 0, 1).astype(z.dtype, copy=False)


@ACTIVATIONS.register("squareplus")
class Squareplus(Activation):
    """(z + sqrt(z^2 + b)) / 2."""

    def to_onnx(self, g, x, hint=None):
        root = g.op("Sqrt", [g.op("Add", [g.op("Mul", [x, x]), g.scalar(self.b)])])
        return g.op("Mul", [g.op("Add", [x, root]), g.scalar(0.5)], hint)

    def __init__(self, b: float = 4.0):
        self.b = float(b)

    def forward(self, z):
        self.z, self.root = z, np.sqrt(z * z + self.b)
        return (z + self.root) / 2

    def backward(self, grad):
        return grad * 0.5 * (1 + self.z / self.root)


@ACTIVATIONS.register("threshold")
class Threshold(_Masked):
    """z where z > threshold, else default_value. Keras' threshold has no defaults, so neither has this one: a
    config names both, {type: threshold, threshold: 0.1, default_value: 0.0}."""

    def to_onnx(self, g, x, hint=None):
        above = g.op("Greater", [x, g.scalar(self.threshold)])
        return g.op("Where", [above, x, g.scalar(self.default_value)], hint)

    def __init__(self, threshold: float, default_value: float):
        self.threshold, self.default_value = float(threshold), float(default_value)

    def forward(self, z):
        above = z > self.threshold
        self.slope = above.astype(z.dtype)
        return np.where(above, z, self.default_value).astype(z.dtype, copy=False)


@ACTIVATIONS.register("sparsemax")
class Sparsemax(Activation):
    """Euclidean projection onto the simplex along `axis` (Martins & Astudillo 2016): max(z - tau, 0)."""

    channels_last = True

    def to_onnx(self, g, x, hint=None):
        if self.axis != -1:
            raise NotImplementedError("sparsemax exports along the last axis only")
        n = g.op("Slice", [g.op("Shape", [x]), g.ints([-1]), g.ints([2 ** 62])])
        zs = g.op("TopK", [x, n], outputs=2, axis=-1)[0]
        last = g.const(np.array(-1, np.int64), "axis")
        cumulative = g.op("CumSum", [zs, last])
        rank = g.op("CumSum", [g.op("Add", [g.op("Mul", [zs, g.scalar(0.0)]), g.scalar(1.0)]), last])  # 1, 2, ... n
        support = g.cast(g.op("Greater", [g.op("Add", [g.op("Mul", [rank, zs]), g.scalar(1.0)]), cumulative]),
                         "float32")
        k = g.reduce("ReduceSum", support, [-1])
        tau = g.op("Div", [g.op("Sub", [g.reduce("ReduceSum", g.op("Mul", [zs, support]), [-1]), g.scalar(1.0)]), k])
        return g.op("Relu", [g.op("Sub", [x, tau])], hint)

    def __init__(self, axis: int = -1):
        self.axis = int(axis)

    def forward(self, z):
        zs = -np.sort(-z, axis=self.axis)
        cumulative = np.cumsum(zs, axis=self.axis)
        shape = [1] * z.ndim
        shape[self.axis] = -1
        r = np.arange(1, z.shape[self.axis] + 1, dtype=z.dtype).reshape(shape)
        support = zs - (cumulative - 1) / r > 0
        k = support.sum(self.axis, keepdims=True)
        # tau = (sum of the k largest - 1) / k, the paper's Algorithm 1. Keras 3.15 sums the cumulative sums over
        # the support instead, so its outputs do not sum to 1 once two or more are positive (keras-team/keras
        # #23425, fixed by #23469): we follow the paper and the fix
        tau = ((zs * support).sum(self.axis, keepdims=True) - 1) / k
        y = np.maximum(z - tau, 0).astype(z.dtype, copy=False)
        self.support = y > 0
        return y

    def backward(self, grad):
        # Jacobian diag(s) - s s^T / |s| on the support s
        s = self.support
        mean = (grad * s).sum(self.axis, keepdims=True) / s.sum(self.axis, keepdims=True)
        return (grad - mean) * s


def activate_owned(layer, z, bias=None):
    """`layer.activate(z + bias)` for a z the layer just computed and keeps no other use of: the bias is added
    and the activation applied in place (a plain ReLU adds and clamps in one compiled pass; the fused-loss path
    keeps z itself as the logits)."""
    if layer.output_fused or layer.activation_moved:
        if bias is not None:
            z += bias
        return layer.activate(z)
    return layer.activation.forward_(z, bias)


def get(identifier) -> Activation:
    """A fresh activation from a name, a {type: name, **args} mapping, None (linear) or an Activation instance."""
    if identifier is None:
        return Linear()
    if isinstance(identifier, Activation):
        return type(identifier)(**identifier.get_config())
    if isinstance(identifier, dict):
        return ACTIVATIONS.create(identifier)
    return ACTIVATIONS.get(identifier)()


def sigmoid(z):
    # exp of a non-positive number only: no overflow warnings for large |z|.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def log_softmax(z, axis=-1):
    shifted = z - z.max(axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis, keepdims=True))


def erf(x):
    """erf via Numerical Recipes' erfc Chebyshev fit (fractional error < 1.2e-7): NumPy has no erf."""
    t = 1 / (1 + 0.5 * np.abs(x))
    poly = -x * x - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    return (np.sign(x) * (1 - t * np.exp(poly))).astype(x.dtype, copy=False)
