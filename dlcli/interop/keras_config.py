"""A Keras 3 model config (config.json) as a dlcli config, read as data only.

Every `class_name` goes through one of dlcli's closed registries (layers, initializers, optimizers, losses) or a
short table of Keras bookkeeping classes; anything else (Lambda, custom objects, classes from modules outside
Keras) is refused by name, so nothing in a model file can make dlcli import or run code. A Keras argument dlcli
has no equivalent for is accepted only at the value that means "off" (data_format channels_last, groups 1 ...);
otherwise the import fails naming the layer and the argument. Settings that only matter when training from scratch
(an initializer dlcli lacks, a weight constraint) are dropped with a note.
"""
import re

import dlcli.layers  # noqa: F401  (registers every layer name the mapping may use)
from dlcli.engine.layer import LAYERS, snake_case
from dlcli.errors import DlcliError
from dlcli.mixing import MIXES
from dlcli.registry import parameters

# Keras arguments dlcli does not have, and the values at which they change nothing.
NEUTRAL = {
    "data_format": ("channels_last", None), "groups": (1,), "lora_rank": (None,), "lora_alpha": (None,),
    "quantization_config": (None,), "stateful": (False,), "sparse": (False,), "ragged": (False,),
    "optional": (False,), "synchronized": (False,), "renorm": (False,), "rms_scaling": (False,),
    "time_major": (False,), "use_cudnn": None, "unroll": None, "implementation": None, "seed": None,
    "renorm_clipping": None, "renorm_momentum": None, "zero_output_for_mask": None, "dtype": None,
    "use_gate": (False,), "flash_attention": None, "decoder_sequence_shape": None, "encoder_sequence_shape": None,
    # StringLookup's config carries IndexLookup's: text is always FarmHashed out of vocabulary, its dtype string
    "oov_method": None, "vocabulary_dtype": ("string",),
}  # None: any value (performance switches, seeds: dlcli seeds every layer from the run)
TRAINING_ONLY = re.compile(r".*_constraint$|^activity_regularizer$")
KERAS_MODULE = re.compile(r"^keras(\.[A-Za-z0-9_.]+)?$")
LAYER_MODULE = re.compile(r"^keras(\.src)?\.layers(\.[A-Za-z0-9_.]+)?$")
HUB_MODULE = re.compile(r"^keras_hub\.src\.layers(\.[A-Za-z0-9_.]+)?$")  # KerasHub's layers (keras_package)


def _hub_layer(obj: dict) -> bool:
    """A KerasHub layer dlcli has (TransformerEncoder ...): its module and registered name are KerasHub's."""
    name = obj.get("class_name")
    return (HUB_MODULE.match(str(obj.get("module"))) is not None and obj.get("registered_name") == f"keras_hub>{name}"
            and name in LAYERS and LAYERS.get(name).keras_package == "keras_hub")


# keras.ops calls recorded in a functional model (ConvNeXt's residual `x + y`) that are exactly a dlcli layer:
# elementwise on tensors of one shape (the layer's build refuses others), nothing to train, no arguments.
OPERATION_LAYERS = {("keras.src.ops.numpy", "Add"): "Add", ("keras.src.ops.numpy", "Multiply"): "Multiply",
                    ("keras.src.ops.numpy", "Subtract"): "Subtract"}


def _nested_model(entry: dict) -> bool:
    """A Keras model used as a layer (module 'keras' for Sequential, keras.src.models.* for a functional one)."""
    return entry.get("class_name") in ("Sequential", "Functional", "Model") and (
        entry.get("module") == "keras" or str(entry.get("module")).startswith("keras.src.models"))


APPLICATIONS_MODULE = re.compile(r"^keras\.src\.applications\.[a-z0-9_]+$")  # keras.applications' own layers


def _application_layer(obj: dict) -> bool:
    """A layer keras.applications defines for its models that dlcli has (ConvNeXt's LayerScale): its module is an
    application's and its registered name its class name."""
    name = obj.get("class_name")
    return (APPLICATIONS_MODULE.match(str(obj.get("module"))) is not None and obj.get("registered_name") == name
            and name in LAYERS and LAYERS.get(name).keras_package == "keras.applications")


