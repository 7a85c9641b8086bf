"""Pooling, channels_last: Max/AveragePooling1D/2D/3D, the global and the adaptive poolings (Keras' arguments and
defaults).

Max pooling keeps the in-window argmax offset of every output (one byte each), not the windows; both directions
loop over the pool's offsets only.
"""
import numpy as np

from dlcli import kernels
from dlcli.engine import activations
from dlcli.engine.layer import Layer, ranked
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
    splits_batch = True  # its kernels run on lanes (engine/lanes.py)
    post_activation = None  # the previous layer's activation, applied here when the graph moved it (graph.py)
    window_maximum = True  # relu(max z) == max(relu z): the graph may move the activation before it here
    pooled_before = False  # the previous layer pooled its own output in this pass (graph.py)
    relu_y = None  # the output, where max_pool applied a moved plain ReLU itself in training: its gradient's mask

    def forward(self, x, training=False):
        if self.pooled_before:
            return x
        # -inf padding: a padded position never wins, as in TF's 'same' max pooling
        xp = self._prepare(x, -np.inf)
        self.relu_y = None
        if not training:  # inference: the maxima only; their positions if a backward pass asks (gradient checks)
            self.arg, self.xp = None, xp
            y = cm.window_max(xp, self.pool_size, self.out_sizes, self.strides)
        else:
            # a moved plain ReLU inside the pooling's pass (on the lanes) rather than a pass of its own after it
            relu = isinstance(self.post_activation, activations.ReLU) and self.post_activation.plain
            y, self.arg = cm.max_pool(xp, self.pool_size, self.out_sizes, self.strides, relu)
            self.xp = None
            if relu:
                self.relu_y = y
                return y
        return y if self.post_activation is None else self.post_activation.forward_(y)

    def backward(self, grad):
        if self.pooled_before:  # the conv before it takes this gradient to its own weights and input
            return grad
        if self.post_activation is not None and self.relu_y is None:
            grad = self.post_activation.backward(grad)
        if self.arg is None:
            _, self.arg = cm.max_pool(self.xp, self.pool_size, self.out_sizes, self.strides)
        dxp = cm.max_pool_backward(grad, self.arg, self.xp_shape, self.pool_size, self.out_sizes, self.strides,
                                   self.relu_y)
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


MaxPooling1D = ranked("MaxPooling1D", _MaxPooling, 1, "On (batch, steps, channels).")
MaxPooling2D = ranked("MaxPooling2D", _MaxPooling, 2)
MaxPooling3D = ranked("MaxPooling3D", _MaxPooling, 3)
AveragePooling1D = ranked("AveragePooling1D", _AveragePooling, 1)
AveragePooling2D = ranked("AveragePooling2D", _AveragePooling, 2)
AveragePooling3D = ranked("AveragePooling3D", _AveragePooling, 3)


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
        compiled = self._compiled(x) if x.flags.c_contiguous and x.size else None  # another layout sums otherwise
        if compiled is not None:
            y = np.empty((len(x), x.shape[-1]), x.dtype)
            compiled.global_mean(self._steps(x), y)
            return self._shape_out(y)
        return self._shape_out(x.mean(axes))

    def backward(self, grad):
        g = grad.reshape(self.in_shape[0], *(1,) * self.rank, self.in_shape[-1])
        if self.step_weights is not None:
            return g * self.step_weights
        compiled = self._compiled(grad) if np.prod(self.in_shape) else None
        if compiled is not None:
            dx = np.empty(self.in_shape, grad.dtype)
            compiled.global_mean_backward(np.ascontiguousarray(grad).reshape(len(dx), -1), self._steps(dx))
            return dx
        size = np.asarray(np.prod(self.in_shape[1:-1]), grad.dtype)
        return np.broadcast_to(g / size, self.in_shape).copy()

    @staticmethod
    def _compiled(a):
        """kernels/pooling's global mean passes, or None for the twins: float32 or float64 of two channels or more
        (with one, NumPy's mean sums the steps pairwise, which the kernel does not)."""
        if a.shape[-1] < 2 or a.dtype not in (np.float32, np.float64):
            return None
        return kernels.compiled("pooling")

    @staticmethod
    def _steps(a):
        """a as (batch, steps, channels)."""
        return a.reshape(len(a), -1, a.shape[-1])

    def to_onnx(self, g, x, in_shape, mask):
        if mask is None or self.rank != 1:
            return self._reduce_onnx(g, x, "ReduceMean")
        x = g.last(x)  # the mean over unmasked steps (at least one step's weight), as forward
        w = g.unsqueeze(g.cast(mask, "float32"), [2])
        total = g.reduce("ReduceSum", g.op("Mul", [x.name, w]), [1], keepdims=0)
        count = g.op("Max", [g.reduce("ReduceSum", w, [1], keepdims=0), g.scalar(1.0)])
        y = g.op("Div", [total, count], self.name)
        return g.value(y if not self.keepdims else g.unsqueeze(y, [1]), 3 if self.keepdims else 2)


