"""A dlcli model as an ONNX file: built with the `onnx` package's helpers, checked by the ONNX checker, then run by
onnxruntime beside dlcli on real inputs before anything is written (`dlcli export`).

The graph's inputs are the model's inputs after preprocessing (what `dlcli predict` feeds the model: float32 pixels
already scaled, word indices already looked up); how to get there (pixel scale, the vocabulary) is in the file's
metadata. Outputs keep the model's output names.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlcli import run_files
from dlcli.data.dataset import dataset_type
from dlcli.errors import DlcliError, require

DEFAULT_OPSET = 17  # LayerNormalization is a single node from 17; onnxruntime runs 13 onwards
MIN_OPSET = 13
TOLERANCE = 1e-4  # largest |onnxruntime - dlcli| an export may show
CHECK_SAMPLES = 256


@dataclass
class ExportReport:
    path: Path
    opset: int
    nodes: int
    max_difference: float | None  # None when onnxruntime is not installed
    checked_on: str


def to_onnx(model, opset: int = DEFAULT_OPSET, metadata: dict | None = None):
    """The ModelProto of a built dlcli model (weights as they are now), passed by the ONNX checker."""
    onnx = require("onnx", "onnx", "ONNX export")
    from onnx import helper

    from dlcli import __version__
    from dlcli.engine.graph import InputLayer
    from dlcli.interop.onnx_graph import ELEMENT_TYPES, Builder, Value
    from dlcli.interop.onnx_table import ML_DOMAIN, ML_OPSET

    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise DlcliError(f"--opset must be between {MIN_OPSET} and {top} (this onnx package's newest); got {opset}",
                         exit_code=2)
    g = Builder(opset)
    graph = model.graph
    g.used.update([*model.input_names, *model.output_names])
    values, masks, graph_inputs = {}, {}, []
    for t in graph.inputs:
        name = t.node.layer.name
        values[id(t)] = Value(name, len(t.shape) + 1, dtype=t.dtype)
        graph_inputs.append(helper.make_tensor_value_info(name, ELEMENT_TYPES[t.dtype], ["batch", *t.shape]))
    for node in graph.nodes:
        layer = node.layer
        if isinstance(layer, InputLayer):
            continue
        ins = [values[id(t)] for t in node.inputs]
        in_masks = [masks.get(id(t)) for t in node.inputs]
        mask = in_masks if node.multi_input else in_masks[0]
        if node.multi_input and all(m is None for m in in_masks):
            mask = None
        shapes = [t.shape for t in node.inputs]
        vars(layer).update(node.call_args)
        x = ins if node.multi_input else ins[0]
        out = g.emit(layer, x, shapes if node.multi_input else shapes[0], mask)
        outs = out if node.multi_output else [out]
        out_mask = g.output_mask(layer, x, mask)
        out_masks = out_mask if node.multi_output and isinstance(out_mask, list) else [out_mask] * len(outs)
        for t, v, m in zip(node.outputs, outs, out_masks):
            values[id(t)] = v
            if m is not None:
                masks[id(t)] = m
    graph_outputs = []
    for t, name in zip(graph.outputs, model.output_names):
        g.nodes.append(helper.make_node("Identity", [g.last(values[id(t)]).name], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, ELEMENT_TYPES["float32"], ["batch", *t.shape]))
    opsets = [helper.make_opsetid("", opset)]
    if any(n.domain == ML_DOMAIN for n in g.nodes):  # a lookup layer's LabelEncoder
        opsets.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
    proto = helper.make_model(helper.make_graph(g.nodes, model.name, graph_inputs, graph_outputs, g.initializers),
                              opset_imports=opsets, producer_name="dlcli", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(proto, metadata or {})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx.checker.ValidationError, shape inference errors: a bug here, not the user's
        raise DlcliError(f"the ONNX checker rejected the exported graph (a dlcli exporter bug): {e}") from None
    return proto


def run_onnx(data: bytes, inputs: dict) -> list[np.ndarray]:
    """The outputs onnxruntime computes for `inputs` (input name -> array)."""
    ort = require("onnxruntime", "onnx", "running ONNX models")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return session.run(None, inputs)
    except Exception as e:  # onnxruntime's own error types (an opset it does not know, a kernel it lacks)
        raise DlcliError(f"onnxruntime {ort.__version__} cannot run the exported graph: {e}") from None


def max_difference(data: bytes, model, xs: list) -> float:
    """Largest |onnxruntime - dlcli| over every output for the input arrays `xs`."""
    got = run_onnx(data, dict(zip(model.input_names, xs)))
    want = model.predict(xs if len(xs) > 1 else xs[0], batch_size=max(len(xs[0]), 1))
    want = want if isinstance(want, list) else [want]
    return max(float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0 for a, b in zip(got, want))


def sample_inputs(model, count: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs of the model's shapes and dtypes; indices below the vocabulary size where an Embedding reads."""
    from dlcli.layers.embedding import Embedding

    rng = np.random.default_rng(seed)
    xs = []
    for t in model.inputs:
        limits = [n.layer.input_dim for n in model.graph.nodes
                  if isinstance(n.layer, Embedding) and any(i is t for i in n.inputs)]
        shape = (count, *t.shape)
        if t.dtype == "string":  # text: a few words, some outside any vocabulary
            xs.append(rng.choice(np.array(["a", "b", "c", "red", "blue", ""]), shape).astype(object))
        elif limits or np.dtype(t.dtype).kind in "iu":
            xs.append(rng.integers(0, min(limits) if limits else 10, shape).astype(t.dtype))
        else:
            xs.append(rng.normal(size=shape).astype(t.dtype))
    return xs


