"""One ONNX emitter per dlcli layer type: `EXPORTERS[type name](g, layer, x, in_shape, mask) -> Value(s)`.

`x` is a Value (a list for merge layers), `in_shape` the per-sample dlcli shape(s), `mask` the name of a (batch,
steps) bool tensor or None. Weights are converted from Keras' layouts to ONNX's here: conv kernels (*k, in, out) ->
(out, in, *k); LSTM gates i, f, c, o -> ONNX i, o, f, c; GRU reset_after -> linear_before_reset. Mask propagation
(`output_mask`) mirrors each layer's compute_mask in dlcli.layers.
"""
import numpy as np
from onnx import TensorProto, helper

from dlcli.engine.layer import Layer
from dlcli.interop.onnx_graph import Builder, ExportError, Value
from dlcli.layers import conv_math as cm

EXPORTERS: dict = {}
IDENTITY_AT_INFERENCE = ("Dropout", "SpatialDropout2D", "RandomFlip", "RandomTranslation", "RandomRotation",
                         "RandomZoom")


def exports(*names):
    def add(fn):
        for name in names:
            EXPORTERS[name] = fn
        return fn

    return add


def emit(g: Builder, layer, x, in_shape, mask):
    """The ONNX nodes for one call of `layer`; an unmapped layer type fails naming the layer."""
    kind = type(layer).__name__
    if kind not in EXPORTERS:
        raise ExportError(f"layer '{layer.name}' ({kind}) has no ONNX mapping; exportable layer types: "
                          f"{', '.join(sorted(EXPORTERS))}")
    try:
        return EXPORTERS[kind](g, layer, x, in_shape, mask)
    except ExportError as e:
        if f"'{layer.name}'" in e.message:
            raise
        raise ExportError(f"layer '{layer.name}' ({kind}): {e.message}") from None


def _weight(g: Builder, layer, array, tag: str) -> str:
    return g.const(array, f"{layer.name}_{tag}", key=(id(layer), tag))


def _pads(pairs) -> list[int]:
    """ONNX pads: every axis' start, then every axis' end."""
    return [int(b) for b, _ in pairs] + [int(a) for _, a in pairs]


# --- core ---------------------------------------------------------------------------------------------------------
@exports(*IDENTITY_AT_INFERENCE)
def _identity(g, layer, x, in_shape, mask):
    return x


@exports("Rescaling")
def _rescaling(g, layer, x, in_shape, mask):
    x = g.last(x)
    y = g.op("Mul", [x.name, _weight(g, layer, np.array(layer.scale, np.float32), "scale")])
    y = g.op("Add", [y, _weight(g, layer, np.array(layer.offset, np.float32), "offset")], layer.name)
    return Value(y, x.rank)


@exports("Activation")
def _activation(g, layer, x, in_shape, mask):
    return g.activate(layer.activation.name, x, layer.name)


@exports("Dense")
def _dense(g, layer, x, in_shape, mask):
    x = g.last(x)
    y = g.op("MatMul", [x.name, _weight(g, layer, layer.kernel.value, "kernel")])
    if layer.use_bias:
        y = g.op("Add", [y, _weight(g, layer, layer.bias.value, "bias")])
    return g.activate(layer.activation.name, Value(y, x.rank), layer.name)


@exports("Flatten")
def _flatten(g, layer, x, in_shape, mask):
    return Value(g.op("Flatten", [g.last(x).name], layer.name, axis=1), 2)  # channels-last order, as dlcli's


@exports("Reshape")
def _reshape(g, layer, x, in_shape, mask):
    out = layer.output_shape(in_shape)
    return Value(g.op("Reshape", [g.last(x).name, g.ints([0, *out])], layer.name), len(out) + 1)


