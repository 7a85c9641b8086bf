"""Colour augmentation layers of Keras 3.15's image_preprocessing: each changes pixel values, never where they are;
and the layers composing augmentation layers (RandomColorJitter, RandAugment, AugMix), which run these and the
geometric ones of preprocessing.py on the parts' own math.

Keras works in the 0..255 scale whatever `value_range` says (its _transform_value_range maps there and back); the
layers here do the same arithmetic in the same order, so they agree with Keras to rounding. The random ones draw
their parameters per image with the layer's `self.rng`, as the other augmentation layers, and are the identity at
inference; AutoContrast is applied at inference too, as Keras applies it.
"""
import copy

import numpy as np

from dlcli.engine.layer import register
from dlcli.errors import ConfigError, ShapeError
from dlcli.layers.preprocessing import (GRAYSCALE, RandomBrightness, RandomContrast, RandomRotation, RandomShear,
                                        RandomTranslation, _Augmentation, _factor, _gaussian, _neighbourhood_sum,
                                        _PixelAugmentation, _value_range)


def _to_255(x, value_range):
    """Keras' _transform_value_range(x, value_range, (0, 255))."""
    low, high = value_range
    return x if (low, high) == (0, 255) else (x - low) / (high - low) * 255


def _from_255(x, value_range):
    low, high = value_range
    return x if (low, high) == (0, 255) else x / 255 * (high - low) + low


def _unit_factor(factor, what: str, layer: str) -> tuple[float, float]:
    """Solarization's factors: a number f in [0, 1] means [0, f]; a pair in [0, 1] is sorted."""
    pair = list(factor) if isinstance(factor, (list, tuple)) else [0, factor]
    if len(pair) != 2 or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1
                             for f in pair):
        raise ConfigError(f"{layer}: {what} must be a number or a pair in [0, 1]; got {factor!r}")
    return tuple(sorted(float(f) for f in pair))


def _channels_last(data_format, layer: str):
    if data_format not in (None, "channels_last"):
        raise ConfigError(f"{layer}: dlcli images are channels_last; got data_format {data_format!r}")
    return data_format


def _needs_rgb(layer, input_shape):
    if input_shape[-1] != 3:
        raise ShapeError(f"{type(layer).__name__} '{layer.name}' needs 3 channels (RGB); got {input_shape[-1]}")


@register("Solarization")
class Solarization(_Augmentation):
    """Per image, in the 0..255 scale: y = clip(x + a, 0, 255), then 255 - y where y >= t (Keras' Solarization).
    a is drawn from [addition_factor[0], addition_factor[1] * 255] and t from [threshold_factor[0],
    threshold_factor[1] * 255] (a number f means [0, f]; Keras scales only the upper bound by 255, and so does
    dlcli). With the default thresholds 0 every pixel is inverted. The identity at inference."""

    def __init__(self, addition_factor=0.0, threshold_factor=0.0, value_range=(0, 255), seed: int | None = None,
                 data_format: str | None = None, **kw):
        super().__init__(seed, **kw)
        self.addition_factor = _unit_factor(addition_factor, "addition_factor", "Solarization")
        self.threshold_factor = _unit_factor(threshold_factor, "threshold_factor", "Solarization")
        self.value_range = _value_range(value_range, "Solarization")
        self.data_format = _channels_last(data_format, "Solarization")

    def draw(self, n):
        (a0, a1), (t0, t1) = self.addition_factor, self.threshold_factor
        # Keras draws both from one seed; dlcli draws them one after the other from the layer's stream
        return {"additions": self.rng.uniform(a0, a1 * 255, n), "thresholds": self.rng.uniform(t0, t1 * 255, n)}

    def augment(self, x, drawn):
        add, threshold = (np.asarray(drawn[k], x.dtype).reshape(-1, 1, 1, 1) for k in ("additions", "thresholds"))
        y = _to_255(x, self.value_range) + add
        self.inside = (y >= 0) & (y <= 255)  # where the clip passes the gradient (torch's clamp)
        y = np.clip(y, 0, 255)
        self.sign = np.where(y < threshold, 1, -1).astype(x.dtype)
        return _from_255(np.where(y < threshold, y, 255 - y), self.value_range).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        return grad * self.inside * self.sign  # the scale to 0..255 and back cancels


@register("RandomPosterization")
class RandomPosterization(_Augmentation):
    """Keep the top b bits of each 0..255 pixel value (Keras' RandomPosterization: truncated to an integer, then
    shifted right and left by 8 - b), b drawn per image as an integer in [factor[0], factor[1]) (a number f means
    [1, f); a pair with equal ends always uses that many bits). Values are clipped to 0..255 before the truncation.
    Piecewise constant, so its gradient is zero; the identity at inference."""

    def __init__(self, factor, value_range=(0, 255), data_format: str | None = None, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (1, 8), "RandomPosterization")
        self.value_range = _value_range(value_range, "RandomPosterization")
        self.data_format = _channels_last(data_format, "RandomPosterization")

    def draw(self, n):
        low, high = self.factor
        bits = self.rng.integers(int(low), int(high), n) if low != high else np.full(n, int(low))
        return 8 - bits  # Keras' shift_factor

    def augment(self, x, shift):
        step = (2.0 ** np.asarray(shift)).astype(x.dtype).reshape(-1, 1, 1, 1)
        pixels = np.floor(np.clip(_to_255(x, self.value_range), 0, 255))
        return _from_255(np.floor(pixels / step) * step, self.value_range).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        return np.zeros_like(grad)