def check_inputs(config, model, count: int = CHECK_SAMPLES) -> tuple[list, str]:
    """A batch of the run's test data (else training data, else seeded random inputs) and what it is."""
    from dlcli.data.dataset import load_fitted

    try:
        data = load_fitted(config, model)
    except DlcliError as e:
        why = "the run has no dataset" if dataset_type(config.data).empty else \
            f"the run's data did not load: {e.message.splitlines()[0][:120]}"
        return sample_inputs(model, count), f"{count} seeded random inputs ({why})"
    xs, which = (data.x_test, "test") if data.x_test is not None else (data.x_train, "training")
    if hasattr(xs, "columns"):  # a table's rows stay a TableSource: the raw columns feed its preprocessing graph
        xs = xs.subset(np.arange(min(count, len(xs))))
        return xs, f"{len(xs)} {which} rows"
    xs = xs.take(slice(0, count))
    return xs, f"{len(xs[0])} {which} samples"


def run_metadata(run_dir: Path, config) -> dict:
    """What a deployment needs to prepare inputs: the data section, pixel scale, vocabulary, class names."""
    data = config.data
    meta = {"dlcli.run": run_dir.name, "dlcli.data": json.dumps(data),
            "dlcli.inputs": "arrays as `dlcli predict` feeds the model, after the dataset's preprocessing"}
    meta.update(dataset_type(data).onnx_metadata())
    vocabulary = run_files.RunDir(run_dir).vocabulary
    if vocabulary.is_file():
        meta["dlcli.vocabulary"] = vocabulary.read_text(encoding="utf-8")
    try:
        classes = run_files.read_json(run_files.RunDir(run_dir).meta).get("classes")
    except DlcliError:
        classes = None
    if classes:
        meta["dlcli.classes"] = json.dumps(classes)
    return meta


def export_run(run_dir, weights: str = "best", output=None, opset: int = DEFAULT_OPSET,
               samples: int = CHECK_SAMPLES, allow_config_change: bool = False,
               preprocessed_inputs: bool = False) -> ExportReport:
    """Write RUN_DIR's model as ONNX (default RUN_DIR/model.onnx) after onnxruntime agrees with dlcli on a batch
    of the run's data within TOLERANCE. Nothing is written when any step fails. A run trained on a table gets its
    preprocessing in the graph (raw columns in, dlcli.interop.onnx_table) unless `preprocessed_inputs`."""
    from dlcli.experiment import load_run_model

    require("onnx", "onnx", "dlcli export")
    config, model = load_run_model(run_dir, weights, allow_config_change)
    run_dir = Path(run_dir)
    output = Path(output) if output is not None else run_files.RunDir(run_dir).model_onnx
    proto = to_onnx(model, opset, run_metadata(run_dir, config))
    table = dataset_type(config.data).rows and not preprocessed_inputs
    if table:
        from dlcli.data.table import read_state
        from dlcli.interop.onnx_table import with_preprocessing

        proto = with_preprocessing(proto, read_state(run_dir), model.input_names, opset)
    data = proto.SerializeToString()
    difference, checked_on = None, "not checked: onnxruntime is not installed (pip install 'dlcli[onnx]')"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    else:
        from dlcli.experiment import run_data

        with run_data(run_dir):
            xs, checked_on = check_inputs(config, model, samples)
        if table:  # the same rows, as raw columns for the graph and as dlcli's vector for the model
            from dlcli.interop.onnx_table import raw_inputs

            got = run_onnx(data, raw_inputs(xs.state, xs.columns))
            rows = xs.take(slice(0, len(xs)))
            want = model.predict(rows if len(rows) > 1 else rows[0], batch_size=max(len(xs), 1))
            difference = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in
                             zip(got, want if isinstance(want, list) else [want]))
        else:
            difference = max_difference(data, model, xs.take(slice(0, len(xs))) if hasattr(xs, "columns") else xs)
        if not difference <= TOLERANCE:
            raise DlcliError(f"onnxruntime's outputs differ from dlcli's by up to {difference:.3g} on {checked_on} "
                             f"(more than {TOLERANCE:g}); {output} was not written")
    run_files.atomic_write_bytes(output, data)
    return ExportReport(output, opset, len(proto.graph.node), difference, checked_on)