# --- convolutions and pooling (channels-first inside ONNX) ---------------------------------------------------------
@exports("Conv1D", "Conv2D", "Conv3D")
def _conv(g, layer, x, in_shape, mask):
    k = layer.rank
    x = g.first(x)
    _, pads = cm.geometry(in_shape[:-1], layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate)
    kernel = layer.kernel.value.transpose(k + 1, k, *range(k))  # (*k, in, out) -> (out, in, *k)
    inputs = [x.name, _weight(g, layer, kernel, "kernel")]
    if layer.use_bias:
        inputs.append(_weight(g, layer, layer.bias.value, "bias"))
    y = g.op("Conv", inputs, layer.name, kernel_shape=list(layer.kernel_size), strides=list(layer.strides),
             dilations=list(layer.dilation_rate), pads=_pads(pads))
    return g.activate(layer.activation.name, Value(y, x.rank, True))


@exports("Conv2DTranspose")
def _conv_transpose(g, layer, x, in_shape, mask):
    x = g.first(x)
    sizes = in_shape[:-1]
    out, pads = layer._transpose_geometry(sizes)
    onnx_pads, output_padding = [], []
    for n, m, (before, _), k, s in zip(sizes, out, pads, cm.effective(layer.kernel_size, layer.dilation_rate),
                                       layer.strides):
        full = (n - 1) * s + k  # the scatter's extent; dlcli crops `before` and keeps m values from there
        onnx_pads.append((before, max(full - before - m, 0)))
        output_padding.append(max(before + m - full, 0))
    kernel = layer.kernel.value.transpose(3, 2, 0, 1)  # (kh, kw, out, in) -> (in, out, kh, kw)
    inputs = [x.name, _weight(g, layer, kernel, "kernel")]
    if layer.use_bias:
        inputs.append(_weight(g, layer, layer.bias.value, "bias"))
    y = g.op("ConvTranspose", inputs, layer.name, kernel_shape=list(layer.kernel_size), strides=list(layer.strides),
             dilations=list(layer.dilation_rate), pads=_pads(onnx_pads), output_padding=output_padding)
    return g.activate(layer.activation.name, Value(y, x.rank, True))


def _depthwise(g, layer, x, in_shape, kernel, tag) -> str:
    """Grouped Conv, one group per input channel; output channel c * depth_multiplier + m as TF (and ONNX)."""
    _, pads = cm.geometry(in_shape[:-1], layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate)
    kh, kw, cin, dm = kernel.shape
    w = kernel.reshape(kh, kw, cin * dm).transpose(2, 0, 1)[:, None]
    return g.op("Conv", [x.name, _weight(g, layer, w, tag)], f"{layer.name}_{tag}", kernel_shape=[kh, kw],
                strides=list(layer.strides), dilations=list(layer.dilation_rate), pads=_pads(pads), group=cin)


@exports("DepthwiseConv2D")
def _depthwise_conv(g, layer, x, in_shape, mask):
    x = g.first(x)
    y = _depthwise(g, layer, x, in_shape, layer.kernel.value, "depthwise")
    if layer.use_bias:
        y = g.op("Add", [y, _weight(g, layer, layer.bias.value.reshape(-1, 1, 1), "bias")], layer.name)
    return g.activate(layer.activation.name, Value(y, 4, True))


@exports("SeparableConv2D")
def _separable_conv(g, layer, x, in_shape, mask):
    x = g.first(x)
    mid = _depthwise(g, layer, x, in_shape, layer.depthwise_kernel.value, "depthwise")
    pointwise = layer.pointwise_kernel.value[0, 0].T[:, :, None, None]  # (mid, out) -> (out, mid, 1, 1)
    inputs = [mid, _weight(g, layer, pointwise, "pointwise")]
    if layer.use_bias:
        inputs.append(_weight(g, layer, layer.bias.value, "bias"))
    y = g.op("Conv", inputs, layer.name, kernel_shape=[1, 1])
    return g.activate(layer.activation.name, Value(y, 4, True))