@register("RandomColorDegeneration")
class RandomColorDegeneration(_PixelAugmentation):
    """x + f (gray(x) - x) per image, f drawn from factor's range (Keras: a number f means [-f, f] within [-1, 1],
    so it desaturates (f > 0) or oversaturates (f < 0)), gray with Keras' 0.2989/0.587/0.114 weights, then clipped
    to value_range. RGB images only; the identity at inference."""

    def __init__(self, factor, value_range=(0, 255), data_format: str | None = None, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (-1.0, 1.0), "RandomColorDegeneration")
        self.value_range = _value_range(value_range, "RandomColorDegeneration")
        self.data_format = _channels_last(data_format, "RandomColorDegeneration")

    def build(self, input_shape):
        super().build(input_shape)
        _needs_rgb(self, input_shape)

    def draw(self, n):
        return self.rng.uniform(*self.factor, n)

    def apply(self, x, f):
        f = f[:, None, None, None]
        return x + f * ((x @ GRAYSCALE.astype(x.dtype))[..., None] - x)

    def apply_backward(self, grad, f):
        f = f[:, None, None, None]
        return grad * (1 - f) + (f * grad).sum(-1, keepdims=True) * GRAYSCALE.astype(grad.dtype)


@register("AutoContrast")
class AutoContrast(_Augmentation):
    """Stretch each image's channel to the whole value_range: (x - min) / (max - min), min and max over height and
    width, computed in the 0..255 scale and clipped to it as Keras' AutoContrast; a constant channel is left as it
    is (Keras' NaN guard). Keras applies it at inference too, and so does dlcli (and its ONNX export)."""

    def __init__(self, value_range=(0, 255), data_format: str | None = None, **kw):
        super().__init__(None, **kw)
        self.value_range = _value_range(value_range, "AutoContrast")
        self.data_format = _channels_last(data_format, "AutoContrast")

    def forward(self, x, training=False):
        self.active = True  # in training and at inference alike
        return self.augment(x, None)

    def augment(self, x, drawn):
        images = _to_255(x, self.value_range)
        low = images.min((1, 2), keepdims=True)
        high = images.max((1, 2), keepdims=True)
        self.flat = high == low
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(self.flat, 0, 255.0 / np.where(self.flat, 1, high - low))
        y = images * scale + (-low * scale)  # Keras' order of operations, so the clip below cuts where Keras' does
        self.inside = (y >= 0) & (y <= 255)
        self.stretched, self.scale = np.clip(y, 0, 255), scale
        self.at_low, self.at_high = images == low, images == high
        out = np.where(self.flat, x, _from_255(self.stretched, self.value_range))
        return out.astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        # y = (x - L) s with s = 255 / (H - L) in the 0..255 scale (the scale to it and back cancels in dy/dx): dy/dx =
        # s, dy/dL = (y - 255) / (H - L), dy/dH = -y / (H - L); L and H pass theirs to the pixels that are the
        # minimum and maximum, split between ties (torch's amin/amax)
        g = grad * self.inside
        unit = self.scale / 255
        d_low = (g * (self.stretched - 255) * unit).sum((1, 2), keepdims=True)
        d_high = (-g * self.stretched * unit).sum((1, 2), keepdims=True)
        dx = g * self.scale
        dx = dx + self.at_low * d_low / self.at_low.sum((1, 2), keepdims=True)
        dx = dx + self.at_high * d_high / self.at_high.sum((1, 2), keepdims=True)
        return np.where(self.flat, grad, dx)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        low_v, high_v = self.value_range
        low = g.reduce("ReduceMin", x.name, [1, 2])
        high = g.reduce("ReduceMax", x.name, [1, 2])
        spread = g.op("Sub", [high, low])
        flat = g.op("Equal", [spread, g.scalar(0.0)])
        safe = g.op("Where", [flat, g.scalar(1.0), spread])
        unit = g.op("Div", [g.op("Sub", [x.name, low]), safe])  # 0..1 before the clip
        y = g.op("Clip", [unit, g.scalar(0.0), g.scalar(1.0)])
        y = g.op("Add", [g.op("Mul", [y, g.scalar(high_v - low_v)]), g.scalar(low_v)])
        return g.value(g.op("Where", [flat, x.name, y], self.name), x.rank)


