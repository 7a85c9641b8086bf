"""Spatial reshaping (channels_last) in 1, 2 and 3 dimensions: ZeroPadding, Cropping, UpSampling, SpatialDropout;
and the reshaping of features: RepeatVector, Permute."""
import numpy as np

from dlcli.errors import ConfigError, ShapeError
from dlcli.engine.layer import Layer, ranked, register
from dlcli.layers.core import Dropout
from dlcli.registry import Size, Sizes

_SPATIAL = {1: "steps", 2: "height, width", 3: "depth, height, width"}


def _pairs(value, what: str, layer: str, rank: int) -> tuple[tuple[int, int], ...]:
    """Keras' forms: n -> (n, n) on every axis; one int per axis -> (i, i); one (before, after) pair per axis. For
    rank 1 a single (before, after) pair (Keras' ZeroPadding1D/Cropping1D)."""
    try:
        if isinstance(value, (int, np.integer)):
            return ((int(value),) * 2,) * rank
        items = list(value)
        if rank == 1 and len(items) == 2 and all(isinstance(v, (int, np.integer)) for v in items):
            pairs = ((int(items[0]), int(items[1])),)
        elif len(items) == rank and all(isinstance(v, (int, np.integer)) for v in items):
            pairs = tuple((int(v), int(v)) for v in items)
        else:
            pairs = tuple(tuple(int(v) for v in p) for p in items)
        if len(pairs) == rank and all(len(p) == 2 for p in pairs) and min(min(p) for p in pairs) >= 0:
            return pairs
    except (TypeError, ValueError):
        pass
    forms = {1: "an int or [before, after]", 2: "an int, [height, width] or [[top, bottom], [left, right]]",
             3: "an int, [depth, height, width] or three [before, after] pairs"}[rank]
    raise ConfigError(f"{layer}: {what} must be {forms} of non-negative ints; got {value!r}")


def _check_rank(layer, input_shape):
    if len(input_shape) != layer.rank + 1:
        raise ShapeError(f"{type(layer).__name__} '{layer.name}' expects inputs (batch, {_SPATIAL[layer.rank]}, "
                         f"channels); got (None, {', '.join(map(str, input_shape))})")


def _onnx_spatial_axes(x, rank) -> list[int]:
    """The spatial axes of an ONNX Value in either layout."""
    return list(range(2, 2 + rank)) if x.first else list(range(1, 1 + rank))


def _interior(pairs, shape):
    """The slices keeping all but `pairs` (before, after) of each spatial axis."""
    return (slice(None), *(slice(b, n - a) for (b, a), n in zip(pairs, shape[1:])), slice(None))


class _ZeroPadding(Layer):
    rank = 2

    def __init__(self, padding=1, **kw):
        super().__init__(**kw)
        self.padding = _pairs(padding, "padding", type(self).__name__, self.rank)

    def output_shape(self, input_shape):
        _check_rank(self, input_shape)
        return (*(n + b + a for n, (b, a) in zip(input_shape, self.padding)), input_shape[-1])

    def forward(self, x, training=False):
        return np.pad(x, ((0, 0), *self.padding, (0, 0)))

    def backward(self, grad):
        return grad[_interior(self.padding, grad.shape)]

    def to_onnx(self, g, x, in_shape, mask):
        pairs = [(0, 0)] * x.rank
        for axis, pair in zip(_onnx_spatial_axes(x, self.rank), self.padding):
            pairs[axis] = pair
        return g.value(g.op("Pad", [x.name, g.ints(g.pads(pairs), "pads")], self.name), x.rank, x.first)


ZeroPadding1D = ranked("ZeroPadding1D", _ZeroPadding, 1, "Zeros before and after the steps (Keras' default 1 each "
                       "side).")


@register("ZeroPadding2D")
class ZeroPadding2D(_ZeroPadding):
    def __init__(self, padding=(1, 1), **kw):
        super().__init__(padding, **kw)


@register("ZeroPadding3D")
class ZeroPadding3D(_ZeroPadding):
    rank = 3

    def __init__(self, padding=(1, 1, 1), **kw):
        super().__init__(padding, **kw)


class _Cropping(Layer):
    rank = 2

    def __init__(self, cropping=0, **kw):
        super().__init__(**kw)
        self.cropping = _pairs(cropping, "cropping", type(self).__name__, self.rank)

    def output_shape(self, input_shape):
        _check_rank(self, input_shape)
        kept = [n - b - a for n, (b, a) in zip(input_shape, self.cropping)]
        if min(kept) < 1:
            raise ShapeError(f"{type(self).__name__} '{self.name}': cropping {self.cropping} removes everything from "
                             f"{'x'.join(map(str, input_shape[:-1]))} inputs")
        return (*kept, input_shape[-1])

    def build(self, input_shape):
        self.output_shape(input_shape)

    def forward(self, x, training=False):
        self.in_shape = x.shape
        return x[_interior(self.cropping, x.shape)]

    def backward(self, grad):
        dx = np.zeros(self.in_shape, grad.dtype)
        dx[_interior(self.cropping, self.in_shape)] = grad
        return dx

    def to_onnx(self, g, x, in_shape, mask):
        starts = [b for b, _ in self.cropping]
        ends = [n - a for n, (_, a) in zip(in_shape, self.cropping)]
        axes = _onnx_spatial_axes(x, self.rank)
        return g.value(g.op("Slice", [x.name, g.ints(starts), g.ints(ends), g.ints(axes)], self.name), x.rank,
                       x.first)


@register("Cropping1D")
class Cropping1D(_Cropping):
    rank = 1

    def __init__(self, cropping=(1, 1), **kw):
        super().__init__(cropping, **kw)