def _pool(op_type, **extra):
    def emit_pool(g, layer, x, in_shape, mask):
        x = g.first(x)
        _, pads = cm.geometry(in_shape[:-1], layer.pool_size, layer.strides, layer.padding, (1,) * layer.rank)
        # MaxPool never picks a pad; AveragePool with count_include_pad=0 averages the real inputs only, as TF
        y = g.op(op_type, [x.name], layer.name, kernel_shape=list(layer.pool_size), strides=list(layer.strides),
                 pads=_pads(pads), **extra)
        return Value(y, x.rank, True)

    return emit_pool


exports("MaxPooling1D", "MaxPooling2D", "MaxPooling3D")(_pool("MaxPool"))
exports("AveragePooling1D", "AveragePooling2D", "AveragePooling3D")(_pool("AveragePool", count_include_pad=0))


def _global_pool(op_type):
    def emit_global(g, layer, x, in_shape, mask):
        if mask is not None and op_type == "ReduceMean" and layer.rank == 1:
            return _masked_average(g, layer, g.last(x), mask)
        axes = range(2, x.rank) if x.first else range(1, x.rank - 1)
        y = g.reduce(op_type, x.name, axes, keepdims=int(layer.keepdims), hint=layer.name)
        return Value(y, x.rank, x.first) if layer.keepdims else Value(y, 2)

    return emit_global


def _masked_average(g, layer, x, mask) -> Value:
    """Keras' masked GlobalAveragePooling1D: the mean over unmasked steps (at least one step's weight)."""
    w = g.unsqueeze(g.op("Cast", [mask], to=TensorProto.FLOAT), [2])
    total = g.reduce("ReduceSum", g.op("Mul", [x.name, w]), [1], keepdims=0)
    count = g.op("Max", [g.reduce("ReduceSum", w, [1], keepdims=0), g.scalar(1.0)])
    y = g.op("Div", [total, count], layer.name)
    return Value(y if not layer.keepdims else g.unsqueeze(y, [1]), 3 if layer.keepdims else 2)


exports("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D")(_global_pool("ReduceMean"))
exports("GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D")(_global_pool("ReduceMax"))


# --- spatial reshaping --------------------------------------------------------------------------------------------
def _spatial_axes(x: Value) -> list[int]:
    return [2, 3] if x.first else [1, 2]


@exports("ZeroPadding2D")
def _zero_padding(g, layer, x, in_shape, mask):
    pairs = [(0, 0)] * x.rank
    for axis, pair in zip(_spatial_axes(x), layer.padding):
        pairs[axis] = pair
    return Value(g.op("Pad", [x.name, g.ints(_pads(pairs), "pads")], layer.name), x.rank, x.first)


@exports("Cropping2D")
def _cropping(g, layer, x, in_shape, mask):
    (t, b), (l, r) = layer.cropping
    h, w = in_shape[0], in_shape[1]
    y = g.op("Slice", [x.name, g.ints([t, l]), g.ints([h - b, w - r]), g.ints(_spatial_axes(x))], layer.name)
    return Value(y, x.rank, x.first)


