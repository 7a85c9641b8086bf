"""Preprocessing layers: Rescaling (always on), and image augmentation layers, active only with training=True
and the identity at inference (as Keras).

Randomness comes from the layer's `self.rng` (seeded from the run seed by the model; a `seed` argument overrides
it at build time). RandomTranslation, RandomRotation and RandomZoom share one vectorised resampler: per output
pixel a source coordinate, read with nearest or bilinear interpolation and Keras' fill modes. Angles are exact
(not rounded to 90-degree steps).
"""
import numpy as np

from dlcli.engine.layer import Layer, register
from dlcli.errors import ConfigError, ShapeError

FILL_MODES = ("reflect", "wrap", "nearest", "constant")
INTERPOLATIONS = ("bilinear", "nearest")


@register("Rescaling")
class Rescaling(Layer):
    """y = x * scale + offset (Keras' Rescaling): e.g. scale 1/255 turns image_folder's 0..255 pixels into 0..1."""

    supports_masking = True

    def __init__(self, scale: float, offset: float = 0.0, **kw):
        super().__init__(**kw)
        self.scale, self.offset = float(scale), float(offset)

    def forward(self, x, training=False):
        return x * np.float32(self.scale) + np.float32(self.offset)

    def backward(self, grad):
        return grad * np.float32(self.scale)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        y = g.op("Mul", [x.name, g.weight(self, np.array(self.scale, np.float32), "scale")])
        y = g.op("Add", [y, g.weight(self, np.array(self.offset, np.float32), "offset")], self.name)
        return g.value(y, x.rank)


class _Augmentation(Layer):
    supports_masking = True

    def __init__(self, seed: int | None = None, **kw):
        super().__init__(**kw)
        self.seed = seed

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"{type(self).__name__} '{self.name}' expects images (batch, height, width, channels);"
                             f" got (None, {', '.join(map(str, input_shape))})")
        if self.seed is not None:
            self.rng = np.random.default_rng(self.seed)

    def forward(self, x, training=False):
        self.active = bool(training)
        return self.augment(x) if training else x

    def backward(self, grad):
        return self.augment_backward(grad) if self.active else grad

    def to_onnx(self, g, x, in_shape, mask):
        return x  # the identity at inference


@register("RandomFlip")
class RandomFlip(_Augmentation):
    """Flip each image with probability 1/2 per direction in `mode` (horizontal = left-right)."""

    MODES = {"horizontal": (False, True), "vertical": (True, False), "horizontal_and_vertical": (True, True)}

    def __init__(self, mode: str = "horizontal_and_vertical", seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        if mode not in self.MODES:
            raise ConfigError(f"RandomFlip: mode must be one of {', '.join(self.MODES)}; got {mode!r}")
        self.mode = mode

    def augment(self, x):
        vertical, horizontal = self.MODES[self.mode]
        n = x.shape[0]
        self.flips = (self.rng.random(n) < 0.5) & vertical, (self.rng.random(n) < 0.5) & horizontal
        return self._flip(x)

    def _flip(self, x):
        for axis, flip in zip((1, 2), self.flips):
            if flip.any():
                x = np.where(flip[:, None, None, None], np.flip(x, axis), x)
        return x

    def augment_backward(self, grad):
        return self._flip(grad)  # a flip is its own inverse (and the two flips commute)


def _range(factor, what: str, layer: str) -> tuple[float, float]:
    """Keras: a float f means [-f, f]; a pair means [lower, upper]."""
    lo, hi = (-abs(float(factor)), abs(float(factor))) if np.isscalar(factor) else tuple(map(float, factor))
    if lo > hi:
        raise ConfigError(f"{layer}: {what} lower bound {lo} is above its upper bound {hi}")
    return lo, hi


def _fold(idx, n: int, fill_mode: str):
    """Integer indices mapped into [0, n) by Keras' fill mode; `valid` is False where 'constant' fills instead."""
    if fill_mode == "reflect":  # (d c b a | a b c d | d c b a)
        k = idx % (2 * n)
        return np.where(k >= n, 2 * n - 1 - k, k), None
    if fill_mode == "wrap":
        return idx % n, None
    clipped = np.clip(idx, 0, n - 1)
    return clipped, (None if fill_mode == "nearest" else (idx >= 0) & (idx < n))


class _Resampling(_Augmentation):
    """Output pixel (r, c) reads the input at a per-image source coordinate `source(n, h, w)` gives."""

    def _resampling_args(self, fill_mode, interpolation, fill_value):
        kind = type(self).__name__
        if fill_mode not in FILL_MODES:
            raise ConfigError(f"{kind}: fill_mode must be one of {', '.join(FILL_MODES)}; got {fill_mode!r}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"{kind}: interpolation must be one of {', '.join(INTERPOLATIONS)}; "
                              f"got {interpolation!r}")
        self.fill_mode, self.interpolation, self.fill_value = fill_mode, interpolation, float(fill_value)

    def augment(self, x):
        n, h, w, c = x.shape
        rows, cols = self.source(n, h, w)
        if self.interpolation == "nearest":
            corners = [(np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64), None)]
        else:
            r0, c0 = np.floor(rows), np.floor(cols)
            fr, fc = rows - r0, cols - c0
            r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
            corners = [(r0, c0, (1 - fr) * (1 - fc)), (r0, c0 + 1, (1 - fr) * fc),
                       (r0 + 1, c0, fr * (1 - fc)), (r0 + 1, c0 + 1, fr * fc)]
        base = (np.arange(n) * h)[:, None, None]
        flat_x = x.reshape(-1, c)
        out = np.zeros(x.shape, x.dtype)
        fill = np.zeros((n, h, w), x.dtype)
        self.corners = []
        for r, cc, weight in corners:
            r, valid_r = _fold(r, h, self.fill_mode)
            cc, valid_c = _fold(cc, w, self.fill_mode)
            weight = np.ones((n, h, w), x.dtype) if weight is None else weight.astype(x.dtype)
            if valid_r is not None:
                fill += weight * ~(valid_r & valid_c)
                weight = weight * (valid_r & valid_c)
            flat = ((base + r) * w + cc).reshape(-1)
            out += weight[..., None] * flat_x[flat].reshape(x.shape)
            self.corners.append((flat, weight.reshape(-1, 1)))
        if self.fill_mode == "constant" and self.fill_value:
            out += self.fill_value * fill[..., None]
        self.in_shape = x.shape
        return out

    def augment_backward(self, grad):
        c = self.in_shape[-1]
        dx = np.zeros((int(np.prod(self.in_shape[:-1])), c), grad.dtype)
        g = grad.reshape(-1, c)
        for flat, weight in self.corners:
            np.add.at(dx, flat, g * weight)
        return dx.reshape(self.in_shape)


