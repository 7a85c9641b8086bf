"""A small ONNX graph builder over the `onnx` package's helpers: unique names, constants, nodes, activations, the
channels-last / channels-first bookkeeping, and the call into each layer's own `to_onnx(g, x, in_shape, mask)`.

Layers never import `onnx` (an optional extra): everything they need from it is a Builder method.

dlcli tensors are channels-last (batch, *spatial, channels); ONNX convolutions and poolings are channels-first. Each
`Value` records which layout it is in, and a layer asks for the one it needs (`g.first(v)` / `g.last(v)`), so a
chain of convolutions runs in NCHW with one Transpose on the way in and one before Flatten, not two per layer.
"""
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dlcli.engine.layer import LAYERS, Layer
from dlcli.errors import ExportError

__all__ = ["Builder", "ExportError", "Value", "ELEMENT_TYPES"]

INT64_MIN = int(np.iinfo(np.int64).min)
ELEMENT_TYPES = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE, "int32": TensorProto.INT32,
                 "int64": TensorProto.INT64, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL,
                 "string": TensorProto.STRING}


@dataclass(frozen=True)
class Value:
    """A tensor in the graph: its name, rank (with the batch axis), layout and element type."""

    name: str
    rank: int
    first: bool = False  # channels-first (batch, channels, *spatial) instead of dlcli's channels-last
    dtype: str = "float32"