GlobalMaxPooling1D = ranked("GlobalMaxPooling1D", _GlobalMaxPooling, 1)
GlobalMaxPooling2D = ranked("GlobalMaxPooling2D", _GlobalMaxPooling, 2)
GlobalMaxPooling3D = ranked("GlobalMaxPooling3D", _GlobalMaxPooling, 3)
GlobalAveragePooling1D = ranked("GlobalAveragePooling1D", _GlobalAveragePooling, 1,
                                "Honours an incoming mask (average over the real steps), as Keras.",
                                supports_masking=True)
GlobalAveragePooling2D = ranked("GlobalAveragePooling2D", _GlobalAveragePooling, 2)
GlobalAveragePooling3D = ranked("GlobalAveragePooling3D", _GlobalAveragePooling, 3)


def adaptive_windows(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's adaptive windows along one axis, which Keras 3 uses: output i covers [floor(i * size / out),
    ceil((i + 1) * size / out)). Returns each window's indices padded with its last one to the widest window's
    length (out, widest), and each window's length."""
    i = np.arange(out)
    start, end = i * size // out, -(-(i + 1) * size // out)
    widest = int((end - start).max())
    index = np.minimum(start[:, None] + np.arange(widest), end[:, None] - 1)
    return index, end - start


class _AdaptivePooling(Layer):
    """Pools to a fixed `output_size` whatever the input's spatial sizes (channels last): adjacent windows overlap
    by one element where a size does not divide evenly, as in Keras 3 (PyTorch's rule)."""

    rank = 2

    def __init__(self, output_size: Sizes, data_format: str | None = None, **kw):
        super().__init__(**kw)
        self.output_size = cm.as_tuple(output_size, self.rank, "output_size", type(self).__name__)
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"{type(self).__name__}: dlcli is channels_last only; got data_format {data_format!r}")
        self.data_format = data_format

    def build(self, input_shape):
        cm.spatial_geometry(self, input_shape, self.rank, (1,) * self.rank, (1,) * self.rank, "valid")

    def output_shape(self, input_shape):
        self.build(input_shape)
        return (*self.output_size, input_shape[-1])

    def _windows(self, sizes):
        return [adaptive_windows(n, m) for n, m in zip(sizes, self.output_size)]


