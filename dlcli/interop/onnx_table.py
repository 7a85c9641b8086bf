"""A table run's preprocessing (dlcli.data.features) as ONNX nodes in front of the model, so onnxruntime takes the raw
columns as named inputs (`dlcli export` of a run trained on `data: {type: table}`).

Each feature column is one input of shape (batch, 1): float32 for numbers (NaN for a missing cell) and integer
categories (NaN missing), string for text categories (a missing cell is any value outside the vocabulary, "" or
"NA"). Expressed with ONNX's own operators: missing -> the mean by IsNaN/Where, rescaling and normalisation by
Mul/Add/Sub/Div, discretisation as ReduceSum(GreaterOrEqual(x, edges)) (np.digitize), lookups by ai.onnx.ml's
LabelEncoder (default: OOV index 0) and one-hot by OneHot. Refused, with the reason: hashing and crosses
(ONNX has no FarmHash), dates (no date parsing), text (tokenizing), several OOV indices (they hash too).
"""
import numpy as np

from dlcli.errors import DlcliError

ML_DOMAIN, ML_OPSET = "ai.onnx.ml", 2  # LabelEncoder with keys_floats / keys_strings and a default value


def unsupported(state: dict) -> list[str]:
    """Why each feature cannot be expressed in ONNX (empty: all can)."""
    why = []
    for name, f in state["features"].items():
        if f["type"].endswith("_hashed"):
            why.append(f"{name} ({f['type']}: ONNX has no FarmHash operator)")
        elif f["type"] == "date":
            why.append(f"{name} (date: ONNX cannot parse dates)")
        elif f["type"] == "text":
            why.append(f"{name} (text: dlcli's tokenizer is not an ONNX operator)")
        elif f.get("num_oov_indices", 1) != 1:
            why.append(f"{name} (num_oov_indices {f['num_oov_indices']}: out-of-vocabulary values are hashed)")
    why += [f"{c['name']} (a cross: ONNX has no FarmHash operator)" for c in state["crosses"]]
    return why


def preprocessing_graph(state: dict, opset: int, output: str | dict):
    """(ModelProto of the preprocessing alone: raw columns in, the concatenated float32 vector `output` out; or,
    for output_mode dict, `output` maps each feature name to the output holding its block)."""
    import onnx
    from onnx import TensorProto, helper

    why = unsupported(state)
    if why:
        raise DlcliError("the table's preprocessing cannot be expressed in ONNX: " + "; ".join(why)
                         + ". Export the model on the preprocessed vector instead: dlcli export RUN --preprocessed-inputs",
                         exit_code=2)
    nodes, inits, inputs, blocks, named = [], [], [], [], {}

    def const(name, value, dtype=np.float32):
        inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(op, ins, out, domain=None, **attrs):
        nodes.append(helper.make_node(op, ins, [out], domain=domain, **attrs))
        return out

    const("one_hot_values", [0.0, 1.0])
    for name, f in state["features"].items():
        kind, x = f["type"], f"{name}"
        p = f"pre_{name}"
        named[name] = len(blocks)  # this feature's blocks start here
        if kind == "string_categorical":
            inputs.append(helper.make_tensor_value_info(x, TensorProto.STRING, ["batch", 1]))
            index = node("LabelEncoder", [x], f"{p}_index", ML_DOMAIN, keys_strings=f["vocabulary"],
                         values_int64s=list(range(1, len(f["vocabulary"]) + 1)), default_int64=0)
            blocks.append(_one_hot(node, const, p, index, f["width"]))
            continue
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 1]))
        if kind == "integer_categorical":  # float input: NaN (missing) matches no key and goes to OOV, as in dlcli
            index = node("LabelEncoder", [x], f"{p}_index", ML_DOMAIN, keys_floats=[float(v) for v in f["vocabulary"]],
                         values_int64s=list(range(1, len(f["vocabulary"]) + 1)), default_int64=0)
            blocks.append(_one_hot(node, const, p, index, f["width"]))
            continue
        isnan = node("IsNaN", [x], f"{p}_isnan")
        filled = node("Where", [isnan, const(f"{p}_fill", [[f["fill"]]]), x], f"{p}_filled")
        if kind == "float_rescaled":
            value = node("Add", [node("Mul", [filled, const(f"{p}_scale", f["scale"])], f"{p}_scaled"),
                                 const(f"{p}_offset", f["offset"])], f"{p}_value")
        elif kind == "float_normalized":
            std = max(float(np.sqrt(f["variance"])), 1e-7)
            value = node("Div", [node("Sub", [filled, const(f"{p}_mean", f["mean"])], f"{p}_centred"),
                                 const(f"{p}_std", std)], f"{p}_value")
        elif kind == "float_discretized":
            above = node("Cast", [node("GreaterOrEqual", [filled, const(f"{p}_edges", [f["boundaries"]])],
                                       f"{p}_ge")], f"{p}_above", to=TensorProto.INT64)
            index = node("ReduceSum", [above, const(f"{p}_axis", [1], np.int64)], f"{p}_index", keepdims=1)
            value = _one_hot(node, const, p, index, f["bins"])
        else:
            value = filled
        blocks.append(value)
        if f["missing_indicator"]:
            blocks.append(node("Cast", [isnan], f"{p}_was_missing", to=TensorProto.FLOAT))
    if isinstance(output, dict):  # one output per feature: its blocks (value and was-missing column) joined
        ends = [*list(named.values())[1:], len(blocks)]
        for (name, start), end in zip(named.items(), ends):
            node("Concat", blocks[start:end], output[name], axis=1)
        outputs = [helper.make_tensor_value_info(output[n], TensorProto.FLOAT, ["batch", f["width"]])
                   for n, f in state["features"].items()]
    else:
        node("Concat", blocks, output, axis=1)
        outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", state["width"]])]
    graph = helper.make_graph(nodes, "dlcli_table_preprocessing", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid(ML_DOMAIN, ML_OPSET)])