@register("Equalization")
class Equalization(_Augmentation):
    """Histogram equalization as Keras 3.15's Equalization: per channel, a `bins`-bin histogram of the 0..255
    values (binned in float32, as Keras), its cumulative counts mapped to 0..255 and rounded, each pixel replaced
    by its bin's value; a channel whose values fall in one bin is left as it is. As in Keras, the histogram of a
    channel is taken over the whole batch, and the layer acts only in training (Keras' transform_images skips it
    when training is False), so it is the identity at inference. Piecewise constant: its gradient is zero."""

    def __init__(self, value_range=(0, 255), bins: int = 256, data_format: str | None = None, **kw):
        super().__init__(None, **kw)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ConfigError(f"Equalization: bins must be an integer >= 2; got {bins!r}")
        self.value_range = _value_range(value_range, "Equalization")
        self.bins, self.data_format = bins, _channels_last(data_format, "Equalization")

    def augment(self, x, drawn):
        images = _to_255(x, self.value_range)  # (n, h, w, c)
        channels = images.reshape(-1, images.shape[-1])
        binned = (channels.astype(np.float32) * np.float32(self.bins - 1) / np.float32(255)).astype(np.int64)
        binned = np.clip(binned, 0, self.bins - 1)
        counts = np.zeros((self.bins, channels.shape[1]), np.int64)
        np.add.at(counts, (binned, np.arange(channels.shape[1])), 1)
        cdf = counts.cumsum(0)
        cdf_min = np.take_along_axis(cdf, (cdf > 0).argmax(0)[None], 0)
        denominator = cdf[-1:] - cdf_min
        denominator = np.where(denominator == 0, 1, denominator)
        # torch divides the integer counts in its default float32
        table = np.clip(np.round(((cdf - cdf_min) * 255).astype(np.float32) / denominator.astype(np.float32)), 0, 255)
        index = np.clip(channels / 255.0 * (self.bins - 1), 0, self.bins - 1).astype(np.int64)
        equalized = np.take_along_axis(table, index, 0)
        self.kept = (counts > 0).sum(0) <= 1  # one bin: the channel passes unchanged (and so does its gradient)
        equalized = np.where(self.kept, channels, equalized).reshape(images.shape)
        return _from_255(equalized, self.value_range).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        return grad * self.kept


