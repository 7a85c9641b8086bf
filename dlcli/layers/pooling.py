"""Pooling, channels_last: Max/AveragePooling1D/2D/3D and the global poolings (Keras' arguments and defaults).

Max pooling keeps the in-window argmax offset of every output (one byte each), not the windows; both directions
loop over the pool's offsets only.
"""
import numpy as np

from dlcli.engine.layer import Layer, register
from dlcli.errors import ConfigError
from dlcli.layers import conv_math as cm
from dlcli.registry import Sizes


class _Pooling(Layer):
    rank = 2

    def __init__(self, pool_size: Sizes = 2, strides: Sizes = None, padding: str = "valid", **kw):
        super().__init__(**kw)
        kind = type(self).__name__
        self.pool_size = cm.as_tuple(pool_size, self.rank, "pool_size", kind)
        # Keras: strides default to pool_size (non-overlapping windows)
        self.strides = self.pool_size if strides is None else cm.as_tuple(strides, self.rank, "strides", kind)
        self.padding = str(padding).lower()
        if self.padding not in cm.PADDINGS:
            raise ConfigError(f"{kind}: padding must be one of {', '.join(cm.PADDINGS)}; got {padding!r}")

    def _geometry(self, input_shape):
        return cm.spatial_geometry(self, input_shape, self.rank, self.pool_size, self.strides, self.padding)

    def build(self, input_shape):
        self._geometry(input_shape)

    def output_shape(self, input_shape):
        return (*self._geometry(input_shape)[0], input_shape[-1])

    def _prepare(self, x, fill):
        self.out_sizes, self.pads = cm.geometry(x.shape[1:-1], self.pool_size, self.strides, self.padding,
                                                (1,) * self.rank)
        xp = cm.pad(x, self.pads, fill)
        self.xp_shape = xp.shape
        return xp

    def _pool_onnx(self, g, x, in_shape, op_type, **attrs):
        x = g.first(x)
        _, pads = cm.geometry(in_shape[:-1], self.pool_size, self.strides, self.padding, (1,) * self.rank)
        y = g.op(op_type, [x.name], self.name, kernel_shape=list(self.pool_size), strides=list(self.strides),
                 pads=g.pads(pads), **attrs)
        return g.value(y, x.rank, True)


class _MaxPooling(_Pooling):
    post_activation = None  # the previous layer's activation, applied here when the graph moved it (graph.py)

    def forward(self, x, training=False):
        # -inf padding: a padded position never wins, as in TF's 'same' max pooling
        xp = self._prepare(x, -np.inf)
        if not training:  # inference: the maxima only; their positions if a backward pass asks (gradient checks)
            self.arg, self.xp = None, xp
            y = cm.window_max(xp, self.pool_size, self.out_sizes, self.strides)
        else:
            y, self.arg = cm.max_pool(xp, self.pool_size, self.out_sizes, self.strides)
            self.xp = None
        return y if self.post_activation is None else self.post_activation.forward_(y)

    def backward(self, grad):
        if self.post_activation is not None:
            grad = self.post_activation.backward(grad)
        if self.arg is None:
            _, self.arg = cm.max_pool(self.xp, self.pool_size, self.out_sizes, self.strides)
        dxp = cm.max_pool_backward(grad, self.arg, self.xp_shape, self.pool_size, self.out_sizes, self.strides)
        return cm.unpad(dxp, self.pads)

    def to_onnx(self, g, x, in_shape, mask):
        return self._pool_onnx(g, x, in_shape, "MaxPool")  # MaxPool never picks a pad


class _AveragePooling(_Pooling):
    def forward(self, x, training=False):
        xp = self._prepare(x, 0.0)
        total = cm.window_sum(xp, self.pool_size, self.out_sizes, self.strides)
        # 'same' averages over the real (unpadded) inputs of each window only, as TF/Keras do
        ones = cm.pad(np.ones((1, *x.shape[1:-1], 1), x.dtype), self.pads)
        self.count = cm.window_sum(ones, self.pool_size, self.out_sizes, self.strides)
        return total / self.count

    def backward(self, grad):
        dxp = cm.window_spread(grad / self.count, self.xp_shape, self.pool_size, self.out_sizes, self.strides)
        return cm.unpad(dxp, self.pads)

    def to_onnx(self, g, x, in_shape, mask):
        # count_include_pad=0 averages the real inputs only, as TF
        return self._pool_onnx(g, x, in_shape, "AveragePool", count_include_pad=0)


@register("MaxPooling1D")
class MaxPooling1D(_MaxPooling):
    """On (batch, steps, channels)."""

    rank = 1


@register("MaxPooling2D")
class MaxPooling2D(_MaxPooling):
    rank = 2


@register("MaxPooling3D")
class MaxPooling3D(_MaxPooling):
    rank = 3