@exports("UpSampling2D")
def _upsampling(g, layer, x, in_shape, mask):
    x = g.first(x)
    scales = g.const(np.array([1, 1, *layer.size], np.float32), "scales", key=("scales", layer.size))
    # nearest with floor on asymmetric coordinates: output pixel i reads input i // size (dlcli's repeat)
    y = g.op("Resize", [x.name, "", scales], layer.name, mode="nearest",
             coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return Value(y, 4, True)


# --- normalisation ------------------------------------------------------------------------------------------------
@exports("BatchNormalization")
def _batch_norm(g, layer, x, in_shape, mask):
    rank = len(in_shape)
    shape = layer.moving_mean.value.shape
    gamma = layer.gamma.value if layer.scale else np.ones(shape, np.float32)
    beta = layer.beta.value if layer.center else np.zeros(shape, np.float32)
    if layer.feature_axes == (rank - 1,):  # the channel axis: ONNX's BatchNormalization (inference form)
        x = g.first(x)
        y = g.op("BatchNormalization", [x.name, _weight(g, layer, gamma, "gamma"), _weight(g, layer, beta, "beta"),
                                        _weight(g, layer, layer.moving_mean.value, "moving_mean"),
                                        _weight(g, layer, layer.moving_variance.value, "moving_variance")],
                 layer.name, epsilon=layer.epsilon)
        return Value(y, x.rank, x.first)
    x = g.last(x)  # other axes: dlcli's own arithmetic, (x - mean) * 1/sqrt(var + eps) * gamma + beta
    view = layer.param_view
    inv_std = 1 / np.sqrt(layer.moving_variance.value + np.float32(layer.epsilon))
    y = g.op("Sub", [x.name, _weight(g, layer, layer.moving_mean.value.reshape(view), "moving_mean")])
    y = g.op("Mul", [y, _weight(g, layer, (inv_std * gamma).reshape(view), "scale")])
    return Value(g.op("Add", [y, _weight(g, layer, beta.reshape(view), "beta")], layer.name), x.rank)


@exports("LayerNormalization")
def _layer_norm(g, layer, x, in_shape, mask):
    x = g.last(x)
    axes = layer.feature_axes
    rank = len(in_shape)
    shape = tuple(in_shape[a] for a in axes)
    gamma = layer.gamma.value if layer.scale else np.ones(shape, np.float32)
    beta = layer.beta.value if layer.center else np.zeros(shape, np.float32)
    if g.opset >= 17 and axes == tuple(range(rank - len(axes), rank)):
        y = g.op("LayerNormalization", [x.name, _weight(g, layer, gamma, "gamma"), _weight(g, layer, beta, "beta")],
                 layer.name, axis=-len(axes), epsilon=layer.epsilon)
        return Value(y, x.rank)
    norm_axes = [a + 1 for a in axes]
    centered = g.op("Sub", [x.name, g.reduce("ReduceMean", x.name, norm_axes)])
    var = g.reduce("ReduceMean", g.op("Mul", [centered, centered]), norm_axes)
    inv_std = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.scalar(layer.epsilon)])])])
    y = g.op("Mul", [g.op("Mul", [centered, inv_std]), _weight(g, layer, gamma.reshape(layer.param_view), "gamma")])
    return Value(g.op("Add", [y, _weight(g, layer, beta.reshape(layer.param_view), "beta")], layer.name), x.rank)


# --- embeddings and masks -------------------------------------------------------------------------------------------
def _indices(g, x: Value) -> tuple[str, str]:
    """Integer indices for Gather (dlcli accepts whole-number floats) and their dtype."""
    if x.dtype in ("int32", "int64"):
        return x.name, x.dtype
    return g.op("Cast", [x.name], to=TensorProto.INT64), "int64"


@exports("Embedding")
def _embedding(g, layer, x, in_shape, mask):
    idx, _ = _indices(g, x)
    y = g.op("Gather", [_weight(g, layer, layer.embeddings.value, "embeddings"), idx], layer.name, axis=0)
    return Value(y, x.rank + 1)


@exports("Masking")
def _masking(g, layer, x, in_shape, mask):
    x = g.last(x)
    keep = g.reduce("ReduceMax", _differs(g, layer, x), [-1], keepdims=1)
    return Value(g.op("Mul", [x.name, keep], layer.name), x.rank)


def _differs(g, layer, x: Value) -> str:
    """1.0 where a feature differs from the mask value, else 0.0."""
    same = g.op("Equal", [x.name, g.scalar(layer.mask_value)])
    return g.op("Cast", [g.op("Not", [same])], to=TensorProto.FLOAT)


# --- merges -------------------------------------------------------------------------------------------------------
def _aligned(g, xs: list[Value]) -> list[Value]:
    """Inputs in one layout; a lower-rank input gains size-1 axes right after the batch axis (dlcli's broadcast)."""
    if len({v.rank for v in xs}) == 1 and len({v.first for v in xs}) == 1:
        return xs
    xs = [g.last(v) for v in xs]
    rank = max(v.rank for v in xs)
    return [v if v.rank == rank else Value(g.unsqueeze(v.name, list(range(1, 1 + rank - v.rank))), rank)
            for v in xs]


