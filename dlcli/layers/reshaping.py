"""Spatial reshaping of images (channels_last): ZeroPadding2D, Cropping2D, UpSampling2D, plus SpatialDropout2D."""
import numpy as np

from dlcli.errors import ConfigError, ShapeError
from dlcli.engine.layer import Layer, register
from dlcli.layers.core import Dropout
from dlcli.registry import Sizes


def _pairs(value, what: str, layer: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras' forms: n -> ((n, n), (n, n)); (h, w) -> ((h, h), (w, w)); ((top, bottom), (left, right))."""
    try:
        if isinstance(value, (int, np.integer)):
            return ((int(value),) * 2,) * 2
        a, b = value
        if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
            return (int(a), int(a)), (int(b), int(b))
        pairs = tuple(tuple(int(v) for v in p) for p in (a, b))
        if all(len(p) == 2 for p in pairs) and min(min(p) for p in pairs) >= 0:
            return pairs
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{layer}: {what} must be an int, [height, width] or [[top, bottom], [left, right]] of "
                      f"non-negative ints; got {value!r}")


def _check_image(layer, input_shape):
    if len(input_shape) != 3:
        raise ShapeError(f"{type(layer).__name__} '{layer.name}' expects images (batch, height, width, channels); "
                         f"got (None, {', '.join(map(str, input_shape))})")


def _onnx_image_axes(x) -> list[int]:
    """The height and width axes of an ONNX Value in either layout."""
    return [2, 3] if x.first else [1, 2]


@register("ZeroPadding2D")
class ZeroPadding2D(Layer):
    def __init__(self, padding=(1, 1), **kw):
        super().__init__(**kw)
        self.padding = _pairs(padding, "padding", "ZeroPadding2D")

    def output_shape(self, input_shape):
        _check_image(self, input_shape)
        (t, b), (l, r) = self.padding
        return (input_shape[0] + t + b, input_shape[1] + l + r, input_shape[2])

    def forward(self, x, training=False):
        return np.pad(x, ((0, 0), *self.padding, (0, 0)))

    def backward(self, grad):
        (t, b), (l, r) = self.padding
        return grad[:, t:grad.shape[1] - b, l:grad.shape[2] - r]

    def to_onnx(self, g, x, in_shape, mask):
        pairs = [(0, 0)] * x.rank
        for axis, pair in zip(_onnx_image_axes(x), self.padding):
            pairs[axis] = pair
        return g.value(g.op("Pad", [x.name, g.ints(g.pads(pairs), "pads")], self.name), x.rank, x.first)


@register("Cropping2D")
class Cropping2D(Layer):
    def __init__(self, cropping=((0, 0), (0, 0)), **kw):
        super().__init__(**kw)
        self.cropping = _pairs(cropping, "cropping", "Cropping2D")

    def output_shape(self, input_shape):
        _check_image(self, input_shape)
        (t, b), (l, r) = self.cropping
        h, w = input_shape[0] - t - b, input_shape[1] - l - r
        if h < 1 or w < 1:
            raise ShapeError(f"Cropping2D '{self.name}': cropping {self.cropping} removes everything from a "
                             f"{input_shape[0]}x{input_shape[1]} image")
        return (h, w, input_shape[2])

    def build(self, input_shape):
        self.output_shape(input_shape)

    def forward(self, x, training=False):
        self.in_shape = x.shape
        (t, b), (l, r) = self.cropping
        return x[:, t:x.shape[1] - b, l:x.shape[2] - r]

    def backward(self, grad):
        dx = np.zeros(self.in_shape, grad.dtype)
        (t, b), (l, r) = self.cropping
        dx[:, t:self.in_shape[1] - b, l:self.in_shape[2] - r] = grad
        return dx

    def to_onnx(self, g, x, in_shape, mask):
        (t, b), (l, r) = self.cropping
        h, w = in_shape[0], in_shape[1]
        y = g.op("Slice", [x.name, g.ints([t, l]), g.ints([h - b, w - r]), g.ints(_onnx_image_axes(x))], self.name)
        return g.value(y, x.rank, x.first)


@register("UpSampling2D")
class UpSampling2D(Layer):
    """Repeat rows and columns `size` times (Keras' nearest interpolation)."""

    def __init__(self, size: Sizes = (2, 2), interpolation: str = "nearest", **kw):
        super().__init__(**kw)
        self.size = (int(size),) * 2 if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        if interpolation != "nearest":
            raise ConfigError(f"UpSampling2D: only interpolation 'nearest' is implemented; got {interpolation!r}")
        self.interpolation = interpolation

    def output_shape(self, input_shape):
        _check_image(self, input_shape)
        return (input_shape[0] * self.size[0], input_shape[1] * self.size[1], input_shape[2])

    def forward(self, x, training=False):
        n, h, w, c = x.shape
        sh, sw = self.size
        # one broadcast copy instead of two np.repeat passes
        return np.broadcast_to(x[:, :, None, :, None], (n, h, sh, w, sw, c)).reshape(n, h * sh, w * sw, c)

    def backward(self, grad):
        n, hh, ww, c = grad.shape
        sh, sw = self.size
        return grad.reshape(n, hh // sh, sh, ww // sw, sw, c).sum((2, 4))

    def to_onnx(self, g, x, in_shape, mask):
        x = g.first(x)
        scales = g.const(np.array([1, 1, *self.size], np.float32), "scales", key=("scales", self.size))
        # nearest with floor on asymmetric coordinates: output pixel i reads input i // size (dlcli's repeat)
        y = g.op("Resize", [x.name, "", scales], self.name, mode="nearest",
                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        return g.value(y, 4, True)


@register("SpatialDropout2D")
class SpatialDropout2D(Dropout):
    """Dropout of whole feature maps: one keep/drop draw per (sample, channel), scaled by 1 / (1 - rate) as Keras."""

    def __init__(self, rate: float, **kw):
        super().__init__(rate, **kw)
        self.noise_shape = [1, 1, None]

    def output_shape(self, input_shape):
        _check_image(self, input_shape)
        return input_shape
