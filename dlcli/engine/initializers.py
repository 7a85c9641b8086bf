"""Weight initializers with Keras' formulas (fan_in/fan_out as `keras.initializers` computes them), under Keras'
two names (he_normal and HeNormal); serialize writes the snake_case one.

Every initializer draws from an explicit `np.random.Generator`: never the global NumPy RNG.
"""
import inspect

import numpy as np

from dlcli.errors import ConfigError
from dlcli.registry import Registry

INITIALIZERS = Registry("initializer")


def fans(shape) -> tuple[float, float]:
    """Keras' `compute_fans`: conv kernels (..., in, out) multiply by the receptive field size."""
    if len(shape) == 0:
        return 1.0, 1.0
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = float(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


class Initializer:
    def __call__(self, shape, rng: np.random.Generator, dtype="float32"):
        raise NotImplementedError

    def get_config(self) -> dict:
        """The constructor's arguments, each kept under its own name; a seed only when one was given."""
        args = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "args", "kwargs")]
        return {a: getattr(self, a) for a in args if a != "seed" or self.seed is not None}


@INITIALIZERS.register("zeros", "Zeros")
class Zeros(Initializer):
    def __call__(self, shape, rng, dtype="float32"):
        return np.zeros(shape, dtype)


@INITIALIZERS.register("ones", "Ones")
class Ones(Initializer):
    def __call__(self, shape, rng, dtype="float32"):
        return np.ones(shape, dtype)


@INITIALIZERS.register("constant", "Constant")
class Constant(Initializer):
    def __init__(self, value: float = 0.0):
        self.value = value

    def __call__(self, shape, rng, dtype="float32"):
        return np.full(shape, self.value, dtype)


@INITIALIZERS.register("variance_scaling", "VarianceScaling")
class VarianceScaling(Initializer):
    """Keras' VarianceScaling: variance scale / n, n the fan_in, fan_out or their mean; drawn from a normal truncated
    at two standard deviations (stddev corrected by .87962566), an untruncated normal, or a uniform."""

    def __init__(self, scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal", seed=None):
        if scale <= 0:
            raise ConfigError(f"variance_scaling scale must be > 0 (as in Keras); got {scale}")
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ConfigError(f"variance_scaling mode must be fan_in, fan_out or fan_avg; got {mode!r}")
        distribution = "truncated_normal" if distribution == "normal" else distribution  # Keras' alias
        if distribution not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise ConfigError(f"variance_scaling distribution must be truncated_normal, untruncated_normal or "
                              f"uniform; got {distribution!r}")
        self.scale, self.mode, self.distribution, self.seed = float(scale), mode, distribution, seed

    def __call__(self, shape, rng, dtype="float32"):
        fan_in, fan_out = fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[self.mode]
        variance = self.scale / max(1.0, n)
        if self.distribution == "uniform":
            limit = np.sqrt(3 * variance)
            return rng.uniform(-limit, limit, shape).astype(dtype)
        if self.distribution == "untruncated_normal":
            return rng.normal(0.0, np.sqrt(variance), shape).astype(dtype)
        # 0.87962566... is the stddev of a unit normal truncated at +-2 (Keras uses the same constant).
        return truncated_normal(shape, np.sqrt(variance) / 0.87962566103423978, rng).astype(dtype)


class _Preset(VarianceScaling):
    """Glorot, He and LeCun: VarianceScaling with Keras' fixed scale, mode and distribution; only a seed."""

    scale, mode, distribution = 1.0, "fan_in", "truncated_normal"

    def __init__(self, seed=None):
        self.seed = seed


@INITIALIZERS.register("glorot_uniform", "GlorotUniform")
class GlorotUniform(_Preset):
    mode, distribution = "fan_avg", "uniform"


@INITIALIZERS.register("glorot_normal", "GlorotNormal")
class GlorotNormal(_Preset):
    mode = "fan_avg"


@INITIALIZERS.register("he_normal", "HeNormal")
class HeNormal(_Preset):
    scale = 2.0


@INITIALIZERS.register("he_uniform", "HeUniform")
class HeUniform(_Preset):
    scale, distribution = 2.0, "uniform"


@INITIALIZERS.register("lecun_normal", "LecunNormal")
class LecunNormal(_Preset):
    pass


@INITIALIZERS.register("lecun_uniform", "LecunUniform")
class LecunUniform(_Preset):
    distribution = "uniform"


@INITIALIZERS.register("random_normal", "RandomNormal")
class RandomNormal(Initializer):
    def __init__(self, mean: float = 0.0, stddev: float = 0.05):  # Keras' defaults
        self.mean, self.stddev = mean, stddev

    def __call__(self, shape, rng, dtype="float32"):
        return rng.normal(self.mean, self.stddev, shape).astype(dtype)


@INITIALIZERS.register("random_uniform", "RandomUniform")
class RandomUniform(Initializer):
    def __init__(self, minval: float = -0.05, maxval: float = 0.05):  # Keras' defaults
        self.minval, self.maxval = minval, maxval

    def __call__(self, shape, rng, dtype="float32"):
        return rng.uniform(self.minval, self.maxval, shape).astype(dtype)


@INITIALIZERS.register("orthogonal", "Orthogonal")
class Orthogonal(Initializer):
    """Keras' Orthogonal: QR of a normal matrix (rows = prod(shape[:-1])), sign-corrected by diag(R)."""

    def __init__(self, gain: float = 1.0):
        self.gain = gain

    def __call__(self, shape, rng, dtype="float32"):
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        a = rng.normal(0.0, 1.0, (max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        # q.T is Fortran-ordered: weights are C-ordered everywhere else (a flat view of them is a view, not a copy).
        return np.ascontiguousarray((self.gain * q[:rows, :cols]).reshape(shape), dtype=dtype)


@INITIALIZERS.register("truncated_normal", "TruncatedNormal")
class TruncatedNormal(Initializer):
    """Normal(mean, stddev) re-drawn outside two standard deviations of the mean (Keras' defaults)."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed=None):
        self.mean, self.stddev, self.seed = mean, stddev, seed

    def __call__(self, shape, rng, dtype="float32"):
        return (self.mean + truncated_normal(shape, self.stddev, rng)).astype(dtype)


@INITIALIZERS.register("identity", "Identity")
class Identity(Initializer):
    """gain * the identity matrix; 2-D weights only (Keras)."""

    def __init__(self, gain: float = 1.0):
        self.gain = gain

    def __call__(self, shape, rng, dtype="float32"):
        if len(shape) != 2:
            raise ConfigError(f"the identity initializer makes 2-D weights only (as in Keras); this weight has shape "
                              f"{tuple(shape)}")
        return (self.gain * np.eye(*shape)).astype(dtype)


def truncated_normal(shape, stddev, rng):
    """Normal samples re-drawn until within two standard deviations (as Keras' truncated_normal)."""
    out = rng.normal(0.0, 1.0, shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.normal(0.0, 1.0, int(bad.sum()))
        bad = np.abs(out) > 2
    return out * stddev


def get(identifier) -> Initializer:
    """From a name, {type: name, ...args} mapping, or an Initializer instance."""
    if isinstance(identifier, Initializer):
        return identifier
    return INITIALIZERS.create(identifier)


def serialize(init: Initializer):
    name = next(n for n in INITIALIZERS if INITIALIZERS.get(n) is type(init))
    config = init.get_config()
    return {"type": name, **config} if config else name
