"""Element-wise activations as small objects: `forward(z)` caches what `backward(grad)` needs.

Formulas and constants follow `keras.activations` (e.g. selu's alpha/scale, gelu exact by default, leaky_relu's
negative_slope 0.2). `get(name)` returns a fresh instance because each caches its own forward values. Activations
with arguments (celu's alpha, the shrinks' threshold, glu's axis ...) take Keras' names and defaults, given in a
config as a mapping: `activation: {type: soft_shrink, threshold: 0.3}`.
"""
import inspect

import numpy as np

from dlcli.registry import Registry

ACTIVATIONS = Registry("activation")


def _into(values, out):
    """`values` written into `out` when one is given (output_derivative's out=)."""
    if out is None:
        return values
    out[...] = values
    return out


class Activation:
    name = "linear"
    # d act / dz as a function of the output y = act(z), where one exists: a recurrent layer caches only its
    # outputs, so it accepts exactly these activations. A staticmethod (y, out=None) on the class, or None.
    output_derivative = None
    # max over a window commutes with it, gradients included (graph.py moves it after a max pooling)
    commutes_with_max = False

    def forward(self, z):
        return z

    def forward_(self, z):
        """forward(z) for a z nobody else holds (a layer's fresh pre-activation): may overwrite it (ReLU does)."""
        return self.forward(z)

    def backward(self, grad):
        return grad

    def output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        """The constructor's arguments (none for most): what `get` needs to make a fresh copy."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "args", "kwargs")]
        return {n: getattr(self, n) for n in names}


@ACTIVATIONS.register("linear", "identity")
class Linear(Activation):
    @staticmethod
    def output_derivative(y, out=None):
        return _into(np.ones_like(y), out)


@ACTIVATIONS.register("relu")
class ReLU(Activation):
    name = "relu"
    # relu(max z) == max(relu z), and the gradients match: a window whose maximum is <= 0 gets none either way, and
    # otherwise the first maximum of z is the first maximum of relu(z)
    commutes_with_max = True

    def forward(self, z):
        # the output, not a mask: inference skips the comparison, and y > 0 exactly where z > 0
        self.y = np.maximum(z, 0)
        return self.y

    def forward_(self, z):
        # in place: no batch-sized allocation (and its page faults), 20% of the book convnet's predict before
        self.y = np.maximum(z, 0, out=z)
        return self.y

    def backward(self, grad):
        return grad * (self.y > 0)

    @staticmethod
    def output_derivative(y, out=None):
        return _into((y > 0).astype(y.dtype), out)


@ACTIVATIONS.register("sigmoid")
class Sigmoid(Activation):
    name = "sigmoid"

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
    name = "tanh"

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
    """Softmax over the last axis."""

    name = "softmax"

    def forward(self, z):
        self.y = softmax(z)
        return self.y

    def backward(self, grad):
        return self.y * (grad - (grad * self.y).sum(-1, keepdims=True))


@ACTIVATIONS.register("log_softmax")
class LogSoftmax(Activation):
    name = "log_softmax"

    def forward(self, z):
        y = log_softmax(z)
        self.p = np.exp(y)
        return y

    def backward(self, grad):
        return grad - self.p * grad.sum(-1, keepdims=True)


@ACTIVATIONS.register("elu")
class ELU(Activation):
    name = "elu"
    alpha = 1.0

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
    name = "selu"
    # Constants from Klambauer et al. (2017), as keras.activations.selu.
    alpha, scale = 1.6732632423543772, 1.0507009873554805

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

    name = "gelu"

    def forward(self, z):
        self.z = z
        self.cdf = 0.5 * (1 + erf(z / np.sqrt(2)))
        return z * self.cdf

    def backward(self, grad):
        pdf = np.exp(-0.5 * self.z * self.z) / np.sqrt(2 * np.pi)
        return grad * (self.cdf + self.z * pdf)


@ACTIVATIONS.register("leaky_relu")
class LeakyReLU(Activation):
    name = "leaky_relu"
    negative_slope = 0.2  # keras.activations.leaky_relu default

    def forward(self, z):
        self.positive = z > 0
        return np.where(self.positive, z, self.negative_slope * z)

    def backward(self, grad):
        return np.where(self.positive, grad, self.negative_slope * grad)


@ACTIVATIONS.register("softplus")
class Softplus(Activation):
    name = "softplus"

    def forward(self, z):
        self.z = z
        return np.logaddexp(0, z)

    def backward(self, grad):
        return grad * sigmoid(self.z)

    @staticmethod
    def output_derivative(y, out=None):
        # sigmoid(z) = 1 - e^-softplus(z)
        return _into(-np.expm1(-y), out)


@ACTIVATIONS.register("swish", "silu")
class Swish(Activation):
    name = "swish"

    def forward(self, z):
        self.z, self.s = z, sigmoid(z)
        return z * self.s

    def backward(self, grad):
        return grad * (self.s * (1 + self.z * (1 - self.s)))


# --- the rest of keras.activations (Keras 3.15); formulas as its numpy backend (keras/src/backend/numpy/nn.py) ---
class _Masked(Activation):
    """Activations whose derivative is a 0/1 (or constant) mask of the input: forward keeps the slope per element."""

    def backward(self, grad):
        return grad * self.slope


@ACTIVATIONS.register("relu6")
class ReLU6(_Masked):
    name = "relu6"

    def forward(self, z):
        self.slope = ((z > 0) & (z < 6)).astype(z.dtype)
        return np.minimum(np.maximum(z, 0), 6).astype(z.dtype, copy=False)


@ACTIVATIONS.register("hard_sigmoid")
class HardSigmoid(_Masked):
    """clip(z / 6 + 1/2, 0, 1) (Keras 3's slope 1/6, not Keras 2's 0.2)."""

    name = "hard_sigmoid"

    def forward(self, z):
        y = z / 6 + 0.5
        self.slope = ((y > 0) & (y < 1)) / z.dtype.type(6)
        return np.clip(y, 0, 1).astype(z.dtype, copy=False)


@ACTIVATIONS.register("hard_silu", "hard_swish")
class HardSilu(Activation):
    """z * hard_sigmoid(z)."""

    name = "hard_silu"

    def forward(self, z):
        self.z, self.h = z, HardSigmoid()
        self.s = self.h.forward(z)
        return z * self.s

    def backward(self, grad):
        return grad * (self.s + self.z * self.h.slope)


@ACTIVATIONS.register("mish")
class Mish(Activation):
    """z * tanh(softplus(z))."""

    name = "mish"

    def forward(self, z):
        self.z = z
        self.t = np.tanh(np.logaddexp(0, z)).astype(z.dtype, copy=False)
        return z * self.t

    def backward(self, grad):
        return grad * (self.t + self.z * (1 - self.t * self.t) * sigmoid(self.z))


@ACTIVATIONS.register("softsign")
class Softsign(Activation):
    """z / (1 + |z|)."""

    name = "softsign"

    def forward(self, z):
        self.d = 1 + np.abs(z)
        return z / self.d

    def backward(self, grad):
        return grad / (self.d * self.d)


@ACTIVATIONS.register("exponential")
class Exponential(Activation):
    name = "exponential"

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

    name = "celu"

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

    name = "glu"

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

    name = "log_sigmoid"

    def forward(self, z):
        self.z = z
        return -np.logaddexp(0, -z)

    def backward(self, grad):
        return grad * sigmoid(-self.z)


@ACTIVATIONS.register("hard_tanh")
class HardTanh(_Masked):
    name = "hard_tanh"

    def forward(self, z):
        self.slope = (np.abs(z) < 1).astype(z.dtype)
        return np.clip(z, -1, 1)


@ACTIVATIONS.register("hard_shrink")
class HardShrink(_Masked):
    """z where |z| > threshold, else 0."""

    name = "hard_shrink"

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)

    def forward(self, z):
        self.slope = (np.abs(z) > self.threshold).astype(z.dtype)
        return z * self.slope


@ACTIVATIONS.register("soft_shrink")
class SoftShrink(_Masked):
    """z - threshold above it, z + threshold below -threshold, else 0."""

    name = "soft_shrink"

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)

    def forward(self, z):
        self.slope = (np.abs(z) > self.threshold).astype(z.dtype)
        return (z - np.sign(z) * self.threshold) * self.slope


@ACTIVATIONS.register("tanh_shrink")
class TanhShrink(Activation):
    """z - tanh(z)."""

    name = "tanh_shrink"

    def forward(self, z):
        self.t = np.tanh(z)
        return z - self.t

    def backward(self, grad):
        return grad * self.t * self.t


@ACTIVATIONS.register("sparse_plus")
class SparsePlus(Activation):
    """0 for z <= -1, (z + 1)^2 / 4 for -1 < z < 1, z from 1."""

    name = "sparse_plus"

    def forward(self, z):
        self.z = z
        return np.where(z <= -1, 0, np.where(z < 1, 0.25 * (z + 1) ** 2, z)).astype(z.dtype, copy=False)

    def backward(self, grad):
        z = self.z
        return grad * np.where(z <= -1, 0, np.where(z < 1, 0.5 * (z + 1), 1)).astype(z.dtype, copy=False)


@ACTIVATIONS.register("sparse_sigmoid")
class SparseSigmoid(_Masked):
    """0 for z <= -1, (z + 1) / 2 for -1 < z < 1, 1 from 1."""

    name = "sparse_sigmoid"

    def forward(self, z):
        self.slope = (np.abs(z) < 1) * z.dtype.type(0.5)
        return np.clip(0.5 * (z + 1), 0, 1).astype(z.dtype, copy=False)


@ACTIVATIONS.register("squareplus")
class Squareplus(Activation):
    """(z + sqrt(z^2 + b)) / 2."""

    name = "squareplus"

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

    name = "threshold"

    def __init__(self, threshold: float, default_value: float):
        self.threshold, self.default_value = float(threshold), float(default_value)

    def forward(self, z):
        above = z > self.threshold
        self.slope = above.astype(z.dtype)
        return np.where(above, z, self.default_value).astype(z.dtype, copy=False)


@ACTIVATIONS.register("sparsemax")
class Sparsemax(Activation):
    """Euclidean projection onto the simplex along `axis` (Martins & Astudillo 2016): max(z - tau, 0)."""

    name = "sparsemax"

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


def activate_owned(layer, z):
    """`layer.activate(z)` for a z the layer just computed and keeps no other use of: the activation may work in
    place (the fused-loss path keeps z itself as the logits)."""
    return layer.activate(z) if layer.output_fused or layer.activation_moved else layer.activation.forward_(z)


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
