"""Config -> compiled model: the `model:` section to layers and graph, and a saved model file back to a model.

Names were checked by the config schema; shapes are checked here, before any data.
"""
import re
import warnings

import numpy as np

from dlcli.config import as_config
from dlcli.engine.graph import Input
from dlcli.engine.layer import LAYERS, Layer, build_seeded, clear_session
from dlcli.errors import ConfigError, ShapeError
from dlcli.memory import check_training_fits
from dlcli.models import Model, Sequential
from dlcli.registry import did_you_mean
from dlcli import checkpoint


def build_model(config):
    """The compiled model a Config describes (or its plain data, `Config.to_dict()`, as bench/ scripts pass), its
    weights initialised from the config's seed."""
    import dlcli.layers  # noqa: F401  (registers every layer family)
    from dlcli.data.dataset import dataset_type

    config = as_config(config)
    clear_session()
    spec = {k: v for k, v in config.model.model_dump().items() if v is not None}  # plain data, as in config.yaml
    dataset = dataset_type(config.data)
    if spec.get("type", "sequential") == "sequential" and "input_shape" not in spec and spec.get("layers") \
            and "input_shape" not in spec["layers"][0] and (shape := dataset.input_shape()):
        spec["input_shape"] = shape  # a table's adapted features' width (the run's, when stored)
    if spec.get("type") == "functional" and any(i.get("shape") is None for i in spec.get("inputs", [])) \
            and (shapes := dataset.input_shapes()):  # a table's output_mode dict: each feature's width
        for i, entry in enumerate(spec["inputs"]):
            if entry.get("shape") is None:
                if entry["name"] not in shapes:
                    raise ConfigError(f"model.inputs[{i}]: '{entry['name']}' is not a table feature"
                                      f"{did_you_mean(entry['name'], shapes)}, so it needs a shape; features: "
                                      f"{', '.join(shapes)}")
                entry["shape"] = shapes[entry["name"]]
    model = model_from_config({"name": config.name, **spec}, np.random.default_rng(config.seed))
    apply_freeze(model, config.train.freeze)
    settings = config.compile
    model.compile(optimizer=settings.optimizer, loss=settings.loss, metrics=settings.metrics,
                  loss_weights=settings.loss_weights)
    # before any data, optimizer state or activation is allocated
    check_training_fits(model, config.train.batch_size)
    return model


def apply_freeze(model, patterns: list[str]):
    """`train.freeze: ["conv.*"]`: layers whose names fully match a pattern stop training."""
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"train.freeze: '{pattern}' is not a valid regular expression ({e})") from None
        matched = [layer for layer in model.layers if regex.fullmatch(layer.name)]
        if not matched:
            names = ", ".join(layer.name for layer in model.layers)
            raise ConfigError(f"train.freeze: pattern '{pattern}' matches no layer; layers: {names}")
        for layer in matched:
            layer.trainable = False


def model_from_config(spec: dict, rng: np.random.Generator | None = None) -> Model:
    """Build a model from the `model:` section of a config (sequential or functional); every layer's weights and
    dropout stream come from `rng` in build order (None: unseeded)."""
    spec, rng = dict(spec), rng if rng is not None else np.random.default_rng()
    kind = spec.get("type", "sequential")
    if kind == "sequential":
        model = Sequential(name=spec.get("name") or "sequential")
        first_shape = spec.get("input_shape")
        model._input = Input(tuple(first_shape), dtype=spec.get("input_dtype", "float32")) if first_shape else None
        for entry in spec.get("layers", []):
            model.add(LAYERS.create(entry))
        model.build(rng=rng)
        return model
    if kind == "functional":
        return _functional_from_config(spec, rng)
    raise ConfigError(f"model.type must be 'sequential' or 'functional'; found '{kind}'")