@register("ContrastLimitedAdaptiveHistogramEqualization")
class ContrastLimitedAdaptiveHistogramEqualization(_Augmentation):
    """CLAHE as Keras 3.15's layer of that name, in float32 and the 0..255 scale as Keras computes it: the images
    padded at the bottom and right (symmetric) to tile_grid_size whole tiles; per image, tile and channel a 256-bin
    histogram of the truncated values, clipped at clip_limit * tile pixels / 256 with the excess spread evenly
    (clip_limit 0: no clipping), its cumulative counts mapped to 0..255 from the smallest; each pixel looks its
    value up in the four nearest tiles' maps and mixes them bilinearly (edge tiles repeated). Keras applies it in
    training and at inference alike, and so does dlcli (its ONNX export too). Piecewise constant: its gradient is
    zero."""

    def __init__(self, value_range=(0, 255), clip_limit: float = 4.0, tile_grid_size=(8, 8),
                 data_format: str | None = None, **kw):
        super().__init__(None, **kw)
        self.value_range = _value_range(value_range, "ContrastLimitedAdaptiveHistogramEqualization")
        if isinstance(clip_limit, bool) or not isinstance(clip_limit, (int, float)):
            raise ConfigError(f"ContrastLimitedAdaptiveHistogramEqualization: clip_limit must be a number; got "
                              f"{clip_limit!r}")
        grid = list(tile_grid_size) if isinstance(tile_grid_size, (list, tuple)) else [tile_grid_size]
        if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
            raise ConfigError(f"ContrastLimitedAdaptiveHistogramEqualization: tile_grid_size must be two integers "
                              f">= 1 (tiles down, across); got {tile_grid_size!r}")
        self.clip_limit, self.tile_grid_size = float(clip_limit), tuple(grid)
        self.data_format = _channels_last(data_format, "ContrastLimitedAdaptiveHistogramEqualization")

    def build(self, input_shape):
        super().build(input_shape)
        height, width = input_shape[:2]
        grid_h, grid_w = self.tile_grid_size
        self.tile = -(-height // grid_h), -(-width // grid_w)
        # each padded row's and column's two nearest tiles (in the maps with the edge tiles repeated) and weights
        self.rows, self.cols = (_tile_mixing(size * grid, size, grid) for size, grid in zip(self.tile,
                                                                                              self.tile_grid_size))

    def forward(self, x, training=False):
        self.active = True  # in training and at inference alike
        return self.augment(x, None)

    def augment(self, x, drawn):
        n, height, width, channels = x.shape
        (tile_h, tile_w), (grid_h, grid_w) = self.tile, self.tile_grid_size
        images = _to_255(x.astype(np.float32), self.value_range)
        padded = np.pad(images, ((0, 0), (0, tile_h * grid_h - height), (0, tile_w * grid_w - width), (0, 0)),
                        mode="symmetric")
        bins = np.clip(padded, 0, 255).astype(np.int64)  # truncated, as Keras' cast to int32
        tiles = bins.reshape(n, grid_h, tile_h, grid_w, tile_w, channels).transpose(0, 1, 3, 5, 2, 4)
        cell = np.arange(n * grid_h * grid_w * channels).reshape(n, grid_h, grid_w, channels, 1, 1) * 256
        hists = np.bincount((cell + tiles).ravel(), minlength=cell.size * 256).astype(np.float32)
        hists = hists.reshape(n, grid_h, grid_w, channels, 256)
        area = np.float32(tile_h * tile_w)
        if self.clip_limit > 0:
            clipped = np.minimum(hists, np.float32(self.clip_limit * tile_h * tile_w / 256.0))
            hists = clipped + (hists - clipped).sum(-1, keepdims=True) / np.float32(256)
        cdf = hists.cumsum(-1)
        cdf_min = cdf.min(-1, keepdims=True)
        denominator = np.where(area - cdf_min == 0, np.float32(1), area - cdf_min)
        maps = np.clip((cdf - cdf_min) * np.float32(255) / denominator, 0, 255)
        maps = np.pad(maps, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)), mode="edge")
        (y0, y1, wy), (x0, x1, wx) = self.rows, self.cols
        batch, channel = np.arange(n)[:, None, None, None], np.arange(channels)
        wx, wy = wx[:, None], wy[:, None, None]

        def look_up(ty, tx):
            return maps[batch, ty[:, None, None], tx[:, None], channel, bins]

        top = look_up(y0, x0) * (1 - wx) + look_up(y0, x1) * wx
        bottom = look_up(y1, x0) * (1 - wx) + look_up(y1, x1) * wx
        out = (top * (1 - wy) + bottom * wy)[:, :height, :width]
        return _from_255(out, self.value_range).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        return np.zeros_like(grad)

    def to_onnx(self, g, x, in_shape, mask):
        """The same steps: the padding and the edge tiles as Gathers, the histograms as OneHot summed over each
        tile, the four look-ups as one GatherElements each into the flattened maps."""
        x = g.last(x)
        height, width, channels = in_shape
        (tile_h, tile_w), (grid_h, grid_w) = self.tile, self.tile_grid_size
        low, high = self.value_range
        t = x.name
        if (low, high) != (0, 255):
            t = g.op("Mul", [g.op("Div", [g.op("Sub", [t, g.scalar(low)]), g.scalar(high - low)]), g.scalar(255)])
        for axis, length, padded in ((1, height, tile_h * grid_h), (2, width, tile_w * grid_w)):
            if padded > length:
                t = g.op("Gather", [t, g.ints(np.pad(np.arange(length), (0, padded - length), "symmetric"))],
                         axis=axis)
        bins = g.cast(g.op("Floor", [g.op("Clip", [t, g.scalar(0.0), g.scalar(255.0)])]), "int64")
        tiles = g.op("Reshape", [bins, g.ints([-1, grid_h, tile_h, grid_w, tile_w, channels])])
        tiles = g.op("Transpose", [tiles], perm=[0, 1, 3, 5, 2, 4])
        tiles = g.op("Reshape", [tiles, g.ints([-1, grid_h, grid_w, channels, tile_h * tile_w])])
        one_hot = g.op("OneHot", [tiles, g.ints([256]), g.const(np.array([0, 1], np.float32), "off_on")], axis=-1)
        hists = g.reduce("ReduceSum", one_hot, [4], keepdims=0)
        if self.clip_limit > 0:
            clipped = g.op("Min", [hists, g.scalar(self.clip_limit * tile_h * tile_w / 256.0)])
            excess = g.reduce("ReduceSum", g.op("Sub", [hists, clipped]), [-1])
            hists = g.op("Add", [clipped, g.op("Div", [excess, g.scalar(256.0)])])
        cdf = g.op("CumSum", [hists, g.const(np.array(4, np.int64), "axis")])
        cdf_min = g.reduce("ReduceMin", cdf, [-1])
        spread = g.op("Sub", [g.scalar(tile_h * tile_w), cdf_min])
        spread = g.op("Where", [g.op("Equal", [spread, g.scalar(0.0)]), g.scalar(1.0), spread])
        maps = g.op("Div", [g.op("Mul", [g.op("Sub", [cdf, cdf_min]), g.scalar(255.0)]), spread])
        maps = g.op("Clip", [maps, g.scalar(0.0), g.scalar(255.0)])
        for axis, grid in ((1, grid_h), (2, grid_w)):
            maps = g.op("Gather", [maps, g.ints([0, *range(grid), grid - 1])], axis=axis)
        maps = g.op("Reshape", [maps, g.ints([0, -1])])
        (y0, y1, wy), (x0, x1, wx) = self.rows, self.cols
        flat_bins = g.op("Reshape", [bins, g.ints([0, -1])])

        def look_up(ty, tx):
            start = ((ty[:, None, None] * (grid_w + 2) + tx[:, None]) * channels + np.arange(channels)) * 256
            index = g.op("Add", [flat_bins, g.const(start.reshape(1, -1), "clahe_tiles")])
            return g.op("Reshape", [g.op("GatherElements", [maps, index], axis=1), g.ints([-1, *start.shape])])

        def mix(a, b, weight):
            return g.op("Add", [g.op("Mul", [a, g.const(1 - weight, "w")]), g.op("Mul", [b, g.const(weight, "w")])])

        across = wx.reshape(1, 1, -1, 1)
        out = mix(mix(look_up(y0, x0), look_up(y0, x1), across), mix(look_up(y1, x0), look_up(y1, x1), across),
                  wy.reshape(1, -1, 1, 1))
        out = g.op("Slice", [out, g.ints([0, 0]), g.ints([height, width]), g.ints([1, 2])])
        if (low, high) != (0, 255):
            out = g.op("Add", [g.op("Mul", [g.op("Div", [out, g.scalar(255.0)]), g.scalar(high - low)]),
                               g.scalar(low)])
        return g.value(g.op("Identity", [out], self.name), 4)