def _chain(op_type):
    def emit_chain(g, layer, xs, in_shape, mask):
        xs = _aligned(g, xs)
        y = xs[0].name
        for v in xs[1:]:  # left to right, as dlcli adds and multiplies
            y = g.op(op_type, [y, v.name])
        if type(layer).__name__ == "Average":
            y = g.op("Div", [y, g.scalar(len(xs))])
        if len(xs) == 1:
            y = g.op("Identity", [y])
        return Value(y, xs[0].rank, xs[0].first)

    return emit_chain


exports("Add", "Average")(_chain("Add"))
exports("Multiply")(_chain("Mul"))
exports("Subtract")(_chain("Sub"))


def _variadic(op_type):
    def emit_variadic(g, layer, xs, in_shape, mask):
        xs = _aligned(g, xs)
        return Value(g.op(op_type, [v.name for v in xs], layer.name), xs[0].rank, xs[0].first)

    return emit_variadic


exports("Maximum")(_variadic("Max"))
exports("Minimum")(_variadic("Min"))


@exports("Concatenate")
def _concatenate(g, layer, xs, in_shape, mask):
    rank = len(in_shape[0]) + 1
    axis = layer._sample_axis(rank - 1) + 1  # counted in dlcli's channels-last layout
    if all(v.first for v in xs):
        perm = [0, rank - 1, *range(1, rank - 1)]
        return Value(g.op("Concat", [v.name for v in xs], layer.name, axis=perm.index(axis)), rank, True)
    return Value(g.op("Concat", [g.last(v).name for v in xs], layer.name, axis=axis), rank)


@exports("Dot")
def _dot(g, layer, xs, in_shape, mask):
    a, b = layer._axes(in_shape)
    out = layer.output_shape(in_shape)
    sides = []
    for v, axis, shape in zip(xs, (a, b), in_shape):
        v = g.last(v)
        name = v.name
        if layer.normalize:  # Keras' l2_normalize: x / sqrt(max(sum(x^2), 1e-12))
            squares = g.reduce("ReduceSumSquare", name, [axis + 1], keepdims=1)
            name = g.op("Div", [name, g.op("Sqrt", [g.op("Max", [squares, g.scalar(1e-12)])])])
        perm = [0, *[i + 1 for i in range(len(shape)) if i != axis], axis + 1]
        moved = g.op("Transpose", [name], perm=perm)
        sides.append(g.op("Reshape", [moved, g.ints([0, -1, shape[axis]])]))
    product = g.op("MatMul", [sides[0], g.op("Transpose", [sides[1]], perm=[0, 2, 1])])
    return Value(g.op("Reshape", [product, g.ints([0, *out])], layer.name), len(out) + 1)


# --- recurrent layers -----------------------------------------------------------------------------------------------
ONNX_RNN_ACTIVATIONS = {"tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu"}


def _gate_blocks(a, order, units):
    """Columns of a (..., G * units) array regrouped in gate `order`."""
    return np.concatenate([a[..., k * units:(k + 1) * units] for k in order], axis=-1)


@exports("SimpleRNN", "LSTM", "GRU")
def _recurrent_layer(g, layer, x, in_shape, mask):
    outs = recurrent(g, layer, g.last(x), mask)
    return outs if layer.return_state else outs[0]