class UnsupportedModel(DlcliError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


def _check_object(obj: dict, where: str):
    """A serialized Keras object must come from Keras itself: its module, registered name and class."""
    module, registered = obj.get("module"), obj.get("registered_name")
    name = obj.get("class_name")
    if name in ("Lambda", "__lambda__", "function", "TFOpLambda", "__passive_serialization__"):
        raise UnsupportedModel(f"{where} is a Keras {name}: it holds Python code, which dlcli never runs; rebuild "
                               f"it from built-in layers")
    if _hub_layer(obj):
        return
    if module is not None and not KERAS_MODULE.match(str(module)):
        raise UnsupportedModel(f"{where} is class '{name}' from module '{module}', outside Keras: custom objects "
                               f"are refused (dlcli maps only Keras' built-in classes to its own)")
    if registered not in (None, name):
        raise UnsupportedModel(f"{where} is a custom object registered as '{registered}'; dlcli maps only "
                               f"Keras' built-in classes")


class ConfigMapper:
    def __init__(self, notes: list):
        self.notes = notes

    # --- the model ------------------------------------------------------------------------------------------------
    def model(self, config: dict) -> dict:
        """The `model:` section for a Keras Sequential or Functional config."""
        try:
            return self._model(config)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a crafted or damaged config
            raise UnsupportedModel(f"config.json does not have the structure Keras writes ({type(e).__name__}: "
                                   f"{str(e)[:120]})") from None

    def _model(self, config: dict) -> dict:
        if not isinstance(config, dict) or "class_name" not in config:
            raise UnsupportedModel("config.json does not describe a Keras model (no class_name)")
        _check_object(config, "the model")
        kind, body = config["class_name"], config.get("config") or {}
        if kind == "Sequential":
            return self._sequential(body)
        if kind in ("Functional", "Model"):
            return self._functional(body)
        raise UnsupportedModel(f"the model is a Keras '{kind}'; dlcli imports Sequential and Functional models "
                               f"(a subclassed Model's code is not in the file)")

    def _sequential(self, body) -> dict:
        entries = list(body.get("layers") or [])
        spec = {"type": "sequential", "name": body.get("name") or "sequential", "layers": []}
        if entries and entries[0].get("class_name") == "InputLayer":
            first = entries.pop(0)
            _check_object(first, "the input layer")
            shape, dtype = self._input(first["config"])
            spec["input_shape"] = shape
        else:
            shape, dtype = self._first_shape(entries)
            spec["input_shape"] = shape
        if dtype != "float32":
            spec["input_dtype"] = dtype
        spec["layers"] = [self.layer(x) for e in entries for x in self._inlined(e)]
        return spec

    def _inlined(self, e) -> list:
        """[e], or for a nested Sequential its layers (nested ones inlined in turn): the same chain of layers."""
        if not _nested_model(e):
            return [e]
        name = (e.get("config") or {}).get("name", "?")
        _check_object(e, f"layer '{name}'")
        if e["class_name"] != "Sequential":
            raise UnsupportedModel(f"layer '{name}' is a Keras {e['class_name']} model nested in another model; "
                                   f"dlcli imports nested Sequential models (call a nested functional model's "
                                   f"layers in the outer model instead)")
        inner = [x for x in e["config"].get("layers") or [] if x.get("class_name") != "InputLayer"]
        if e["config"].get("trainable") is False:  # a frozen nested model freezes its layers
            inner = [{**x, "config": {**x["config"], "trainable": False}} for x in inner]
        return [y for x in inner for y in self._inlined(x)]

    def _first_shape(self, entries):
        """A Sequential saved without an InputLayer: the first layer's batch_input_shape (Keras 2) or build shape."""
        if entries:
            cfg = entries[0].get("config", {})
            shape = cfg.get("batch_input_shape") or (entries[0].get("build_config") or {}).get("input_shape")
            if shape:
                return self._input({"name": cfg.get("name"), "batch_shape": shape,
                                    "dtype": cfg.get("dtype") if isinstance(cfg.get("dtype"), str) else "float32"})
        raise UnsupportedModel("the Sequential model has no input shape (it was never built); build it in Keras "
                               "with an Input before saving")

    def _input(self, cfg) -> tuple[list, str]:
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if not shape or any(s is None for s in shape[1:]):
            raise UnsupportedModel(f"input '{cfg.get('name')}' has shape {shape}; dlcli needs every axis but the "
                                   f"batch fixed")
        dtype = cfg.get("dtype") if isinstance(cfg.get("dtype"), str) else "float32"
        if dtype not in ("float32", "int32", "int64", "string"):
            raise UnsupportedModel(f"input '{cfg.get('name')}' has dtype {dtype}; dlcli takes float32, int32, int64 "
                                   f"and string (read by a StringLookup, Hashing or HashedCrossing)")
        return [int(s) for s in shape[1:]], dtype

    def _functional(self, body) -> dict:
        entries = list(body.get("layers") or [])
        inputs, layers, refs, later = [], [], {}, []
        multi = {}
        self._entries = {e.get("name") or e["config"]["name"]: e for e in entries}
        self._mask_ops = {}
        for e in entries:
            _check_object(e, f"layer '{e.get('config', {}).get('name', '?')}'")
            name = e.get("name") or e["config"]["name"]
            if self._mask_op(name, e):
                continue
            if e["class_name"] == "InputLayer":
                shape, dtype = self._input(e["config"])
                inputs.append({"name": name, "shape": shape, **({"dtype": dtype} if dtype != "float32" else {})})
                refs[(name, 0)] = name
                continue
            if _nested_model(e):
                layers += self._nested_sequential(e, name, refs, multi)
                continue
            if (e.get("module"), e["class_name"]) in OPERATION_LAYERS:
                layers.append(self._operation(e, name, refs, multi))
                continue
            spec = self.layer(e)
            multi[name] = bool(spec.get("return_state")) or (spec["type"] == "Bidirectional"
                                                            and spec.get("merge_mode", "concat") is None)
            for i, node in enumerate(e.get("inbound_nodes") or []):
                if i > 0 and not _ready(node, refs):
                    later.append((name, spec, i, node))  # reads a layer config.json lists later (tied logits)
                    continue
                layers.append(self._call(name, spec, i, node, refs, multi))
            while ready := [c for c in later if _ready(c[3], refs)]:
                for c in ready:
                    later.remove(c)
                    layers.append(self._call(*c, refs, multi))
        for c in later:  # a reference that never appears: _call names it
            layers.append(self._call(*c, refs, multi))
        heads = body.get("output_layers") or []
        if heads and isinstance(heads[0], str):  # one output: Keras writes [name, node, index] unwrapped
            heads = [heads]
        outputs = [self._ref(t, refs, multi, "the model's outputs") for t in heads]
        return {"type": "functional", "name": body.get("name") or "model", "inputs": inputs, "layers": layers,
                "outputs": outputs}

    def _call(self, name, spec, i, node, refs, multi) -> dict:
        """The YAML entry of call i of layer `name`: the layer itself for the first, a `shares` entry after."""
        entry = dict(spec) if i == 0 else {"name": f"{name}_call{i}", "shares": name}
        cls = LAYERS.get(spec["type"])
        entry["inputs"], call_args = self._node_inputs(node, name, refs, multi, cls)
        entry.update({a: call_args.pop(a) for a in list(call_args) if a in cls.call_arguments})
        if i == 0:
            entry.update(call_args)
            spec.update(call_args)
            multi[name] = multi[name] or bool(call_args.get("return_attention_scores"))
        elif any(spec.get(a) != v for a, v in call_args.items()):
            raise UnsupportedModel(f"layer '{name}' is called with {call_args} here and differently before; "
                                   f"dlcli gives a shared layer one setting")
        refs[(name, i)] = entry["name"]
        return entry

    def _operation(self, e, name, refs, multi) -> dict:
        """keras.ops.add/multiply/subtract in a functional model: on two tensors the layer Add/Multiply/Subtract, on
        a tensor and a number (MobileNetV3's hard sigmoid, relu6(x + 3) * (1 / 6)) a Rescaling, y = x * scale +
        offset, exact for these (x * 1 + c, x * c + 0)."""
        kind, node = e["class_name"], (e.get("inbound_nodes") or [{}])[0]
        args, extra = list(node.get("args") or []), set(e.get("config") or {}) - {"name"}
        tensors = [a for a in args if _history(a)]
        numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if extra or node.get("kwargs") or len(e.get("inbound_nodes") or []) != 1 or len(args) != 2 \
                or len(tensors) + len(numbers) != 2 or not tensors:
            raise UnsupportedModel(f"'{name}' is keras.ops.{snake_case(kind)} on {str(args)[:80]}; dlcli maps it on "
                                   f"two tensors, or on a tensor and a number")
        refs[(name, 0)], multi[name] = name, False
        if len(tensors) == 2:
            return {"type": OPERATION_LAYERS[(e["module"], kind)], "name": name,
                    "inputs": [self._tensor(t, refs, multi, name) for t in tensors]}
        c = float(numbers[0])
        scale, offset = {"Add": (1.0, c), "Multiply": (c, 0.0),
                         "Subtract": (1.0, -c) if _history(args[0]) else (-1.0, c)}[kind]
        return {"type": "Rescaling", "name": name, "scale": scale, "offset": offset,
                "inputs": self._tensor(tensors[0], refs, multi, name)}

    def _nested_sequential(self, e, name, refs, multi) -> list:
        """A Sequential called inside a functional model (ConvNeXt's stem and downsampling blocks) as its layers
        chained in the outer graph: what reads the nested model reads its last layer."""
        nodes = e.get("inbound_nodes") or []
        if e["class_name"] == "Sequential" and len(nodes) != 1:
            raise UnsupportedModel(f"the nested Sequential '{name}' is called {len(nodes)} times; dlcli imports a "
                                   f"nested Sequential called once")
        specs = [self.layer(x) for x in self._inlined(e)]
        if not specs:
            raise UnsupportedModel(f"the nested Sequential '{name}' has no layers")
        source, _ = self._node_inputs(nodes[0], name, refs, multi, LAYERS.get("Identity"))
        for spec in specs:
            if spec["name"] in self._entries or [s["name"] for s in specs].count(spec["name"]) > 1:
                raise UnsupportedModel(f"layer '{spec['name']}' in the nested Sequential '{name}' has the name of "
                                       f"another layer; dlcli's graph needs one name per layer")
            spec["inputs"], source = source, spec["name"]
            multi[spec["name"]] = False
        refs[(name, 0)] = source
        return specs

    # Keras 3 records a Masking layer's mask in a functional model as ops: not_equal(x, v) -> any(axis=-1) -> the
    # next layer's `mask=` argument. dlcli's Masking carries that same mask implicitly, so the pattern is checked and
    # dropped; any other op, or an explicit mask of another origin, is refused by name.
    def _mask_op(self, name, e) -> bool:
        kind, node = e.get("class_name"), (e.get("inbound_nodes") or [{}])[0]
        if not str(e.get("module", "")).startswith("keras.src.ops") or kind not in ("NotEqual", "Any"):
            return False
        args = node.get("args") or []
        source = _history(args[0]) if args else None
        if kind == "NotEqual" and source and len(args) == 2 and isinstance(args[1], (int, float)):
            self._mask_ops[name] = (source[0], float(args[1]))
            return True
        cfg = e.get("config") or {}
        if kind == "Any" and source and source[0] in self._mask_ops and cfg.get("axis") == -1 \
                and not cfg.get("keepdims"):
            self._mask_ops[name] = self._mask_ops[source[0]]
            return True
        raise UnsupportedModel(f"'{name}' is a Keras {kind} operation outside the mask pattern Masking records; "
                               f"dlcli imports layers, not free-standing ops")

    def _implicit_mask(self, layer, args, mask) -> bool:
        """True when `mask` is the one a Masking layer or an Embedding(mask_zero=True) upstream of `layer` already
        gives it in dlcli."""
        produced = _history(mask)
        data = _history(args[0]) if args else None
        if not produced or produced[0] not in self._mask_ops or not data:
            return False
        return self._mask_start_upstream(*self._mask_ops[produced[0]], data[0])

    def _mask_start_upstream(self, source, value, start) -> bool:
        """not_equal(source, value) (with any(axis=-1) for Masking) is the mask a Masking(mask_value=value) or, for
        value 0, an Embedding(mask_zero=True) reading `source` starts (Keras records it as ops wherever a layer's
        mask reaches a call, stacked recurrent layers included); dlcli propagates that mask itself when such a layer
        is upstream of the data."""
        seen, stack = set(), [start]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            entry = self._entries.get(name, {})
            reads = [h for n in entry.get("inbound_nodes") or [] for h in map(_history, _flat(n.get("args"))) if h]
            config = entry.get("config") or {}
            if [source, 0, 0] in reads and (
                    entry.get("class_name") == "Masking" and float(config.get("mask_value", 0.0)) == value
                    or value == 0 and config.get("mask_zero") is True):
                return True
            stack += [h[0] for h in reads]
        return False

    def _node_inputs(self, node, layer, refs, multi, cls):
        """(the call's input reference(s), layer arguments the call sets): the layer class maps Keras' call
        arguments (MultiHeadAttention(query, value, key, use_causal_mask=...)) to dlcli's inputs."""
        args, kwargs = list(node.get("args") or []), dict(node.get("kwargs") or {})
        if kwargs.get("mask") is not None and self._implicit_mask(layer, args, kwargs["mask"]):
            kwargs.pop("mask")
        args, call_args = cls.keras_call(args, kwargs)
        extra = {k: v for k, v in kwargs.items() if not (k in ("training", "mask") and v in (None, False))}
        if extra or not args:
            raise UnsupportedModel(f"layer '{layer}' is called with {', '.join(sorted(extra)) or 'no tensor'}; dlcli "
                                   f"imports calls on tensors (and the call arguments its layer takes as settings)")
        if len(args) > 1:
            return [self._tensor(t, refs, multi, layer) for t in args], call_args
        if isinstance(args[0], list):
            return [self._tensor(t, refs, multi, layer) for t in args[0]], call_args
        return self._tensor(args[0], refs, multi, layer), call_args

    def _tensor(self, t, refs, multi, layer):
        if not isinstance(t, dict) or t.get("class_name") != "__keras_tensor__":
            raise UnsupportedModel(f"layer '{layer}' is called on {str(t)[:60]}, not a Keras tensor")
        return self._ref(t["config"]["keras_history"], refs, multi, f"layer '{layer}'")

    def _ref(self, history, refs, multi, where):
        name, node, index = history[0], int(history[1]), int(history[2])
        if (name, node) not in refs:
            raise UnsupportedModel(f"{where} reads '{name}' (call {node}), which comes later in config.json or does "
                                   f"not exist")
        ref = refs[(name, node)]
        return f"{ref}:{index}" if multi.get(name) else ref

    # --- one layer ------------------------------------------------------------------------------------------------
    def layer(self, entry: dict) -> dict:
        name = (entry.get("config") or {}).get("name", "?")
        _check_object(entry, f"layer '{name}'")
        kind = entry.get("class_name")
        module = entry.get("module")
        if module is not None and not LAYER_MODULE.match(str(module)) and not _hub_layer(entry) \
                and not _application_layer(entry):
            raise UnsupportedModel(f"'{name}' is a Keras {kind} from {module}, an operation rather than a layer; "
                                   f"dlcli imports layers")
        if kind in MIXES:
            raise UnsupportedModel(f"layer '{name}' is a Keras {kind}, which mixes labels as well as images: dlcli "
                                   f"applies it to training batches with train.mix: {{type: {kind}}}, not in a model")
        if kind not in LAYERS:
            raise UnsupportedModel(f"layer '{name}' is a Keras {kind}, which dlcli does not have; dlcli imports "
                                   f"{', '.join(LAYERS.names())}")
        cls = LAYERS.get(kind)
        accepted = set(parameters(cls)[0])
        spec = {"type": kind}
        for key, value in (entry.get("config") or {}).items():
            where = f"layer '{name}' ({kind}) argument '{key}'"
            if key == "dtype":
                self._dtype(value, f"layer '{name}'")
            elif TRAINING_ONLY.match(key):
                if isinstance(value, dict):
                    _check_object(value, where)
                if value is not None:
                    self.notes.append(f"{where} ({_class(value)}) dropped: dlcli has no constraints or activity "
                                      f"regularizers; it only matters when training")
            elif key in accepted:
                spec[key] = self._value(key, value, where)
            elif key in NEUTRAL:
                if NEUTRAL[key] is not None and value not in NEUTRAL[key]:
                    raise UnsupportedModel(f"{where} is {value!r}; dlcli only implements {NEUTRAL[key][0]!r}")
            else:
                raise UnsupportedModel(f"{where} = {value!r} has no dlcli equivalent")
        return spec

    def _dtype(self, value, where):
        name = value.get("config", {}).get("name") if isinstance(value, dict) else value
        if isinstance(value, dict):
            _check_object(value, f"{where}'s dtype policy")
        if name not in (None, "float32"):
            raise UnsupportedModel(f"{where} computes in {name}; dlcli imports float32 models")

    def _value(self, key, value, where):
        if isinstance(value, dict) and "class_name" in value:
            _check_object(value, where)
            if key in ("layer", "backward_layer", "cell"):
                return self.layer(value)
            if key.endswith("_initializer"):
                return self._initializer(value, where)
            if key.endswith("_regularizer"):
                return self._regularizer(value, where)
            raise UnsupportedModel(f"{where} is a Keras {value['class_name']} object, which dlcli cannot map")
        if isinstance(value, dict):
            raise UnsupportedModel(f"{where} = {str(value)[:80]} has no dlcli equivalent")
        if key == "cells" and isinstance(value, list):  # StackedRNNCells' cells
            return [self.layer(v) for v in value]
        return value

    def _initializer(self, value, where):
        from dlcli.engine.initializers import INITIALIZERS

        name = snake_case(value["class_name"])
        if name not in INITIALIZERS:
            self.notes.append(f"{where} ({value['class_name']}) replaced by dlcli's default: it only matters when "
                              f"training from scratch")
            return _DROP
        cls = INITIALIZERS.get(name)
        params, _ = parameters(cls)
        args = {k: v for k, v in (value.get("config") or {}).items() if k in params and v is not None}
        return {"type": name, **args} if args else name

    def _regularizer(self, value, where):
        kind, cfg = value["class_name"], value.get("config") or {}
        if kind in ("L1", "L2", "L1L2"):
            return {k: float(cfg[k]) for k in ("l1", "l2") if k in cfg}
        raise UnsupportedModel(f"{where} is a Keras {kind} regularizer; dlcli has L1, L2 and L1L2")

    # --- compile settings -----------------------------------------------------------------------------------------
    def compile(self, compile_config, outputs: list[str], activations: list[str]) -> dict:
        from dlcli.losses import LOSSES

        cc = compile_config or {}
        out = {"optimizer": "rmsprop", "loss": None, "metrics": []}
        opt = cc.get("optimizer")
        if isinstance(opt, dict):
            spec, missing = _optimizer(opt)
            if missing:
                self.notes.append(f"{missing}; rmsprop is set instead (training only)")
            else:
                out["optimizer"] = spec
        losses = cc.get("loss")
        losses = losses if isinstance(losses, list) else [losses] * len(outputs) if losses is not None else []
        mapped = []
        for loss, activation in zip(losses or [None] * len(outputs), activations):
            if isinstance(loss, dict):
                _check_object(loss, "the loss")
                loss = loss.get("class_name")
            if loss not in LOSSES:
                guess = {"softmax": "sparse_categorical_crossentropy", "sigmoid": "binary_crossentropy"}.get(
                    activation, "mean_squared_error")
                self.notes.append(f"loss {loss!r} is not one dlcli knows; {guess} is set (change it with --set "
                                  f"compile.loss=...)")
                loss = guess
            mapped.append(loss)
        out["loss"] = mapped[0] if len(mapped) == 1 else dict(zip(outputs, mapped))  # dlcli keys them by output
        metrics = cc.get("metrics")
        if isinstance(metrics, list) and len(outputs) == 1 and all(isinstance(m, str) for m in metrics):
            out["metrics"] = metrics
        elif metrics:
            self.notes.append("compile metrics other than a list of names were not imported")
        return out


_DROP = object()


def _history(tensor):
    """[layer, node, index] of a serialized Keras tensor, or None."""
    if isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__":
        return list(tensor["config"]["keras_history"])
    return None


def _optimizer(opt: dict) -> tuple[dict | None, str | None]:
    """(dlcli's spec of a serialized Keras optimizer, None), or (None, what dlcli lacks); a MultiOptimizer's
    OptimizerMap with its inner optimizers. A crafted object is refused (_check_object)."""
    from dlcli.optimizers import OPTIMIZERS

    _check_object(opt, "the optimizer")
    kind, cfg = opt.get("class_name"), opt.get("config") or {}
    if kind not in OPTIMIZERS:
        return None, f"optimizer {kind} is not in dlcli"
    if kind == "MultiOptimizer":
        mapping = cfg.get("optimizer_map") if isinstance(cfg.get("optimizer_map"), dict) else {}
        if mapping.get("class_name") != "OptimizerMap":
            return None, "the MultiOptimizer maps weights with a Python function, not an OptimizerMap"
        _check_object(mapping, "the MultiOptimizer's map")
        mapping = mapping.get("config") or {}
        if not isinstance(mapping.get("default_optimizer"), dict):
            return None, "the MultiOptimizer's OptimizerMap has no default_optimizer"
        inner = {"default_optimizer": _optimizer(mapping["default_optimizer"])}
        inner.update({str(k): _optimizer(v) for k, v in (mapping.get("optimizer_map") or {}).items()})
        missing = next((m for _, m in inner.values() if m), None)
        default = inner.pop("default_optimizer")[0]
        return (None, missing) if missing else ({"type": kind, "optimizer_map": {
            "default_optimizer": default, "optimizer_map": {k: spec for k, (spec, _) in inner.items()}}}, None)
    params, _ = parameters(OPTIMIZERS.get(kind))
    args = {k: v for k, v in cfg.items() if k in params and v is not None and not isinstance(v, dict)}
    if "learning_rate" in args:
        args["learning_rate"] = float(f"{args['learning_rate']:.6g}")  # float32 0.0099999 -> 0.01
    return {"type": kind.lower() if kind.lower() in OPTIMIZERS else kind, **args}, None


def _ready(node, refs) -> bool:
    """Whether every tensor a Keras call reads is already imported."""
    tensors = _flat([*(node.get("args") or []), *(node.get("kwargs") or {}).values()])
    return all((h[0], int(h[1])) in refs for h in map(_history, tensors) if h)


def _flat(args) -> list:
    """Call arguments with nested lists (a merge's list of tensors) flattened."""
    out = []
    for a in args or []:
        out += _flat(a) if isinstance(a, list) else [a]
    return out


def _class(value) -> str:
    return value.get("class_name", "?") if isinstance(value, dict) else repr(value)


def without_dropped(value):
    """The mapped config with settings marked for dropping (unknown initializers) removed."""
    if isinstance(value, dict):
        return {k: without_dropped(v) for k, v in value.items() if v is not _DROP}
    if isinstance(value, list):
        return [without_dropped(v) for v in value]
    return value