def _tile_mixing(length: int, tile: int, grid: int):
    """Keras' CLAHE interpolation along one axis: per padded position its two neighbouring tiles' indices into the
    edge-padded maps and the second one's weight, in float32 as Keras computes them."""
    position = (np.arange(length, dtype=np.float32) - np.float32(tile / 2.0)) / np.float32(tile) + np.float32(1)
    low = np.floor(position)
    return (np.clip(low, 0, grid + 1).astype(np.int64), np.clip(low + 1, 0, grid + 1).astype(np.int64),
            position - low)


@register("RandomSharpness")
class RandomSharpness(_PixelAugmentation):
    """x + (1 - 2f) (smooth(x) - x) per image, f drawn from factor's range (a number means [0, f]; 0.5 leaves the
    image as it is, less blurs, more sharpens), smooth the 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13 with zero padding
    (Keras' RandomSharpness, borders included), then clipped to value_range; the identity at inference."""

    def __init__(self, factor, value_range=(0, 255), data_format: str | None = None, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (0.0, 1.0), "RandomSharpness")
        self.value_range = _value_range(value_range, "RandomSharpness")
        self.data_format = _channels_last(data_format, "RandomSharpness")

    def draw(self, n):
        return self.rng.uniform(*self.factor, n)

    @staticmethod
    def smooth(x):
        return _neighbourhood_sum(x, 3, 3) * x.dtype.type(1 / 13) + x * x.dtype.type(4 / 13)

    def apply(self, x, f):
        keep = (1 - 2 * f)[:, None, None, None]
        return x + keep * (self.smooth(x) - x)

    def apply_backward(self, grad, f):
        keep = (1 - 2 * f)[:, None, None, None]
        return grad * (1 - keep) + self.smooth(grad * keep)  # the smoothing kernel is symmetric: its own transpose


@register("RandomGaussianBlur")
class RandomGaussianBlur(_Augmentation):
    """Blur each image with probability p, p drawn per image from factor's range (a number means [0, f]), with a
    kernel_size x kernel_size Gaussian whose two sigmas are drawn once per batch from sigma's range (plus 1e-6),
    zero padding, then clip to value_range (Keras' RandomGaussianBlur: sigma[0] across, sigma[1] down). Keras pads
    both axes by the first size, so dlcli takes one odd size. The identity at inference."""

    def __init__(self, factor=1.0, kernel_size=3, sigma=1.0, value_range=(0, 255), data_format: str | None = None,
                 seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (0.0, 1.0), "RandomGaussianBlur")
        sizes = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else [kernel_size, kernel_size]
        if len(sizes) != 2 or len(set(sizes)) != 1 or isinstance(sizes[0], bool) or not isinstance(sizes[0], int) \
                or sizes[0] < 1 or sizes[0] % 2 == 0:
            raise ConfigError(f"RandomGaussianBlur: kernel_size must be one odd integer (or a pair of equal ones); "
                              f"got {kernel_size!r}")
        self.kernel_size = sizes[0]
        self.sigma = _factor(sigma, (0.0, 1.0), "RandomGaussianBlur")
        self.value_range = _value_range(value_range, "RandomGaussianBlur")
        self.data_format = _channels_last(data_format, "RandomGaussianBlur")

    def draw(self, n):
        probability = self.rng.uniform(*self.factor, n)
        return {"should_apply_blur": self.rng.uniform(0, 1, n) < probability,
                "blur_factor": self.rng.uniform(*self.sigma, 2) + 1e-6}

    def _blur(self, x):
        k = self.kernel_size
        across, down = (_gaussian(k, s).astype(x.dtype) for s in self.blur_factor)
        return _neighbourhood_sum(x, k, k, down, across)

    def augment(self, x, drawn):
        self.chosen = np.asarray(drawn["should_apply_blur"], bool)[:, None, None, None]
        self.blur_factor = np.asarray(drawn["blur_factor"], np.float64)
        y = np.where(self.chosen, self._blur(x), x)
        low, high = self.value_range
        self.inside = (y >= low) & (y <= high)
        return np.clip(y, low, high).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        grad = grad * self.inside
        return np.where(self.chosen, self._blur(grad), grad)  # a Gaussian kernel is symmetric