def recurrent(g, layer, x: Value, mask) -> list[Value]:
    """[output, *final states] of a recurrent layer on x (batch, steps, features), Keras' semantics: go_backwards
    returns sequences in processing order; a masked step keeps the previous state and output."""
    kind = type(layer).__name__
    xt = g.op("Transpose", [x.name], perm=[1, 0, 2])  # time-major, as ONNX recurrences and Scan read it
    mt = None
    if mask is not None:
        mt = g.unsqueeze(g.op("Transpose", [mask], perm=[1, 0]), [2])  # (steps, batch, 1)
    if layer.go_backwards:
        xt = g.reverse(xt, 0)
        mt = None if mt is None else g.reverse(mt, 0)
    names = [layer.act, layer.rec_act]
    if mt is None and all(n in ONNX_RNN_ACTIVATIONS for n in names):
        seq, states = _native_recurrence(g, layer, kind, xt)
    else:
        seq, states = _scanned_recurrence(g, layer, kind, xt, mt)
    out = Value(g.op("Transpose", [seq], f"{layer.name}_sequence", perm=[1, 0, 2]), 3) if layer.return_sequences \
        else Value(g.op("Identity", [states[0]], layer.name), 2)
    return [out] + [Value(s, 2) for s in states]


def _native_recurrence(g, layer, kind, xt):
    """ONNX's own RNN / LSTM / GRU node; returns (time-major output sequence, final states)."""
    u = layer.units
    order = {"LSTM": [0, 3, 1, 2], "GRU": [0, 1, 2], "SimpleRNN": [0]}[kind]  # Keras i,f,c,o -> ONNX i,o,f,c
    kernel = _gate_blocks(layer.kernel.value, order, u).T[None]
    recurrent_kernel = _gate_blocks(layer.recurrent_kernel.value, order, u).T[None]
    inputs = [xt, _weight(g, layer, kernel, "W"), _weight(g, layer, recurrent_kernel, "R")]
    attrs = {"hidden_size": u}
    if layer.use_bias:
        b = layer.bias.value
        if kind == "GRU" and layer.reset_after:  # (2, 3u): input bias, recurrent bias = ONNX's Wb, Rb
            bias = np.concatenate([b[0], b[1]])
        else:
            bias = np.concatenate([_gate_blocks(b, order, u), np.zeros_like(b)])
        inputs.append(_weight(g, layer, bias[None], "B"))
    act, rec = ONNX_RNN_ACTIVATIONS[layer.act], ONNX_RNN_ACTIVATIONS[layer.rec_act]
    if kind == "LSTM":
        attrs["activations"] = [rec, act, act]
        op_type, n_out = "LSTM", 3
    elif kind == "GRU":
        # Keras reset_after=True applies the reset gate after the recurrent matmul: ONNX linear_before_reset=1
        attrs.update(activations=[rec, act], linear_before_reset=int(layer.reset_after))
        op_type, n_out = "GRU", 2
    else:
        attrs["activations"] = [act]
        op_type, n_out = "RNN", 2
    outs = g.op(op_type, inputs, layer.name, outputs=n_out, **attrs)
    seq = g.squeeze(outs[0], [1])  # (steps, directions=1, batch, units)
    return seq, [g.squeeze(s, [0]) for s in outs[1:]]


def _scanned_recurrence(g, layer, kind, xt, mt):
    """The recurrence as an ONNX Scan whose body is dlcli's cell, for masks (Keras keeps the previous state at a
    masked step, which ONNX's sequence_lens cannot express) and activations ONNX's recurrent nodes lack."""
    u = layer.units
    xp = g.op("MatMul", [xt, _weight(g, layer, layer.kernel.value, "kernel")])
    if layer.use_bias:
        in_bias = layer.bias.value[0] if kind == "GRU" and layer.reset_after else layer.bias.value
        xp = g.op("Add", [xp, _weight(g, layer, in_bias, "input_bias")])
    n_states = 2 if kind == "LSTM" else 1
    body = Builder(g.opset, parent=g)
    states_in = [body.fresh(f"{layer.name}_{s}_prev") for s in ("h", "c")[:n_states]]
    xp_t = body.fresh(f"{layer.name}_xp_t")
    m_t = body.fresh(f"{layer.name}_mask_t") if mt is not None else None
    new_states = _cell(body, g, layer, kind, xp_t, states_in)
    if m_t is not None:
        new_states = [body.op("Where", [m_t, new, old]) for new, old in zip(new_states, states_in)]
    step_out = new_states[0]
    if m_t is not None and layer.zero_output_for_mask:
        step_out = body.op("Mul", [step_out, body.op("Cast", [m_t], to=TensorProto.FLOAT)])
    step_out = body.op("Identity", [step_out], f"{layer.name}_y_t")
    states_out = [body.op("Identity", [s], f"{layer.name}_state_t") for s in new_states]

    def info(name, elem=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, elem, None)

    graph_inputs = [info(s) for s in states_in] + [info(xp_t)] + ([info(m_t, TensorProto.BOOL)] if m_t else [])
    graph = helper.make_graph(body.nodes, f"{layer.name}_step", graph_inputs,
                              [info(s) for s in states_out] + [info(step_out)])
    initial = [g.zeros_rows(xt, u, batch_axis=1)] * n_states
    outs = g.op("Scan", [*initial, xp, *([mt] if mt else [])], layer.name, outputs=n_states + 1, body=graph,
                num_scan_inputs=2 if mt else 1)
    return outs[-1], outs[:-1]