def _one_hot(node, const, p, index, depth):
    """(batch, 1) int64 indices -> (batch, depth) float32: OneHot on the squeezed indices."""
    flat = node("Reshape", [index, const(f"{p}_flat_shape", [-1], np.int64)], f"{p}_flat")
    return node("OneHot", [flat, const(f"{p}_depth", depth, np.int64), "one_hot_values"], f"{p}_one_hot", axis=-1)


def raw_inputs(state: dict, columns: dict) -> dict:
    """The ONNX inputs for parsed table columns (dlcli.data.table.Column): float32 with NaN where missing, or text."""
    out = {}
    for name, f in state["features"].items():
        col = columns[name]
        if f["type"] == "string_categorical":
            out[name] = np.where(col.missing, "", col.values.astype(str)).astype(object).reshape(-1, 1)
        else:
            out[name] = np.where(col.missing, np.nan, col.values.astype(np.float64)).astype(np.float32).reshape(-1, 1)
    return out


def with_preprocessing(model_proto, state: dict, model_inputs: list[str], opset: int):
    """The model's graph with the preprocessing in front: its one input fed by the concatenated vector, or (output_mode
    dict) each input by the feature of its name; the model's own names are prefixed, so raw columns and the
    features' inputs may share names."""
    import onnx
    from onnx import compose, helper

    if state.get("output_mode") == "dict":
        outputs = {n: f"dlcli_feature_{n}" for n in state["features"]}
        pre = preprocessing_graph(state, opset, outputs)  # refuses crosses, hashing ... first
        model_proto = compose.add_prefix(model_proto, "model/", rename_outputs=False)
        io_map = [(outputs[n], f"model/{n}") for n in model_inputs]
    else:
        outputs, io_map = "dlcli_features", [("dlcli_features", model_inputs[0])]
        pre = preprocessing_graph(state, opset, outputs)
    pre.ir_version = model_proto.ir_version
    if not any(o.domain == ML_DOMAIN for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
    merged = compose.merge_models(pre, model_proto, io_map=io_map)
    helper.set_model_props(merged, {**{p.key: p.value for p in model_proto.metadata_props},
                                    "dlcli.inputs": "raw table columns, by name (NaN, or for text a value outside "
                                                    "the vocabulary, for a missing cell)"})
    onnx.checker.check_model(merged, full_check=True)
    return merged