def rgb_to_hsv(x):
    """Keras' rgb_to_hsv (dm_pix's): hue and saturation in [0, 1], value the largest channel, any pixel scale;
    returns (h, s, v) and the function mapping their gradients to x's."""
    eps = np.finfo(x.dtype).eps
    kept = np.abs(x) >= eps  # Keras zeroes values within eps of 0
    x = np.where(kept, x, 0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, m = x.max(-1), x.min(-1)
    spread = v - m
    safe_v, safe_spread = np.where(v > 0, v, 1), np.where(spread > 0, spread, 1)
    s = np.where(v > 0, spread / safe_v, 0)
    norm = 1 / (6 * safe_spread)
    is_r = v == r
    is_g = (v == g) & ~is_r
    num = np.where(is_r, g - b, np.where(is_g, b - r, r - g))
    hue = norm * num + np.where(is_r, 0, np.where(is_g, 2 / 6, 4 / 6))
    h = np.where(spread > 0, hue, 0) + (hue < 0)

    def backward(dh, ds, dv):
        dh = dh * (spread > 0)
        d_num = dh * norm
        d_spread = -dh * num * norm / safe_spread * (spread > 0) + np.where(v > 0, ds / safe_v, 0)
        dv = dv + d_spread - np.where(v > 0, ds * spread / safe_v ** 2, 0)
        dm = -d_spread
        dx = np.zeros(x.shape, x.dtype)
        rows = np.arange(x.shape[-1])
        dx += (rows == x.argmax(-1)[..., None]) * dv[..., None]
        dx += (rows == x.argmin(-1)[..., None]) * dm[..., None]
        # num is g - b where red is largest, b - r where green is, r - g where blue is
        on_r, on_g = is_r.astype(x.dtype), is_g.astype(x.dtype)
        on_b = 1 - on_r - on_g
        dx[..., 0] += d_num * (on_b - on_g)
        dx[..., 1] += d_num * (on_r - on_b)
        dx[..., 2] += d_num * (on_g - on_r)
        return dx * kept

    return h, s, v, backward


def hsv_to_rgb(h, s, v):
    """Keras' hsv_to_rgb; returns (..., 3) and the function mapping its gradient to (h, s, v)'s."""
    d6 = np.remainder(h, 1.0) * 6
    parts = [np.abs(d6 - 3) - 1, 2 - np.abs(d6 - 2), 2 - np.abs(d6 - 4)]
    slopes = [np.sign(d6 - 3), -np.sign(d6 - 2), -np.sign(d6 - 4)]
    d = np.stack([np.clip(p, 0, 1) for p in parts], -1)
    d_slope = np.stack([sl * (p >= 0) * (p <= 1) for p, sl in zip(parts, slopes)], -1)
    out = v[..., None] * (1 - s[..., None] + s[..., None] * d)

    def backward(grad):
        dv = (grad * (1 - s[..., None] + s[..., None] * d)).sum(-1)
        ds = (grad * v[..., None] * (d - 1)).sum(-1)
        dh = 6 * (grad * v[..., None] * s[..., None] * d_slope).sum(-1)
        return dh, ds, dv

    return out, backward


@register("RandomSaturation")
class RandomSaturation(_Augmentation):
    """Scale each image's HSV saturation by u / (1 - u + 1e-7), u drawn per image from factor's range, as Keras'
    RandomSaturation (0.5 leaves it, 0 makes gray, 1 fully saturated). As Keras 3.15 parses factor (bounds
    [-1, 1]), a number f draws u in [-f, f], so half the draws give a negative scale, clipped to gray; give a pair
    [low, high] in [0, 1] for the documented behaviour. The scaled saturation is clipped to value_range, as Keras
    does. RGB only; the identity at inference."""

    def __init__(self, factor, value_range=(0, 255), data_format: str | None = None, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (-1.0, 1.0), "RandomSaturation")
        self.value_range = _value_range(value_range, "RandomSaturation")
        self.data_format = _channels_last(data_format, "RandomSaturation")

    def build(self, input_shape):
        super().build(input_shape)
        _needs_rgb(self, input_shape)

    def draw(self, n):
        u = self.rng.uniform(*self.factor, n)
        return u / (1 - u + 1e-7)

    def augment(self, x, drawn):
        scale = np.asarray(drawn, x.dtype)[:, None, None]
        h, s, v, self.from_hsv = rgb_to_hsv(x)
        s2 = s * scale
        low, high = self.value_range
        self.inside_scale = ((s2 >= low) & (s2 <= high)) * scale
        out, self.from_rgb = hsv_to_rgb(h, np.clip(s2, low, high), v)
        return out.astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        dh, ds, dv = self.from_rgb(grad)
        return self.from_hsv(dh, ds * self.inside_scale, dv)


@register("RandomHue")
class RandomHue(_Augmentation):
    """Shift each image's hue by d, |d| = f / 2 with f drawn per image from factor's range (a number means
    [0, f]) and the sign by a coin (Keras' RandomHue: factor 1 reaches half the colour wheel either way); the
    hue wraps, the RGB result is clipped to value_range. RGB only; the identity at inference."""

    def __init__(self, factor, value_range=(0, 255), data_format: str | None = None, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (0.0, 1.0), "RandomHue")
        self.value_range = _value_range(value_range, "RandomHue")
        self.data_format = _channels_last(data_format, "RandomHue")

    def build(self, input_shape):
        super().build(input_shape)
        _needs_rgb(self, input_shape)

    def draw(self, n):
        sign = np.where(self.rng.uniform(0, 1, n) > 0.5, -1.0, 1.0)
        return sign * self.rng.uniform(*self.factor, n) * 0.5

    def augment(self, x, drawn):
        low, high = self.value_range
        delta = np.asarray(drawn, x.dtype)[:, None, None]
        h, s, v, self.from_hsv = rgb_to_hsv((x - low) / (high - low))
        h = h + delta
        h = np.where(h > 1, h - 1, h)
        h = np.where(h < 0, h + 1, h)
        out, self.from_rgb = hsv_to_rgb(h, s, v)
        self.inside = (out >= 0) & (out <= 1)
        return (np.clip(out, 0, 1) * (high - low) + low).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        return self.from_hsv(*self.from_rgb(grad * self.inside))  # the scale to 0..1 and back cancels


class _Composition(_Augmentation):
    """An augmentation made of augmentation layers (`self.parts`, by Keras' attribute names), built for this
    layer's input and drawing from its stream. `run` applies one part and keeps it in `self.applied` as it was
    after that run (a shallow copy holds the run's backward caches, so a part run twice steps back through both)."""

    def build(self, input_shape):
        super().build(input_shape)
        for part in self.parts.values():
            part.ensure_built(input_shape, self.rng)

    def draw_part(self, key, n):
        part = self.parts[key]
        part.rng = self.rng
        return part.draw(n)

    def run(self, x, key, drawn):
        x = self.parts[key].augment(x, drawn)
        self.applied.append(copy.copy(self.parts[key]))
        return x

    @staticmethod
    def run_backward(grad, applied):
        for part in reversed(applied):
            grad = part.augment_backward(grad)
        return grad


@register("RandomColorJitter")
class RandomColorJitter(_Composition):
    """Keras' RandomColorJitter: RandomBrightness, RandomContrast, RandomSaturation and RandomHue in that order,
    each only if its factor is given (the factor as that layer takes it), all with this value_range; each draws
    per image from this layer's stream. The identity at inference."""

    PARTS = (("brightness", RandomBrightness), ("contrast", RandomContrast), ("saturation", RandomSaturation),
             ("hue", RandomHue))

    def __init__(self, value_range=(0, 255), brightness_factor=None, contrast_factor=None, saturation_factor=None,
                 hue_factor=None, seed: int | None = None, data_format: str | None = None, **kw):
        super().__init__(seed, **kw)
        self.value_range = _value_range(value_range, "RandomColorJitter")
        self.data_format = _channels_last(data_format, "RandomColorJitter")
        factors = dict(zip((k for k, _ in self.PARTS), (brightness_factor, contrast_factor, saturation_factor,
                                                        hue_factor)))
        self.parts = {}
        for key, cls in self.PARTS:
            if factors[key] is not None:
                try:  # named, so the parts take no automatic names from the layers a model counts
                    self.parts[key] = cls(factors[key], value_range=value_range, name=f"{self.name}_{key}")
                except ConfigError as e:
                    raise ConfigError(f"RandomColorJitter: {key}_factor: {e}") from None

    def draw(self, n):
        return {key: self.draw_part(key, n) for key in self.parts}

    def augment(self, x, drawn):
        self.applied = []
        for key in self.parts:
            x = self.run(x, key, drawn[key])
        return x

    def augment_backward(self, grad):
        return self.run_backward(grad, self.applied)


def _policy_parts(layer, factor, value_range, interpolation, order):
    """RandAugment's and AugMix's parts as Keras builds them from one factor (a pair in [0, 1]), in `order` (their
    attribute names); named after `layer`, so they take no automatic names from the layers a model counts."""
    factor, value_range = list(factor), list(value_range)
    specs = {
        "random_shear": (RandomShear, {"x_factor": factor, "y_factor": factor, "interpolation": interpolation}),
        "random_translation": (RandomTranslation, {"height_factor": factor, "width_factor": factor,
                                                   "interpolation": interpolation}),
        "random_rotation": (RandomRotation, {"factor": factor, "interpolation": interpolation}),
        "random_brightness": (RandomBrightness, {"factor": factor, "value_range": value_range}),
        "random_color_degeneration": (RandomColorDegeneration, {"factor": factor, "value_range": value_range}),
        "random_contrast": (RandomContrast, {"factor": factor, "value_range": value_range}),
        "random_sharpness": (RandomSharpness, {"factor": factor, "value_range": value_range}),
        "random_posterization": (RandomPosterization, {"factor": max(1, int(8 * factor[1])),
                                                       "value_range": value_range}),
        "solarization": (Solarization, {"addition_factor": factor, "threshold_factor": factor,
                                        "value_range": value_range}),
        "auto_contrast": (AutoContrast, {"value_range": value_range}),
        "equalization": (Equalization, {"value_range": value_range})}
    return {key: specs[key][0](**specs[key][1], name=f"{layer.name}_{key}") for key in order}


def _count(value, what: str, layer: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{layer}: {what} must be an integer >= 0; got {value!r}")
    return value


@register("RandAugment")
class RandAugment(_Composition):
    """Keras 3.15's RandAugment: num_ops operations, each picked for the whole batch uniformly from eleven
    augmentation layers built from factor (a number f means [0, f]): RandomShear, RandomTranslation and
    RandomRotation (interpolation), RandomBrightness, RandomColorDegeneration, RandomContrast, RandomSharpness,
    RandomPosterization (max(1, int(8 f_high)) bits), Solarization, AutoContrast and Equalization (value_range).
    As in Keras, each layer draws its per-image parameters once a batch, so a layer picked twice repeats them.
    The identity at inference."""

    ORDER = ("random_shear", "random_translation", "random_rotation", "random_brightness",
             "random_color_degeneration", "random_contrast", "random_sharpness", "random_posterization",
             "solarization", "auto_contrast", "equalization")  # Keras' _AUGMENT_LAYERS: what its indices pick

    def __init__(self, value_range=(0, 255), num_ops: int = 2, factor=0.5, interpolation: str = "bilinear",
                 seed: int | None = None, data_format: str | None = None, **kw):
        super().__init__(seed, **kw)
        self.value_range = _value_range(value_range, "RandAugment")
        self.num_ops = _count(num_ops, "num_ops", "RandAugment")
        self.factor = _factor(factor, (0.0, 1.0), "RandAugment")
        self.interpolation, self.data_format = interpolation, _channels_last(data_format, "RandAugment")
        self.parts = _policy_parts(self, self.factor, self.value_range, interpolation, self.ORDER)

    def draw(self, n):
        drawn = {"layer_idxes": self.rng.integers(0, len(self.ORDER), self.num_ops)}
        drawn.update({key: self.draw_part(key, n) for key in self.ORDER})
        return drawn

    def augment(self, x, drawn):
        self.applied = []
        for index in drawn["layer_idxes"]:
            key = self.ORDER[int(index)]
            x = self.run(x, key, drawn[key])
        return x

    def augment_backward(self, grad):
        return self.run_backward(grad, self.applied)


@register("AugMix")
class AugMix(_Composition):
    """Keras 3.15's AugMix: num_chains chains, each of up to chain_depth operations (each slot picks one of the
    layers or none, uniformly, per batch; each pick draws its own per-image parameters), mixed with Dirichlet(alpha)
    weights, then w x + (1 - w) mix with w ~ Beta(alpha, alpha), clipped to value_range. The layers: RandomShear,
    RandomTranslation, RandomRotation, RandomPosterization, Solarization, AutoContrast, Equalization, and with
    all_ops RandomBrightness, RandomColorDegeneration, RandomContrast and RandomSharpness, built from factor (a
    number f means [0, f]) as in RandAugment. The identity at inference."""

    ORDER = ("random_shear", "random_translation", "random_rotation", "random_posterization", "solarization",
             "auto_contrast", "equalization", "random_brightness", "random_color_degeneration", "random_contrast",
             "random_sharpness")  # Keras' AUGMENT_LAYERS_ALL; without all_ops the first seven

    def __init__(self, value_range=(0, 255), num_chains: int = 3, chain_depth: int = 3, factor=0.3,
                 alpha: float = 1.0, all_ops: bool = True, interpolation: str = "bilinear", seed: int | None = None,
                 data_format: str | None = None, **kw):
        super().__init__(seed, **kw)
        self.value_range = _value_range(value_range, "AugMix")
        self.num_chains = _count(num_chains, "num_chains", "AugMix")
        self.chain_depth = _count(chain_depth, "chain_depth", "AugMix")
        self.factor = _factor(factor, (0.0, 1.0), "AugMix")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ConfigError(f"AugMix: alpha must be a number > 0; got {alpha!r}")
        self.alpha, self.all_ops, self.interpolation = float(alpha), bool(all_ops), interpolation
        self.data_format = _channels_last(data_format, "AugMix")
        order = self.ORDER if self.all_ops else self.ORDER[:7]
        self.parts = _policy_parts(self, self.factor, self.value_range, interpolation, order)

    def draw(self, n):
        gammas = self.rng.gamma(self.alpha, size=self.num_chains)  # Keras' Dirichlet: gammas over their sum
        drawn = {"chain_mixing_weights": gammas / gammas.sum(), "weight_sample": self.rng.beta(self.alpha, self.alpha)}
        keys, chains = list(self.parts), []
        for _ in range(self.num_chains):
            picks = self.rng.integers(0, len(keys) + 1, self.chain_depth)  # len(keys): Keras' None, no operation
            chains.append([(keys[k], self.draw_part(keys[k], n)) for k in picks if k < len(keys)])
        drawn["chain_transforms"] = chains
        return drawn

    def augment(self, x, drawn):
        kind = x.dtype.type
        self.chain_weights = [kind(w) for w in drawn["chain_mixing_weights"]]
        self.share = kind(drawn["weight_sample"])
        mixed, self.chains = np.zeros_like(x), []
        for weight, chain in zip(self.chain_weights, drawn["chain_transforms"]):
            self.applied, y = [], x
            for key, part_drawn in chain:
                y = self.run(y, key, part_drawn)
            mixed += y * weight
            self.chains.append(self.applied)
        y = self.share * x + (1 - self.share) * mixed
        low, high = self.value_range
        self.inside = (y >= low) & (y <= high)
        return np.clip(y, low, high).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        grad = grad * self.inside
        dx = grad * self.share
        for weight, applied in zip(self.chain_weights, self.chains):
            dx = dx + self.run_backward(grad * ((1 - self.share) * weight), applied)
        return dx