@register("AveragePooling1D")
class AveragePooling1D(_AveragePooling):
    rank = 1


@register("AveragePooling2D")
class AveragePooling2D(_AveragePooling):
    rank = 2


@register("AveragePooling3D")
class AveragePooling3D(_AveragePooling):
    rank = 3


class _GlobalPooling(Layer):
    """Reduce every spatial axis; `keepdims` keeps them with size 1 (Keras 3)."""

    rank = 2

    def __init__(self, keepdims: bool = False, **kw):
        super().__init__(**kw)
        self.keepdims = bool(keepdims)

    def output_shape(self, input_shape):
        cm.spatial_geometry(self, input_shape, self.rank, (1,) * self.rank, (1,) * self.rank, "valid")
        return (*(1,) * self.rank, input_shape[-1]) if self.keepdims else (input_shape[-1],)

    def build(self, input_shape):
        self.output_shape(input_shape)

    def compute_mask(self, x, mask):
        return None  # the time axis is gone

    def _shape_out(self, y):
        return y.reshape(y.shape[0], *(1,) * self.rank, y.shape[-1]) if self.keepdims else y

    def onnx_mask(self, g, x, mask):
        return self.compute_mask(x, mask)

    def _reduce_onnx(self, g, x, op_type):
        axes = range(2, x.rank) if x.first else range(1, x.rank - 1)
        y = g.reduce(op_type, x.name, axes, keepdims=int(self.keepdims), hint=self.name)
        return g.value(y, x.rank, x.first) if self.keepdims else g.value(y, 2)


class _GlobalMaxPooling(_GlobalPooling):
    def forward(self, x, training=False):
        self.in_shape = x.shape
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        self.arg = flat.argmax(1)[:, None, :]  # the first maximum gets the gradient
        return self._shape_out(np.take_along_axis(flat, self.arg, 1)[:, 0])

    def backward(self, grad):
        n, c = self.in_shape[0], self.in_shape[-1]
        dx = np.zeros((n, int(np.prod(self.in_shape[1:-1])), c), grad.dtype)
        np.put_along_axis(dx, self.arg, grad.reshape(n, 1, c), 1)
        return dx.reshape(self.in_shape)

    def to_onnx(self, g, x, in_shape, mask):
        return self._reduce_onnx(g, x, "ReduceMax")


class _GlobalAveragePooling(_GlobalPooling):
    def forward(self, x, training=False):
        self.in_shape = x.shape
        axes = tuple(range(1, self.rank + 1))
        if self.input_mask is not None and self.rank == 1:
            # Keras averages over the unmasked steps only
            self.step_weights = self.input_mask.astype(x.dtype)[:, :, None]
            self.step_weights = self.step_weights / np.maximum(self.step_weights.sum(1, keepdims=True), 1)
            return self._shape_out((x * self.step_weights).sum(1))
        self.step_weights = None
        return self._shape_out(x.mean(axes))

    def backward(self, grad):
        g = grad.reshape(self.in_shape[0], *(1,) * self.rank, self.in_shape[-1])
        if self.step_weights is not None:
            return g * self.step_weights
        size = np.asarray(np.prod(self.in_shape[1:-1]), grad.dtype)
        return np.broadcast_to(g / size, self.in_shape).copy()

    def to_onnx(self, g, x, in_shape, mask):
        if mask is None or self.rank != 1:
            return self._reduce_onnx(g, x, "ReduceMean")
        x = g.last(x)  # the mean over unmasked steps (at least one step's weight), as forward
        w = g.unsqueeze(g.cast(mask, "float32"), [2])
        total = g.reduce("ReduceSum", g.op("Mul", [x.name, w]), [1], keepdims=0)
        count = g.op("Max", [g.reduce("ReduceSum", w, [1], keepdims=0), g.scalar(1.0)])
        y = g.op("Div", [total, count], self.name)
        return g.value(y if not self.keepdims else g.unsqueeze(y, [1]), 3 if self.keepdims else 2)


@register("GlobalMaxPooling1D")
class GlobalMaxPooling1D(_GlobalMaxPooling):
    rank = 1


@register("GlobalMaxPooling2D")
class GlobalMaxPooling2D(_GlobalMaxPooling):
    rank = 2


@register("GlobalMaxPooling3D")
class GlobalMaxPooling3D(_GlobalMaxPooling):
    rank = 3


@register("GlobalAveragePooling1D")
class GlobalAveragePooling1D(_GlobalAveragePooling):
    """Honours an incoming mask (average over the real steps), as Keras."""

    rank = 1
    supports_masking = True


@register("GlobalAveragePooling2D")
class GlobalAveragePooling2D(_GlobalAveragePooling):
    rank = 2


@register("GlobalAveragePooling3D")
class GlobalAveragePooling3D(_GlobalAveragePooling):
    rank = 3