def _cell(body: Builder, g: Builder, layer, kind, xp_t, states) -> list[str]:
    """One step of dlcli's cell (dlcli.layers.recurrent_cells) on pre-projected inputs; returns the new states."""
    u, act, rec = layer.units, layer.act, layer.rec_act
    U = _weight(g, layer, layer.recurrent_kernel.value, "recurrent_kernel")
    h = states[0]
    if kind == "SimpleRNN":
        return [body.activation(act, body.op("Add", [body.op("MatMul", [h, U]), xp_t]))]
    if kind == "LSTM":
        z = body.op("Add", [body.op("MatMul", [h, U]), xp_t])
        i, f, c_hat, o = body.split(z, [u] * 4, axis=1)
        i, f, o = (body.activation(rec, t) for t in (i, f, o))
        c = body.op("Add", [body.op("Mul", [f, states[1]]), body.op("Mul", [i, body.activation(act, c_hat)])])
        return [body.op("Mul", [o, body.activation(act, c)]), c]
    xz, xr, xh = body.split(xp_t, [u] * 3, axis=1)
    if layer.reset_after:
        inner = body.op("MatMul", [h, U])
        if layer.use_bias:
            inner = body.op("Add", [inner, _weight(g, layer, layer.bias.value[1], "recurrent_bias")])
        iz, ir, ih = body.split(inner, [u] * 3, axis=1)
        z = body.activation(rec, body.op("Add", [xz, iz]))
        r = body.activation(rec, body.op("Add", [xr, ir]))
        hh = body.activation(act, body.op("Add", [xh, body.op("Mul", [r, ih])]))
    else:
        U = layer.recurrent_kernel.value
        zr = body.op("Add", [body.op("Concat", [xz, xr], axis=1),
                             body.op("MatMul", [h, _weight(g, layer, U[:, :2 * u], "recurrent_kernel_zr")])])
        z, r = (body.activation(rec, t) for t in body.split(zr, [u, u], axis=1))
        rh = body.op("MatMul", [body.op("Mul", [r, h]), _weight(g, layer, U[:, 2 * u:], "recurrent_kernel_h")])
        hh = body.activation(act, body.op("Add", [xh, rh]))
    return [body.op("Add", [hh, body.op("Mul", [z, body.op("Sub", [h, hh])])])]  # z h + (1 - z) hh


@exports("Bidirectional")
def _bidirectional(g, layer, x, in_shape, mask):
    x = g.last(x)
    (y, *f_states), (y_rev, *b_states) = (recurrent(g, inner, x, mask)
                                          for inner in (layer.forward_layer, layer.backward_layer))
    if layer.return_sequences:  # the backward copy ran reversed: back into time order before merging
        y_rev = Value(g.reverse(y_rev.name, 1), 3)
    mode, rank = layer.merge_mode, y.rank
    if mode == "concat":
        merged = [Value(g.op("Concat", [y.name, y_rev.name], layer.name, axis=-1), rank)]
    elif mode == "sum":
        merged = [Value(g.op("Add", [y.name, y_rev.name], layer.name), rank)]
    elif mode == "ave":
        merged = [Value(g.op("Div", [g.op("Add", [y.name, y_rev.name]), g.scalar(2.0)], layer.name), rank)]
    elif mode == "mul":
        merged = [Value(g.op("Mul", [y.name, y_rev.name], layer.name), rank)]
    else:
        merged = [y, y_rev]
    result = merged + (f_states + b_states if layer.return_state else [])
    return result if len(result) > 1 else result[0]