@register("Cropping2D")
class Cropping2D(_Cropping):
    def __init__(self, cropping=((0, 0), (0, 0)), **kw):
        super().__init__(cropping, **kw)


@register("Cropping3D")
class Cropping3D(_Cropping):
    rank = 3

    def __init__(self, cropping=((1, 1), (1, 1), (1, 1)), **kw):
        super().__init__(cropping, **kw)


class _UpSampling(Layer):
    """Repeat every spatial position `size` times along each axis (Keras' nearest interpolation)."""

    rank = 2

    def __init__(self, size: Sizes = 2, **kw):
        super().__init__(**kw)
        self.size = (int(size),) * self.rank if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        if len(self.size) != self.rank:
            raise ConfigError(f"{type(self).__name__}: size must be an int or {self.rank} ints; got {size!r}")

    def output_shape(self, input_shape):
        _check_rank(self, input_shape)
        return (*(n * s for n, s in zip(input_shape, self.size)), input_shape[-1])

    def forward(self, x, training=False):
        n, *spatial, c = x.shape
        # one broadcast copy: a new axis of length size after each spatial axis
        expanded = x.reshape(n, *[d for s in spatial for d in (s, 1)], c)
        target = (n, *[d for s, k in zip(spatial, self.size) for d in (s, k)], c)
        return np.broadcast_to(expanded, target).reshape(n, *(s * k for s, k in zip(spatial, self.size)), c)

    def backward(self, grad):
        n, *spatial, c = grad.shape
        split = [d for s, k in zip(spatial, self.size) for d in (s // k, k)]
        return grad.reshape(n, *split, c).sum(tuple(range(2, 2 * self.rank + 1, 2)))

    def to_onnx(self, g, x, in_shape, mask):
        x = g.first(x)
        scales = g.const(np.array([1, 1, *self.size], np.float32), "scales", key=("scales", self.size))
        # nearest with floor on asymmetric coordinates: output position i reads input i // size (dlcli's repeat)
        y = g.op("Resize", [x.name, "", scales], self.name, mode="nearest",
                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        return g.value(y, x.rank, True)


@register("UpSampling1D")
class UpSampling1D(_UpSampling):
    rank = 1

    def __init__(self, size: Size = 2, **kw):
        super().__init__(size, **kw)


@register("UpSampling2D")
class UpSampling2D(_UpSampling):
    def __init__(self, size: Sizes = (2, 2), interpolation: str = "nearest", **kw):
        super().__init__(size, **kw)
        if interpolation != "nearest":
            raise ConfigError(f"UpSampling2D: only interpolation 'nearest' is implemented; got {interpolation!r}")
        self.interpolation = interpolation


@register("UpSampling3D")
class UpSampling3D(_UpSampling):
    rank = 3

    def __init__(self, size: Sizes = (2, 2, 2), **kw):
        super().__init__(size, **kw)


class _SpatialDropout(Dropout):
    """Dropout of whole feature maps: one keep/drop draw per (sample, channel), scaled by 1 / (1 - rate) as Keras."""

    rank = 2

    def __init__(self, rate: float, **kw):
        super().__init__(rate, **kw)
        self.noise_shape = [None, *(1,) * self.rank, None]

    def output_shape(self, input_shape):
        _check_rank(self, input_shape)
        return input_shape


SpatialDropout1D = ranked("SpatialDropout1D", _SpatialDropout, 1)
SpatialDropout2D = ranked("SpatialDropout2D", _SpatialDropout, 2)
SpatialDropout3D = ranked("SpatialDropout3D", _SpatialDropout, 3)


@register("RepeatVector")
class RepeatVector(Layer):
    """(batch, features) -> (batch, n, features), as Keras."""

    def __init__(self, n: Size, **kw):
        super().__init__(**kw)
        self.n = int(n)

    def output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ShapeError(f"RepeatVector '{self.name}' expects (batch, features); got (None, "
                             f"{', '.join(map(str, input_shape))})")
        return (self.n, *input_shape)

    def forward(self, x, training=False):
        return np.repeat(x[:, None], self.n, axis=1)

    def backward(self, grad):
        return grad.sum(1)

    def to_onnx(self, g, x, in_shape, mask):
        y = g.op("Tile", [g.unsqueeze(g.last(x).name, [1]), g.ints([1, self.n, 1])], self.name)
        return g.value(y, 3)


@register("Permute")
class Permute(Layer):
    """Reorder the non-batch axes: `dims` is a permutation of 1..rank (Keras counts from 1, after the batch)."""

    def __init__(self, dims: list[int], **kw):
        super().__init__(**kw)
        self.dims = [int(d) for d in dims]
        if sorted(self.dims) != list(range(1, len(self.dims) + 1)):
            raise ConfigError(f"Permute: dims must be a permutation of 1..{len(self.dims)} (as in Keras); got {dims}")

    def output_shape(self, input_shape):
        if len(input_shape) != len(self.dims):
            raise ShapeError(f"Permute '{self.name}': dims {self.dims} need inputs with {len(self.dims)} axes after "
                             f"the batch; got (None, {', '.join(map(str, input_shape))})")
        return tuple(input_shape[d - 1] for d in self.dims)

    def forward(self, x, training=False):
        return x.transpose(0, *self.dims)

    def backward(self, grad):
        return grad.transpose(0, *(int(i) + 1 for i in np.argsort(self.dims)))

    def to_onnx(self, g, x, in_shape, mask):
        return g.value(g.op("Transpose", [g.last(x).name], self.name, perm=[0, *self.dims]), x.rank)