class _AdaptiveAveragePooling(_AdaptivePooling):
    """Each axis in turn through an (out, in) averaging matrix: the mean over a box of windows is the mean of
    means, and the backward pass is the transposed matrices."""

    def _matrices(self, sizes, dtype):
        matrices = []
        for (index, length), n in zip(self._windows(sizes), sizes):
            a = np.zeros((len(index), n), dtype)
            np.put_along_axis(a, index, 1, axis=1)  # the padding repeats an index: still 1
            matrices.append(a / length[:, None].astype(dtype))
        return matrices

    @staticmethod
    def _along(x, matrices):
        for axis, a in enumerate(matrices, start=1):
            x = np.moveaxis(np.moveaxis(x, axis, -1) @ a.T, -1, axis)
        return x

    def forward(self, x, training=False):
        self.matrices = self._matrices(x.shape[1:-1], x.dtype)
        return np.ascontiguousarray(self._along(x, self.matrices))

    def backward(self, grad):
        return np.ascontiguousarray(self._along(grad, [a.T for a in self.matrices]))

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        y, letters = x.name, "bcdefg"[:self.rank + 2]
        for axis, a in enumerate(self._matrices(in_shape[:-1], np.float32), start=1):
            out = letters[:axis] + "z" + letters[axis + 1:]
            y = g.op("Einsum", [y, g.weight(self, a, f"average{axis}")], equation=f"{letters},z{letters[axis]}->{out}")
        return g.value(g.op("Identity", [y], self.name), x.rank)


class _AdaptiveMaxPooling(_AdaptivePooling):
    """The maximum over each box of windows, gathered at once through a flat index table (box positions padded
    with a repeated index, which never changes a maximum); the gradient goes to the first maximum of each box."""

    def _table(self, sizes):
        """(out positions, widest box) flat spatial indices of every output's box."""
        flat, strides = 0, np.cumprod((*sizes[1:], 1)[::-1])[::-1]
        windows = self._windows(sizes)
        for axis, ((index, _), stride) in enumerate(zip(windows, strides)):
            shape = [1] * (2 * self.rank)
            shape[axis], shape[self.rank + axis] = index.shape
            flat = flat + (index * stride).reshape(shape)
        out = int(np.prod(self.output_size))
        return np.asarray(flat).reshape(out, -1)

    def forward(self, x, training=False):
        n, c = x.shape[0], x.shape[-1]
        self.x_shape, self.table = x.shape, self._table(x.shape[1:-1])
        boxes = x.reshape(n, -1, c)[:, self.table]  # (n, out, box, c)
        self.arg = boxes.argmax(2)
        return np.take_along_axis(boxes, self.arg[:, :, None], 2).reshape(n, *self.output_size, c)

    def backward(self, grad):
        n, c = self.x_shape[0], self.x_shape[-1]
        spatial = int(np.prod(self.x_shape[1:-1]))
        source = self.table[np.arange(self.table.shape[0])[:, None], self.arg]  # (n, out, c) spatial positions
        flat = (np.arange(n)[:, None, None] * spatial + source) * c + np.arange(c)
        dx = np.bincount(flat.reshape(-1), grad.reshape(-1), minlength=n * spatial * c)
        return dx.astype(grad.dtype, copy=False).reshape(self.x_shape)

    def to_onnx(self, g, x, in_shape, mask):
        y = g.last(x).name
        for axis, (index, _) in enumerate(self._windows(in_shape[:-1]), start=1):
            gathered = g.op("Gather", [y, g.const(index.astype(np.int64), f"{self.name}_windows{axis}")], axis=axis)
            y = g.reduce("ReduceMax", gathered, [axis + 1], keepdims=0)
        return g.value(g.op("Identity", [y], self.name), self.rank + 2)


AdaptiveAveragePooling1D = ranked("AdaptiveAveragePooling1D", _AdaptiveAveragePooling, 1)
AdaptiveAveragePooling2D = ranked("AdaptiveAveragePooling2D", _AdaptiveAveragePooling, 2)
AdaptiveAveragePooling3D = ranked("AdaptiveAveragePooling3D", _AdaptiveAveragePooling, 3)
AdaptiveMaxPooling1D = ranked("AdaptiveMaxPooling1D", _AdaptiveMaxPooling, 1)
AdaptiveMaxPooling2D = ranked("AdaptiveMaxPooling2D", _AdaptiveMaxPooling, 2)
AdaptiveMaxPooling3D = ranked("AdaptiveMaxPooling3D", _AdaptiveMaxPooling, 3)