@exports("TimeDistributed")
def _time_distributed(g, layer, x, in_shape, mask):
    x = g.last(x)
    steps, inner_shape = in_shape[0], tuple(in_shape[1:])
    if steps is None:
        raise ExportError("TimeDistributed needs a fixed number of time steps to export")
    folded = Value(g.op("Reshape", [x.name, g.ints([-1, *inner_shape])]), len(inner_shape) + 1, dtype=x.dtype)
    y = g.last(emit(g, layer.layer, folded, inner_shape, None))
    out = layer.layer.output_shape(inner_shape)
    return Value(g.op("Reshape", [y.name, g.ints([-1, steps, *out])], layer.name), len(out) + 2)


# --- masks ---------------------------------------------------------------------------------------------------------
def output_mask(g: Builder, layer, xs, mask, n_outputs: int):
    """The mask(s) leaving a layer call, as the layer's compute_mask gives them (None: no mask)."""
    from dlcli.layers.embedding import Embedding, Masking
    from dlcli.layers.merge import Concatenate, _Merge
    from dlcli.layers.pooling import _GlobalPooling
    from dlcli.layers.recurrent import Recurrent
    from dlcli.layers.wrappers import Bidirectional

    def per_output(first):
        return first if n_outputs == 1 else [first] + [None] * (n_outputs - 1)

    if isinstance(layer, Embedding):
        if not layer.mask_zero:
            return None
        idx, dtype = _indices(g, xs)
        return g.op("Not", [g.op("Equal", [idx, g.scalar(0, dtype)])], f"{layer.name}_mask")
    if isinstance(layer, Masking):
        x = g.last(xs)
        keep = g.reduce("ReduceMax", _differs(g, layer, x), [-1], keepdims=0)
        return g.op("Cast", [keep], f"{layer.name}_mask", to=TensorProto.BOOL)
    if isinstance(layer, (Recurrent, Bidirectional)):
        seq_mask = mask if layer.return_sequences else None
        if isinstance(layer, Bidirectional) and layer.merge_mode is None:
            return [seq_mask, seq_mask] + [None] * (n_outputs - 2)
        return per_output(seq_mask)
    if isinstance(layer, _GlobalPooling):
        return None
    if isinstance(layer, Concatenate):
        if not isinstance(mask, list) or all(m is None for m in mask):
            return None
        if layer._sample_axis(xs[0].rank - 1) == 0 and mask[0] is not None and xs[0].rank > 2:
            ones = [m if m is not None else _all_steps(g, v) for m, v in zip(mask, xs)]
            return g.op("Concat", ones, axis=1)
        return _and(g, mask)
    if isinstance(layer, _Merge):
        return _and(g, mask) if isinstance(mask, list) else mask
    if type(layer).compute_mask is not Layer.compute_mask:
        raise ExportError(f"layer '{layer.name}' ({type(layer).__name__}) computes its own mask, which the ONNX "
                          f"exporter does not know")
    return per_output(mask) if layer.supports_masking and mask is not None else None


def _and(g, masks):
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = g.op("And", [out, m])
    return out


def _all_steps(g, v: Value) -> str:
    """A (batch, steps) all-true mask for an input that carries none (Keras' concatenation of masks)."""
    shape = g.op("Slice", [g.op("Shape", [g.last(v).name]), g.ints([0]), g.ints([2])])
    return g.op("ConstantOfShape", [shape], value=helper.make_tensor("true", TensorProto.BOOL, [1], [True]))
