"""Element-wise activations as small objects: `forward(z)` caches what `backward(grad)` needs.

Formulas and constants follow `keras.activations` (e.g. selu's alpha/scale, gelu exact by default, leaky_relu's
negative_slope 0.2). `get(name)` returns a fresh instance because each caches its own forward values.
"""
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


def activate_owned(layer, z):
    """`layer.activate(z)` for a z the layer just computed and keeps no other use of: the activation may work in
    place (the fused-loss path keeps z itself as the logits)."""
    return layer.activate(z) if layer.output_fused or layer.activation_moved else layer.activation.forward_(z)


def get(identifier) -> Activation:
    """A fresh activation from a name, None (linear) or an Activation instance."""
    if identifier is None:
        return Linear()
    if isinstance(identifier, Activation):
        return type(identifier)()
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