def _functional_from_config(spec: dict, rng: np.random.Generator) -> Model:
    tensors: dict[str, object] = {}
    for inp in spec.get("inputs", []):
        tensors[inp["name"]] = Input(tuple(inp["shape"]), name=inp["name"], dtype=inp.get("dtype", "float32"))
    layers_by_name: dict[str, Layer] = {}
    made: dict[str, object] = {}  # entry name -> its node
    pending = list(enumerate(spec.get("layers", [])))
    # Entries may come in any order: place each once all its inputs exist (a fixed point; leftovers are a cycle
    # or unknown names, reported with every offending entry).
    while pending:
        progressed = False
        for i, entry in list(pending):
            refs = entry.get("inputs")
            ref_list = refs if isinstance(refs, list) else [refs]
            if not all(_resolve_ref(r, tensors, strict=False) is not None for r in ref_list):
                continue
            if "shares" in entry:
                if entry["shares"] not in layers_by_name:
                    continue
                layer = layers_by_name[entry["shares"]]
            else:
                layer = LAYERS.create({k: v for k, v in entry.items() if k != "inputs"})  # a {type: ...} spec
                layers_by_name[layer.name] = layer
            ins = [_resolve_ref(r, tensors) for r in ref_list]
            try:
                build_seeded(layer, [t.shape for t in ins] if isinstance(refs, list) else ins[0].shape, rng)
                call_args = {a: entry[a] for a in layer.call_arguments if a in entry} if "shares" in entry else {}
                out = layer(ins if isinstance(refs, list) else ins[0], **call_args)
            except ShapeError as e:
                raise ShapeError(f"model.layers[{i}] '{entry.get('name') or layer.name}' (reading "
                                 f"{', '.join(map(str, ref_list))}): {e.message}") from None
            name = entry.get("name") or layer.name
            node = layer.nodes[-1]
            if "shares" in entry:
                node.name = name
            made[name] = node
            outs = out if isinstance(out, list) else [out]
            tensors[name] = outs[0]
            for k, t in enumerate(outs):
                tensors[f"{name}:{k}"] = t
            pending.remove((i, entry))
            progressed = True
        if not progressed:
            raise ConfigError(_unresolved_message([e for _, e in pending], tensors, layers_by_name))
    outputs = [_resolve_ref(r, tensors) for r in spec.get("outputs", [])]
    inputs = [tensors[i["name"]] for i in spec.get("inputs", [])]
    model = Model(inputs, outputs, name=spec.get("name") or "model")
    used = {id(n) for n in model.graph.nodes}
    model.dangling = [name for name, node in made.items() if id(node) not in used]
    model.dangling += [i["name"] for i in spec.get("inputs", []) if id(tensors[i["name"]].node) not in used]
    if model.dangling:
        many = len(model.dangling) > 1
        warnings.warn(f"model '{model.name}': {', '.join(model.dangling)} reach{'' if many else 'es'} no output "
                      f"({', '.join(model.output_names)}), so {'they are' if many else 'it is'} neither computed nor "
                      f"trained; list {'them' if many else 'it'} in model.outputs or remove {'them' if many else 'it'}",
                      DanglingLayerWarning, stacklevel=3)
    return model


class DanglingLayerWarning(UserWarning):
    """A functional config names layers or inputs that no output depends on."""


def _resolve_ref(ref, tensors, strict=True):
    if ref in tensors:
        return tensors[ref]
    if strict:
        known = [k for k in tensors if ":" not in k]
        raise ConfigError(f"unknown tensor '{ref}'{did_you_mean(ref, known)}; known: {', '.join(known)}")
    return None


def _unresolved_message(pending, tensors, layers_by_name) -> str:
    names = {e.get("name") for e in pending} | {k for k in tensors if ":" not in k}
    problems = []
    for e in pending:
        refs = e.get("inputs") if isinstance(e.get("inputs"), list) else [e.get("inputs")]
        for r in refs:
            if r not in names and r not in tensors:
                problems.append(f"layer '{e.get('name')}' reads unknown input '{r}'{did_you_mean(r, names)}")
        if "shares" in e and e["shares"] not in layers_by_name and e["shares"] not in names:
            problems.append(f"layer '{e.get('name')}' shares unknown layer '{e['shares']}'"
                            f"{did_you_mean(e['shares'], names)}")
    if not problems:
        problems.append("the layers form a cycle: " + " -> ".join(_find_cycle(pending))
                        + " (each reads the next's output; a graph must flow from inputs to outputs)")
    return "; ".join(problems)


def _find_cycle(pending) -> list[str]:
    """One cycle among entries that could not be placed, as names in reading order, closed (a -> b -> a)."""
    reads = {}
    for e in pending:
        refs = e.get("inputs") if isinstance(e.get("inputs"), list) else [e.get("inputs")]
        deps = [str(r).split(":")[0] for r in refs] + ([e["shares"]] if "shares" in e else [])
        reads[e.get("name")] = [d for d in deps if d in {x.get("name") for x in pending}]
    for start in reads:
        path, seen = [start], {start}
        while reads.get(path[-1]):
            nxt = reads[path[-1]][0]
            if nxt in seen:
                return path[path.index(nxt):] + [nxt]
            path.append(nxt)
            seen.add(nxt)
    return [str(e.get("name")) for e in pending]


def load_model(path) -> Model:
    """Load a model saved with `model.save(path)` (architecture, compile settings, weights, optimizer state)."""
    header, arrays = checkpoint.read_model(path)
    model = model_from_config(header["model"])
    if header.get("compile"):
        c = header["compile"]
        names = model.output_names
        model.compile(c["optimizer"], c["loss"] if len(names) > 1 else c["loss"][0],
                      c["metrics"] if len(names) > 1 else c["metrics"][0], c["loss_weights"])
    checkpoint.restore_arrays(model, arrays, str(path))
    return model