class Builder:
    """Collects nodes and initializers; a sub-builder (a Scan body) shares names and puts constants in the root."""

    def __init__(self, opset: int, parent: "Builder | None" = None):
        self.opset = opset
        self.parent = parent
        self.nodes: list = []
        self.initializers: list = []
        self.used: set = parent.used if parent is not None else set()
        self._cache: dict = {}

    # --- layers: each declares its own nodes and output mask -------------------------------------------------------
    def emit(self, layer, x, in_shape, mask):
        """The ONNX nodes for one call of `layer` (its `to_onnx`); a layer without one fails naming the layer.
        `x` is a Value (a list for merge layers), `in_shape` the per-sample dlcli shape(s), `mask` the name of a
        (batch, steps) bool tensor (a list for merge layers) or None."""
        kind = type(layer).__name__
        if not hasattr(layer, "to_onnx"):
            exportable = [n for n in LAYERS.names() if hasattr(LAYERS.get(n), "to_onnx")]
            raise ExportError(f"layer '{layer.name}' ({kind}) has no ONNX mapping; exportable layer types: "
                              f"{', '.join(exportable)}")
        try:
            return layer.to_onnx(self, x, in_shape, mask)
        except ExportError as e:
            if f"'{layer.name}'" in e.message:
                raise
            raise ExportError(f"layer '{layer.name}' ({kind}): {e.message}") from None

    def output_mask(self, layer, x, mask):
        """The mask(s) leaving a layer call, as its compute_mask gives them: the layer's `onnx_mask` where its mask
        is computed from data, else compute_mask itself (Layer's passes the mask or drops it)."""
        if hasattr(layer, "onnx_mask"):
            return layer.onnx_mask(self, x, mask)
        if type(layer).compute_mask is not Layer.compute_mask:
            raise ExportError(f"layer '{layer.name}' ({type(layer).__name__}) computes its own mask, which the "
                              f"ONNX exporter does not know")
        return layer.compute_mask(x, mask)

    def child(self) -> "Builder":
        """A builder for a subgraph (a Scan body) of this one."""
        return Builder(self.opset, parent=self)

    def value(self, name: str, rank: int, first: bool = False, dtype: str = "float32") -> Value:
        return Value(name, rank, first, dtype)

    # --- names, constants, nodes ----------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        hint = hint.replace(" ", "_") or "t"
        name, i = hint, 0
        while name in self.used:
            i += 1
            name = f"{hint}_{i}"
        self.used.add(name)
        return name

    def const(self, array, hint: str = "const", key=None) -> str:
        """An initializer (in the root graph: a Scan body reads it from the outer scope). `key` deduplicates."""
        if self.parent is not None:
            return self.parent.const(array, hint, key)
        if key is not None and ("const", key) in self._cache:
            return self._cache[("const", key)]
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        if key is not None:
            self._cache[("const", key)] = name
        return name

    def weight(self, layer, array, tag: str) -> str:
        """One of `layer`'s arrays as an initializer named after it, added once however often it is read."""
        return self.const(array, f"{layer.name}_{tag}", key=(id(layer), tag))

    def ints(self, values, hint="shape") -> str:
        return self.const(np.asarray(values, np.int64), hint, key=("ints", tuple(values)))

    def scalar(self, value, dtype="float32") -> str:
        return self.const(np.asarray(value, dtype), "c", key=("scalar", float(value), dtype))

    @staticmethod
    def pads(pairs) -> list[int]:
        """ONNX pads from (before, after) per axis: every axis' start, then every axis' end."""
        return [int(b) for b, _ in pairs] + [int(a) for _, a in pairs]

    def op(self, op_type: str, inputs, hint: str | None = None, outputs: int = 1, **attrs):
        """Add a node; returns its output name (or list of names when `outputs` > 1)."""
        names = [self.fresh(f"{hint or op_type.lower()}" + (f"_out{i}" if outputs > 1 else ""))
                 for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(f"{op_type}_node"),
                                           **attrs))
        return names if outputs > 1 else names[0]

    def cast(self, x: str, dtype: str, hint=None) -> str:
        return self.op("Cast", [x], hint, to=ELEMENT_TYPES[dtype])

    def indices(self, x: Value) -> tuple[str, str]:
        """Integer indices for Gather (dlcli accepts whole-number floats) and their dtype."""
        if x.dtype in ("int32", "int64"):
            return x.name, x.dtype
        return self.cast(x.name, "int64"), "int64"

    def full(self, shape: str, value, dtype: str, value_name: str, hint=None) -> str:
        """A tensor of the run-time `shape` filled with `value` (ConstantOfShape)."""
        return self.op("ConstantOfShape", [shape], hint,
                       value=helper.make_tensor(value_name, ELEMENT_TYPES[dtype], [1], [value]))

    def subgraph(self, name: str, inputs, outputs):
        """This (sub-)builder's nodes as a graph for a Scan body; inputs and outputs are (name, dtype) pairs."""
        def info(pairs):
            return [helper.make_tensor_value_info(n, ELEMENT_TYPES[d], None) for n, d in pairs]

        return helper.make_graph(self.nodes, name, info(inputs), info(outputs))

    # --- ops whose form changed between opsets ----------------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes, keepdims=1, hint=None) -> str:
        axes = [int(a) for a in axes]
        if self.opset >= 18 or op_type == "ReduceSum":  # axes became an input (ReduceSum already in opset 13)
            return self.op(op_type, [x, self.ints(axes, "axes")], hint, keepdims=keepdims)
        return self.op(op_type, [x], hint, axes=axes, keepdims=keepdims)

    def squeeze(self, x: str, axes, hint=None) -> str:
        return self.op("Squeeze", [x, self.ints(axes, "axes")], hint)

    def unsqueeze(self, x: str, axes, hint=None) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes, "axes")], hint)

    def split(self, x: str, sizes, axis=-1, hint=None) -> list[str]:
        return self.op("Split", [x, self.ints(sizes, "split")], hint, outputs=len(sizes), axis=axis)

    def reverse(self, x: str, axis: int, hint=None) -> str:
        """x[::-1] along `axis` (a Slice with step -1)."""
        return self.op("Slice", [x, self.ints([-1]), self.ints([INT64_MIN]), self.ints([axis]), self.ints([-1])],
                       hint)

    def zeros_rows(self, like: str, width: int, batch_axis: int = 0, hint=None) -> str:
        """A float zeros (batch, width) whose batch size is `like`'s `batch_axis` (known only at run time)."""
        batch = self.op("Slice", [self.op("Shape", [like]), self.ints([batch_axis]), self.ints([batch_axis + 1])])
        shape = self.op("Concat", [batch, self.ints([width])], axis=0)
        return self.full(shape, 0.0, "float32", "zero", hint)

    # --- layouts --------------------------------------------------------------------------------------------------
    def last(self, v: Value) -> Value:
        if not v.first:
            return v
        return self._transposed(v, [0, *range(2, v.rank), 1], first=False)

    def first(self, v: Value) -> Value:
        if v.first or v.rank <= 2:  # (batch, channels) is both layouts
            return v
        return self._transposed(v, [0, v.rank - 1, *range(1, v.rank - 1)], first=True)

    def _transposed(self, v: Value, perm, first: bool) -> Value:
        key = ("layout", v.name, first)
        if key not in self._cache:
            name = self.op("Transpose", [v.name], f"{v.name}_{'nchw' if first else 'nhwc'}", perm=perm)
            self._cache[key] = Value(name, v.rank, first, v.dtype)
        return self._cache[key]

    # --- activations: each emits itself (dlcli.engine.activations), beside its NumPy math ------------------------
    def activation(self, activation, x: str, hint=None) -> str:
        """`activation` (an Activation, or a name for its defaults) on the tensor named x."""
        from dlcli.engine import activations

        act = activations.get(activation)
        try:
            return act.to_onnx(self, x, hint)
        except NotImplementedError as e:
            raise ExportError(f"activation '{act.name}' has no ONNX mapping{f' ({e})' if str(e) else ''}")

    def activate(self, activation, v: Value, hint=None) -> Value:
        """An activation on a Value; those acting along an axis (softmax ...) get Keras' channels-last layout."""
        from dlcli.engine import activations

        act = activations.get(activation)
        if act.channels_last:
            v = self.last(v)
        return Value(self.activation(act, v.name, hint), v.rank, v.first, v.dtype)
