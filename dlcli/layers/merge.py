"""Merge layers: Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate, Dot (Keras' merging layers).

Each takes a list of tensors. Element-wise merges broadcast as Keras does: a lower-rank input gains size-1 axes
right after the batch axis (so trailing axes line up), and a size-1 axis stretches to the other input's size.
Shapes are checked at build time; a mismatch names the layer and both shapes.
"""
import functools

import numpy as np

from dlcli.engine.layer import GradientSum, Layer, format_shape, register
from dlcli.errors import ShapeError


def _as_list(layer, input_shape) -> list[tuple]:
    if not isinstance(input_shape, list):
        raise ShapeError(f"{type(layer).__name__} layer '{layer.name}' merges a list of inputs; it was called on "
                         f"one tensor of shape {format_shape(input_shape)} (give inputs: [a, b])")
    if not input_shape:
        raise ShapeError(f"{type(layer).__name__} layer '{layer.name}' needs at least one input")
    return [tuple(s) for s in input_shape]


def _unbroadcast(grad, shape) -> np.ndarray:
    """Sum `grad` (batch, *out) back to an input of per-sample `shape` (Keras' broadcast, aligned on the right)."""
    extra = grad.ndim - 1 - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(1, 1 + extra)))
    axes = tuple(i + 1 for i, d in enumerate(shape) if d == 1 and grad.shape[i + 1] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def _and_masks(masks, both=np.logical_and):
    """Keras' merge mask: a step is kept only where every input that carries a mask keeps it. `both` ands two
    masks: NumPy's, or an ONNX And node (_onnx_and)."""
    if not isinstance(masks, list):
        return masks
    present = [m for m in masks if m is not None]
    return functools.reduce(both, present) if present else None


def _onnx_and(g):
    return lambda a, b: g.op("And", [a, b])


def _onnx_aligned(g, xs: list) -> list:
    """ONNX Values in one layout; a lower-rank input gains size-1 axes right after the batch axis (_aligned)."""
    if len({v.rank for v in xs}) == 1 and len({v.first for v in xs}) == 1:
        return xs
    xs = [g.last(v) for v in xs]
    rank = max(v.rank for v in xs)
    return [v if v.rank == rank else g.value(g.unsqueeze(v.name, list(range(1, 1 + rank - v.rank))), rank)
            for v in xs]


class _Merge(Layer):
    """Element-wise merge of inputs broadcast to one shape; subclasses give the op and its partial derivatives."""

    supports_masking = True

    def __init__(self, **kw):  # defined so the base records the (name, trainable ...) config for get_config
        super().__init__(**kw)

    def build(self, input_shape):
        self.output_shape(input_shape)

    def output_shape(self, input_shape):
        shapes = _as_list(self, input_shape)
        out = shapes[0]
        for s in shapes[1:]:
            out = self._broadcast(out, s, shapes)
        return out

    def _broadcast(self, a, b, shapes):
        """Keras' _compute_elemwise_op_output_shape: right-aligned; equal sizes or one of them 1."""
        long, short = (a, b) if len(a) >= len(b) else (b, a)
        out = list(long[:len(long) - len(short)])
        for i, j in zip(long[len(long) - len(short):], short):
            if i != j and 1 not in (i, j):
                raise ShapeError(f"{type(self).__name__} layer '{self.name}' cannot merge inputs of shapes "
                                 f"{', '.join(format_shape(s) for s in shapes)}: sizes {i} and {j} differ (only equal "
                                 f"sizes or size 1 broadcast, aligned on the last axis)")
            out.append(j if i == 1 else i)
        return tuple(out)

    def _aligned(self, xs):
        rank = max(x.ndim for x in xs)
        return [x.reshape((x.shape[0],) + (1,) * (rank - x.ndim) + x.shape[1:]) for x in xs]

    def forward(self, xs, training=False):
        self.shapes = [x.shape[1:] for x in xs]
        self.xs = self._aligned(xs)
        return self._merge(self.xs)

    def backward(self, grad):
        return [_unbroadcast(g, s) for g, s in zip(self._partials(grad), self.shapes)]

    def compute_mask(self, x, mask):
        return _and_masks(mask)

    onnx_op = None  # the ONNX op of two inputs, folded left to right as _merge does

    def to_onnx(self, g, xs, in_shape, mask):
        xs = _onnx_aligned(g, xs)
        y = xs[0].name
        for v in xs[1:]:
            y = g.op(self.onnx_op, [y, v.name])
        y = self._onnx_folded(g, y, len(xs))
        if len(xs) == 1:
            y = g.op("Identity", [y])
        return g.value(y, xs[0].rank, xs[0].first)

    def _onnx_folded(self, g, y, count):
        return y

    def onnx_mask(self, g, x, mask):
        return _and_masks(mask, _onnx_and(g))


@register("Add")
class Add(_Merge):
    """Sum of the inputs."""

    onnx_op = "Add"
    post_activation = None  # the ReLU layer after it, applied here in place when the graph moved it (graph.py)
    summed_by = None  # in training, the input whose layer (a BatchNormalization) made the sum already (graph.py)

    def forward(self, xs, training=False):
        if self.summed_by is not None:  # that layer's output is this one's, its post_activation applied
            self.shapes, self.xs = [x.shape[1:] for x in xs], xs
            return xs[self.summed_by]
        out = super().forward(xs, training)
        return out if self.post_activation is None else self.post_activation.forward_(out)

    def backward(self, grad):
        if isinstance(grad, GradientSum):  # reads_gradient_sum: its ReLU adds the two as it masks them
            return super().backward(self.post_activation.backward_sum(grad.a, grad.b))
        return super().backward(grad if self.post_activation is None else self.post_activation.backward(grad))

    def reads_gradient_sum(self) -> bool:
        return getattr(self.post_activation, "backward_sum", None) is not None

    def _merge(self, xs):
        out = xs[0] + xs[1] if len(xs) > 1 else xs[0].copy()
        for x in xs[2:]:
            out = out + x
        return out

    def _partials(self, grad):
        return [grad] * len(self.xs)


@register("Subtract")
class Subtract(_Merge):
    """inputs[0] - inputs[1]; exactly two inputs (as Keras)."""

    onnx_op = "Sub"

    def output_shape(self, input_shape):
        shapes = _as_list(self, input_shape)
        if len(shapes) != 2:
            raise ShapeError(f"Subtract layer '{self.name}' takes exactly 2 inputs; got {len(shapes)}")
        return super().output_shape(input_shape)

    def _merge(self, xs):
        return xs[0] - xs[1]

    def _partials(self, grad):
        return [grad, -grad]


@register("Multiply")
class Multiply(_Merge):
    """Element-wise product of the inputs."""

    onnx_op = "Mul"

    def _merge(self, xs):
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out if len(xs) > 1 else out.copy()

    def _partials(self, grad):
        # the product of the *other* inputs, not out / x: exact where an input is zero
        partials = []
        for i in range(len(self.xs)):
            g = grad
            for j, x in enumerate(self.xs):
                if j != i:
                    g = g * x
            partials.append(g)
        return partials


@register("Average")
class Average(_Merge):
    """Mean of the inputs."""

    onnx_op = "Add"

    def _merge(self, xs):
        return Add._merge(self, xs) / xs[0].dtype.type(len(xs))

    def _partials(self, grad):
        return [grad / grad.dtype.type(len(self.xs))] * len(self.xs)

    def _onnx_folded(self, g, y, count):
        return g.op("Div", [y, g.scalar(count)])


class _Extremum(_Merge):
    """Maximum / Minimum: the gradient goes to the first input holding the extreme value (TensorFlow's rule for
    ties when Keras folds `maximum` over the inputs left to right)."""

    def _merge(self, xs):
        stacked = np.stack(np.broadcast_arrays(*xs))
        self.winner = self._arg(stacked, axis=0)
        return np.take_along_axis(stacked, self.winner[None], 0)[0]

    def _partials(self, grad):
        return [np.where(self.winner == i, grad, grad.dtype.type(0)) for i in range(len(self.xs))]

    def to_onnx(self, g, xs, in_shape, mask):
        xs = _onnx_aligned(g, xs)
        return g.value(g.op(self.onnx_op, [v.name for v in xs], self.name), xs[0].rank, xs[0].first)


@register("Maximum")
class Maximum(_Extremum):
    """Element-wise maximum of the inputs."""

    onnx_op = "Max"

    _arg = staticmethod(np.argmax)


@register("Minimum")
class Minimum(_Extremum):
    """Element-wise minimum of the inputs."""

    onnx_op = "Min"

    _arg = staticmethod(np.argmin)


@register("Concatenate")
class Concatenate(Layer):
    """Join inputs along `axis` (counted with the batch axis, as Keras: -1 is the last, 1 the first per-sample axis);
    every other axis must match."""

    supports_masking = True

    def __init__(self, axis: int = -1, **kw):
        super().__init__(**kw)
        self.axis = int(axis)

    def build(self, input_shape):
        self.output_shape(input_shape)

    def _sample_axis(self, rank: int) -> int:
        axis = self.axis + rank + 1 if self.axis < 0 else self.axis
        if not 1 <= axis <= rank:
            raise ShapeError(f"Concatenate layer '{self.name}': axis={self.axis} is not a per-sample axis of inputs "
                             f"with {rank + 1} axes (the batch axis 0 cannot be joined)")
        return axis - 1

    def output_shape(self, input_shape):
        shapes = _as_list(self, input_shape)
        ranks = {len(s) for s in shapes}
        listed = ", ".join(format_shape(s) for s in shapes)
        if len(ranks) != 1:
            raise ShapeError(f"Concatenate layer '{self.name}' needs inputs of one rank; got shapes {listed}")
        a = self._sample_axis(len(shapes[0]))
        rest = {s[:a] + s[a + 1:] for s in shapes}
        if len(rest) != 1:
            raise ShapeError(f"Concatenate layer '{self.name}' needs inputs whose shapes match except on axis "
                             f"{self.axis}; got shapes {listed}")
        return shapes[0][:a] + (sum(s[a] for s in shapes),) + shapes[0][a + 1:]

    def forward(self, xs, training=False):
        a = self._sample_axis(xs[0].ndim - 1) + 1
        self.splits = np.cumsum([x.shape[a] for x in xs])[:-1]
        return np.concatenate(xs, axis=a)

    def backward(self, grad):
        return np.split(grad, self.splits, axis=self._sample_axis(grad.ndim - 1) + 1)

    def _joins_masks(self, rank: int, mask) -> bool:
        """Joining along time: the masks are joined too (an input without a mask keeps all its steps)."""
        return self._sample_axis(rank - 1) == 0 and mask[0] is not None and rank > 2

    def compute_mask(self, x, mask):
        if not isinstance(mask, list) or all(m is None for m in mask):
            return None
        if self._joins_masks(x[0].ndim, mask):
            return np.concatenate([m if m is not None else np.ones(t.shape[:2], bool) for m, t in zip(mask, x)], 1)
        return _and_masks(mask)

    def to_onnx(self, g, xs, in_shape, mask):
        rank = len(in_shape[0]) + 1
        axis = self._sample_axis(rank - 1) + 1  # counted in dlcli's channels-last layout
        if all(v.first for v in xs):
            perm = [0, rank - 1, *range(1, rank - 1)]
            return g.value(g.op("Concat", [v.name for v in xs], self.name, axis=perm.index(axis)), rank, True)
        return g.value(g.op("Concat", [g.last(v).name for v in xs], self.name, axis=axis), rank)

    def onnx_mask(self, g, xs, mask):
        if not isinstance(mask, list) or all(m is None for m in mask):
            return None
        if self._joins_masks(xs[0].rank, mask):
            return g.op("Concat", [m if m is not None else _onnx_all_steps(g, v) for m, v in zip(mask, xs)], axis=1)
        return _and_masks(mask, _onnx_and(g))


def _onnx_all_steps(g, v) -> str:
    """A (batch, steps) all-true mask in the ONNX graph for an input that carries none."""
    shape = g.op("Slice", [g.op("Shape", [g.last(v).name]), g.ints([0]), g.ints([2])])
    return g.full(shape, True, "bool", "true")


@register("Dot")
class Dot(Layer):
    """Keras' batch dot product of two inputs, contracting axis `axes` of each (counted with the batch axis; an int
    or a pair). normalize=True L2-normalises both along those axes first, giving cosine similarity."""

    def __init__(self, axes: int | list[int], normalize: bool = False, **kw):
        super().__init__(**kw)
        self.axes = [int(a) for a in axes] if isinstance(axes, (list, tuple)) else int(axes)
        self.normalize = bool(normalize)

    def build(self, input_shape):
        self.output_shape(input_shape)

    def _axes(self, shapes) -> list[int]:
        """The contracted per-sample axes of both inputs (Keras: a negative int counts from each input's end)."""
        pair = self.axes if isinstance(self.axes, list) else [self.axes, self.axes]
        if len(pair) != 2:
            raise ShapeError(f"Dot layer '{self.name}': axes must be an int or a pair; got {self.axes}")
        out = []
        for a, s in zip(pair, shapes):
            full = a % (len(s) + 1) if a < 0 else a
            if not 1 <= full <= len(s):
                raise ShapeError(f"Dot layer '{self.name}': axis {a} is not a per-sample axis of an input of shape "
                                 f"{format_shape(s)} (the batch axis 0 cannot be contracted)")
            out.append(full - 1)
        return out

    def output_shape(self, input_shape):
        shapes = _as_list(self, input_shape)
        if len(shapes) != 2:
            raise ShapeError(f"Dot layer '{self.name}' takes exactly 2 inputs; got {len(shapes)}")
        a, b = self._axes(shapes)
        if shapes[0][a] != shapes[1][b]:
            raise ShapeError(f"Dot layer '{self.name}' cannot contract inputs of shapes {format_shape(shapes[0])} and "
                             f"{format_shape(shapes[1])}: size {shapes[0][a]} (axis {a + 1}) != size {shapes[1][b]} "
                             f"(axis {b + 1})")
        out = shapes[0][:a] + shapes[0][a + 1:] + shapes[1][:b] + shapes[1][b + 1:]
        return out if out else (1,)  # Keras keeps a (batch, 1) result for two vectors

    def forward(self, xs, training=False):
        x1, x2 = xs
        a, b = self._axes([x1.shape[1:], x2.shape[1:]])
        self.a, self.b = a + 1, b + 1
        if self.normalize:
            x1, self.n1 = _l2_normalize(x1, self.a)
            x2, self.n2 = _l2_normalize(x2, self.b)
        self.m1, self.m2 = np.moveaxis(x1, self.a, -1), np.moveaxis(x2, self.b, -1)
        n = x1.shape[0]
        k = x1.shape[self.a]
        left, right = self.m1.reshape(n, -1, k), self.m2.reshape(n, -1, k)
        out = left @ right.transpose(0, 2, 1)  # (batch, rest1, rest2)
        return out.reshape((n,) + (self.m1.shape[1:-1] + self.m2.shape[1:-1] or (1,)))

    def backward(self, grad):
        n, k = grad.shape[0], self.m1.shape[-1]
        left, right = self.m1.reshape(n, -1, k), self.m2.reshape(n, -1, k)
        g = grad.reshape(n, left.shape[1], right.shape[1])
        g1 = np.moveaxis((g @ right).reshape(self.m1.shape), -1, self.a)
        g2 = np.moveaxis((g.transpose(0, 2, 1) @ left).reshape(self.m2.shape), -1, self.b)
        if self.normalize:
            g1 = _l2_normalize_backward(g1, np.moveaxis(self.m1, -1, self.a), self.n1, self.a)
            g2 = _l2_normalize_backward(g2, np.moveaxis(self.m2, -1, self.b), self.n2, self.b)
        return [g1, g2]

    def to_onnx(self, g, xs, in_shape, mask):
        a, b = self._axes(in_shape)
        out = self.output_shape(in_shape)
        sides = []
        for v, axis, shape in zip(xs, (a, b), in_shape):
            name = g.last(v).name
            if self.normalize:  # _l2_normalize: x / sqrt(max(sum(x^2), epsilon))
                squares = g.reduce("ReduceSumSquare", name, [axis + 1], keepdims=1)
                name = g.op("Div", [name, g.op("Sqrt", [g.op("Max", [squares, g.scalar(_L2_EPSILON)])])])
            perm = [0, *[i + 1 for i in range(len(shape)) if i != axis], axis + 1]
            moved = g.op("Transpose", [name], perm=perm)
            sides.append(g.op("Reshape", [moved, g.ints([0, -1, shape[axis]])]))
        product = g.op("MatMul", [sides[0], g.op("Transpose", [sides[1]], perm=[0, 2, 1])])
        return g.value(g.op("Reshape", [product, g.ints([0, *out])], self.name), len(out) + 1)


_L2_EPSILON = 1e-12  # Keras' l2_normalize floor on the squared norm


def _l2_normalize(x, axis):
    norm = np.sqrt(np.maximum((x * x).sum(axis=axis, keepdims=True), x.dtype.type(_L2_EPSILON)))
    return x / norm, norm


def _l2_normalize_backward(grad, y, norm, axis):
    """d(x / |x|): (g - y * sum(g * y)) / |x|; below the floor the norm is a constant."""
    floored = norm <= np.sqrt(_L2_EPSILON)
    radial = np.where(floored, 0, (grad * y).sum(axis=axis, keepdims=True))
    return (grad - y * radial) / norm