@register("RandomTranslation")
class RandomTranslation(_Resampling):
    """Shift each image by a random fraction of its height/width (positive = down/right), as Keras."""

    def __init__(self, height_factor, width_factor, fill_mode: str = "reflect", interpolation: str = "bilinear",
                 seed: int | None = None, fill_value: float = 0.0, **kw):
        super().__init__(seed, **kw)
        self.height_factor = _range(height_factor, "height_factor", "RandomTranslation")
        self.width_factor = _range(width_factor, "width_factor", "RandomTranslation")
        self._resampling_args(fill_mode, interpolation, fill_value)

    def source(self, n, h, w):
        dy = self.rng.uniform(*self.height_factor, n) * h
        dx = self.rng.uniform(*self.width_factor, n) * w
        rows = np.arange(h)[None, :, None] - dy[:, None, None]
        cols = np.arange(w)[None, None, :] - dx[:, None, None]
        return np.broadcast_to(rows, (n, h, w)), np.broadcast_to(cols, (n, h, w))


@register("RandomRotation")
class RandomRotation(_Resampling):
    """Rotate each image about its centre by a random fraction `factor` of a full turn (positive =
    counter-clockwise), as Keras; any angle, not only multiples of 90 degrees."""

    def __init__(self, factor, fill_mode: str = "reflect", interpolation: str = "bilinear", seed: int | None = None,
                 fill_value: float = 0.0, **kw):
        super().__init__(seed, **kw)
        self.factor = _range(factor, "factor", "RandomRotation")
        self._resampling_args(fill_mode, interpolation, fill_value)

    def source(self, n, h, w):
        theta = self.rng.uniform(*self.factor, n)[:, None, None] * 2 * np.pi
        cy, cx = (h - 1) / 2, (w - 1) / 2
        r = np.arange(h)[None, :, None] - cy
        c = np.arange(w)[None, None, :] - cx
        cos, sin = np.cos(theta), np.sin(theta)
        # inverse rotation of the output pixel (image rows point down, hence the signs)
        return cy + sin * c + cos * r, cx + cos * c - sin * r


@register("RandomZoom")
class RandomZoom(_Resampling):
    """Zoom each image about its centre; a positive factor zooms out, a negative one in (Keras' convention).
    width_factor None keeps the aspect ratio (the same draw as the height)."""

    def __init__(self, height_factor, width_factor=None, fill_mode: str = "reflect",
                 interpolation: str = "bilinear", seed: int | None = None, fill_value: float = 0.0, **kw):
        super().__init__(seed, **kw)
        self.height_factor = _range(height_factor, "height_factor", "RandomZoom")
        self.width_factor = None if width_factor is None else _range(width_factor, "width_factor", "RandomZoom")
        self._resampling_args(fill_mode, interpolation, fill_value)

    def source(self, n, h, w):
        zh = 1 + self.rng.uniform(*self.height_factor, n)[:, None, None]
        zw = zh if self.width_factor is None else 1 + self.rng.uniform(*self.width_factor, n)[:, None, None]
        cy, cx = (h - 1) / 2, (w - 1) / 2
        rows = cy + (np.arange(h)[None, :, None] - cy) * zh
        cols = cx + (np.arange(w)[None, None, :] - cx) * zw
        return np.broadcast_to(rows, (n, h, w)), np.broadcast_to(cols, (n, h, w))
