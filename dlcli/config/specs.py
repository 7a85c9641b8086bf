"""Pass 2: the named specs. `data`, each layer, optimizer, loss, metric and callback is looked up in its closed
registry, and its other keys are bound to the constructor's signature (dlcli.registry.parameters, the binder
Registry.create uses too) and checked against its annotations and the bounds below."""
import difflib
import functools
import re

from pydantic import ValidationError

from dlcli.config.describe import describe, expected, found, plain, type_adapter
from dlcli.config.schema import MAX_DIM, RUN_NAME
from dlcli.registry import did_you_mean, is_size, parameters
from dlcli.yaml_lines import Document


def promotable(path) -> bool:
    """Places where a name may stand for `{type: name}`: `--set` can set arguments into them."""
    return (path in (("compile", "optimizer"), ("compile", "loss"), ("train", "mix")) or path[:2] == ("train", "callbacks")
            or (path[:2] == ("compile", "loss") and len(path) == 3) or path[:2] == ("compile", "metrics"))


# Arguments whose values a signature's annotation cannot bound: sizes (annotated Size, Sizes or Shape in their
# signature) are positive integers (or lists of them), rates and learning rates are finite and non-negative.
# (low, high, what a valid value is)
_SIZE_BOUNDS = (1, MAX_DIM, f"a positive integer (at most {MAX_DIM}) or a list of them")
_BOUNDS = {"rate": (0.0, 1.0, "a number in [0, 1)"), "dropout": (0.0, 1.0, "a number in [0, 1)"),
           "recurrent_dropout": (0.0, 1.0, "a number in [0, 1)"),
           "learning_rate": (0.0, None, "a finite number >= 0 (or a schedule)"),
           "initial_learning_rate": (0.0, None, "a finite number >= 0"),
           "warmup_target": (0.0, None, "a finite number >= 0"),
           "clipnorm": (0.0, None, "a finite number >= 0"), "global_clipnorm": (0.0, None, "a finite number >= 0"),
           "clipvalue": (0.0, None, "a finite number >= 0"), "epsilon": (0.0, None, "a finite number >= 0")}
_FUNCTIONAL_KEYS = ("inputs", "shares")
# Bare names resolved outside the registry: 'accuracy' becomes the variant that fits the loss (metrics.resolve).
_BARE_ALIASES = {"metric": ("accuracy", "acc")}


def registry(kind: str):
    """The registry of `kind`: dataset, layer, optimizer, loss, metric, callback, activation, initializer or batch
    mix."""
    return _registries()[kind]


@functools.cache
def _registries() -> dict:
    # importing a package fills its registry (each entry registers where it is defined); here rather than at the
    # top so that `dlcli --help` stays fast
    from dlcli import callbacks, data, layers, losses, metrics, mixing, optimizers
    from dlcli.engine import activations, initializers

    return {"dataset": data.DATASETS, "layer": layers.LAYERS, "optimizer": optimizers.OPTIMIZERS,
            "loss": losses.LOSSES, "metric": metrics.METRICS, "callback": callbacks.CALLBACKS,
            "activation": activations.ACTIVATIONS, "initializer": initializers.INITIALIZERS,
            "batch mix": mixing.MIXES}


class SpecChecker:
    def __init__(self, doc: Document):
        self.doc = doc

    def error(self, path, message, at_key=False):
        self.doc.issues.append(self.doc.issue(path, message, at_key))

    def data_type(self):
        """The DatasetType of the data section (the defaults when it names no registered type)."""
        from dlcli.data import dataset_type  # the loaders register on import: not at `dlcli --help`

        data = self.doc.data.get("data")
        return dataset_type(data if isinstance(data, dict) and isinstance(data.get("type"), str) else {})

    def check(self, data: dict):
        name = data.get("name")
        if isinstance(name, str) and (not RUN_NAME.fullmatch(name) or name in (".", "..")):
            self.error(("name",), f"expected a plain file name (letters, digits, '.', '-', '_'; at most 100 "
                                  f"characters) because the run directory is named after it, found {found(name)}")
        if isinstance(data.get("data"), dict):
            self.spec(data["data"], ("data",), "dataset")
        model = data.get("model")
        outputs = None
        self.functional = isinstance(model, dict) and model.get("type") == "functional"
        if isinstance(model, dict):
            outputs = self.model(model)
        compile_ = data.get("compile")
        if isinstance(compile_, dict):
            self.compile(compile_, outputs)
        train = data.get("train")
        if isinstance(train, dict):
            self.train(train)

    # --- one `{type: name, **args}` spec -------------------------------------------------------------------------
    def spec(self, spec, path, kind, extras=(), bare_name_ok=False, ignore=()):
        """Check `spec` (a mapping with `type`, or a bare name where allowed); arguments are coerced in place."""
        if isinstance(spec, str) and bare_name_ok:
            self.name(spec, path, kind, aliases=_BARE_ALIASES.get(kind, ()))
            return
        if not isinstance(spec, dict):
            expected = f"a {kind} name or a mapping with 'type'" if bare_name_ok else f"a mapping with 'type: <{kind}>'"
            self.error(path, f"expected {expected}, found {found(spec)}")
            return
        if "type" not in spec:
            self.error(path, f"missing required key 'type' (the {kind} name)", at_key=True)
            return
        target = self.name(spec["type"], (*path, "type"), kind)
        if target is None:
            return
        params, open_ = parameters(target, skip_data_args=kind in ("loss", "metric"))
        for k in params:  # an activation may be a mapping with its arguments, whatever a layer's annotation says
            if k.endswith("activation") and params[k].annotation is not None:
                params[k] = params[k]._replace(annotation=params[k].annotation | dict)
        allowed, meant = [*params, *extras], set()
        for key, value in spec.items():
            if key == "type" or key in extras or key in ignore:
                continue
            if key not in params:
                meant.update(difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6))
                if not open_:
                    self.error((*path, key), f"unknown key '{key}' for {spec['type']}{did_you_mean(key, allowed)}; "
                                             f"{spec['type']} takes: {', '.join(allowed) or 'no arguments'}",
                               at_key=True)
                continue
            before = len(self.doc.issues)
            spec[key] = self.value(value, params[key].annotation, (*path, key))
            self.named_argument(key, spec[key], (*path, key))
            if len(self.doc.issues) == before:  # one error per value: the annotation's, else the bounds'
                self.bounded_argument(key, spec[key], (*path, key), is_size(params[key].annotation))
        for key, (_, needed, _) in params.items():
            if needed and key not in spec and key not in meant:  # a misspelling of it was reported already
                self.error(path, f"missing required key '{key}' for {spec['type']}", at_key=True)

    def named_argument(self, key, value, path):
        """Arguments that name a registered object (activation='relu', kernel_initializer='he_normal')."""
        kind = "activation" if key.endswith("activation") else "initializer" if key.endswith("_initializer") else None
        if kind is None or value is None:
            return
        if isinstance(value, dict):
            self.spec(value, path, kind)  # {type: he_normal, seed: 1}, {type: soft_shrink, threshold: 0.3}
        elif isinstance(value, str):
            self.name(value, path, kind)

    def bounded_argument(self, key, value, path, size: bool):
        """Sizes, rates and learning rates in range (units: -5 would otherwise end in NumPy's traceback)."""
        if not (size or key in _BOUNDS) or value is None or (not size and isinstance(value, (str, dict))):
            return  # a learning-rate schedule (a name or a mapping): checked as such
        low, high, what = _SIZE_BOUNDS if size else _BOUNDS[key]
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, list):
                values.extend(v)  # nested pairs: ((0, 0), (1, 1))
                continue
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            integral = isinstance(high, int) and not isinstance(high, bool)
            if not number or (integral and not isinstance(v, int)) or v != v or v in (float("inf"), float("-inf")) \
                    or v < low or (high is not None and (v > high if integral else v >= high)):
                self.error(path, f"expected {what}, found {found(value)}")
                return

    def name(self, name, path, kind, aliases=()):
        """The registered object `name` refers to; None (after reporting) if unknown, or if not checkable."""
        if not isinstance(name, str):
            self.error(path, f"expected a {kind} name, found {found(name)}")
            return None
        known = registry(kind)
        if name.lower() in aliases:
            return None
        if name not in known:
            names = sorted([*known, *aliases])
            self.error(path, f"unknown {kind} '{name}'{did_you_mean(name, names)}; known: {', '.join(names)}")
            return None
        return known.get(name)

    def value(self, value, annotation, path):
        """`value` checked against `annotation` (pydantic, lax as YAML users expect); the coerced value if valid."""
        adapter = type_adapter(annotation)
        if adapter is None:
            return value
        try:
            return plain(adapter.validate_python(value))
        except ValidationError as e:
            errors = e.errors()
            if len(errors) == 1 and all(isinstance(p, int) for p in errors[0]["loc"]):
                loc = errors[0]["loc"]
                self.error((*path, *loc), f"expected {expected(errors[0])}, found {found(errors[0]['input'])}")
            else:
                self.error(path, f"expected {describe(annotation)}, found {found(value)}")
            return value

    # --- sections --------------------------------------------------------------------------------------------
    def model(self, model: dict):
        """Check the layers; returns the functional model's output names (None if not applicable)."""
        layers = model.get("layers")
        if not isinstance(layers, list):
            return None
        functional = model.get("type") == "functional"
        for i, layer in enumerate(layers):
            path = ("model", "layers", i)
            if not isinstance(layer, dict):
                self.error(path, f"expected a layer mapping like {{type: Dense, units: 10}}, found {found(layer)}")
                continue
            if not functional:
                for key in _FUNCTIONAL_KEYS:
                    if key in layer:
                        self.error((*path, key), f"'{key}' is only for functional models "
                                                 f"(model.type: functional)", at_key=True)
            if functional and "shares" in layer and "type" not in layer:
                call_args = self._call_arguments(layers, layer["shares"])
                for key in layer:
                    if key in call_args:
                        layer[key] = self.value(layer[key], type(call_args[key]), (*path, key))
                    elif key not in ("name", "inputs", "shares"):
                        takes = ", ".join(["name", "inputs", "shares", *call_args])
                        self.error((*path, key), f"a layer that shares another's weights takes only {takes}; found "
                                                 f"'{key}'", at_key=True)
            else:
                self.spec(layer, path, "layer", extras=_FUNCTIONAL_KEYS if functional else (),
                          ignore=_FUNCTIONAL_KEYS)  # misplaced ones were reported above
        if functional:
            return self.graph(model, layers)
        seen = set()
        for i, layer in enumerate(layers):
            name = layer.get("name") if isinstance(layer, dict) else None
            if isinstance(name, str) and name in seen:
                self.error(("model", "layers", i, "name"), f"duplicate layer name '{name}' (names must be unique)")
            seen.add(name)
        first = layers[0] if layers and isinstance(layers[0], dict) else {}
        if model.get("input_shape") is None and first.get("input_shape") is None \
                and not self.data_type().decides_input_shapes(functional=False):
            self.error(("model",), "missing required key 'input_shape' (the shape of one sample, without the batch "
                                   "axis, e.g. [28, 28]); or give input_shape on the first layer", at_key=True)
        for key in ("inputs", "outputs"):
            if key in model:
                self.error(("model", key), f"'{key}' is only for functional models (model.type: functional)",
                           at_key=True)
        return None

    @staticmethod
    def _call_arguments(layers, shared) -> dict:
        """The call arguments (Layer.call_arguments) an entry sharing layer `shared` may set, by the entry's type."""
        kind = next((e.get("type") for e in layers if isinstance(e, dict) and e.get("name") == shared), None)
        known = registry("layer")
        return getattr(known.get(kind), "call_arguments", {}) if isinstance(kind, str) and kind in known else {}

    def graph(self, model: dict, layers: list):
        """Functional wiring: every name a layer reads, shares or outputs must exist."""
        for key, example in (("inputs", "[{name: img, shape: [28, 28, 1]}]"), ("outputs", "[out]")):
            if not model.get(key):
                self.error(("model",), f"a functional model needs '{key}', e.g. {key}: {example}", at_key=True)
        if model.get("input_shape") is not None:
            self.error(("model", "input_shape"), "functional models declare their inputs under 'inputs' "
                                                 "(a list of {name, shape}), not input_shape", at_key=True)
        inputs = [i.get("name") for i in model.get("inputs") or [] if isinstance(i, dict)]
        data_shapes = self.data_type().decides_input_shapes(functional=True)
        for i, entry in enumerate(model.get("inputs") or []):
            if isinstance(entry, dict) and entry.get("shape") is None and not data_shapes:
                self.error(("model", "inputs", i), "missing required key 'shape' (the shape of one sample, e.g. "
                                                   "[28, 28, 1]; only a table's output_mode: dict fills it in)",
                           at_key=True)
        named = {}  # layer name -> index
        for i, layer in enumerate(layers):
            if isinstance(layer, dict) and isinstance(layer.get("name"), str):
                name = layer["name"]
                if name in named or name in inputs:
                    self.error(("model", "layers", i, "name"), f"duplicate name '{name}' (names must be unique "
                                                               f"across inputs and layers)")
                named.setdefault(name, i)
        tensors = [*filter(None, inputs), *named]

        def check_ref(ref, path, what):
            base = ref.split(":")[0] if isinstance(ref, str) and re.fullmatch(r".+:\d+", ref) else ref
            if not isinstance(ref, str):
                self.error(path, f"expected the name of {what}, found {found(ref)}")
            elif base not in tensors:
                self.error(path, f"unknown {what} '{ref}'{did_you_mean(ref, tensors)}; "
                                 f"known: {', '.join(map(str, tensors))}")

        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                continue
            path = ("model", "layers", i)
            refs = layer.get("inputs")
            if refs is None:
                self.error(path, "missing required key 'inputs' (the input or layer names this layer reads)",
                           at_key=True)
            for j, ref in enumerate(refs if isinstance(refs, list) else [refs] if refs is not None else []):
                check_ref(ref, (*path, "inputs", j) if isinstance(refs, list) else (*path, "inputs"), "input or layer")
            if "shares" in layer:
                shared = layer["shares"]
                if shared not in named:
                    self.error((*path, "shares"), f"unknown layer '{shared}'{did_you_mean(shared, named)}")
        outputs = model.get("outputs")
        if not isinstance(outputs, list):
            return None
        before = len(self.doc.issues)
        for j, ref in enumerate(outputs):
            check_ref(ref, ("model", "outputs", j), "layer")
        return outputs if len(self.doc.issues) == before else None

    def compile(self, compile_: dict, outputs):
        self.spec(compile_.get("optimizer", "rmsprop"), ("compile", "optimizer"), "optimizer", bare_name_ok=True)
        loss = compile_.get("loss")
        if isinstance(loss, dict) and "type" not in loss:
            self.per_output(loss, ("compile", "loss"), outputs, "loss")
            for name, item in loss.items():
                self.spec(item, ("compile", "loss", name), "loss", bare_name_ok=True)
        elif loss is not None:
            self.spec(loss, ("compile", "loss"), "loss", bare_name_ok=True)
        weights = compile_.get("loss_weights")
        if isinstance(weights, dict):
            self.per_output(weights, ("compile", "loss_weights"), outputs, "loss weight")
            for name, w in weights.items():
                compile_["loss_weights"][name] = self.value(w, float, ("compile", "loss_weights", name))
        elif weights is not None:
            compile_["loss_weights"] = self.value(weights, list[float], ("compile", "loss_weights"))
        metrics = compile_.get("metrics", [])
        if isinstance(metrics, dict):
            self.per_output(metrics, ("compile", "metrics"), outputs, "metrics")
            for name, items in metrics.items():
                self.metrics(items, ("compile", "metrics", name))
        else:
            self.metrics(metrics, ("compile", "metrics"))

    def metrics(self, items, path):
        if not isinstance(items, list):
            self.error(path, f"expected a list of metric names like [accuracy], found {found(items)}")
            return
        for j, item in enumerate(items):
            self.spec(item, (*path, j), "metric", bare_name_ok=True)

    def per_output(self, mapping: dict, path, outputs, what):
        if outputs is None and self.functional:
            return  # the outputs themselves are wrong (reported): keys cannot be checked against them
        if outputs is None:
            self.error(path, f"a mapping of output name -> {what} needs a functional model with named outputs")
            return
        for key in mapping:
            if key not in outputs:
                self.error((*path, key), f"unknown output '{key}'{did_you_mean(key, outputs)}; "
                                         f"outputs: {', '.join(outputs)}", at_key=True)

    def train(self, train: dict):
        if train.get("kfold") and train.get("validation_split"):
            self.error(("train", "kfold"), "K-fold validation holds out each fold in turn: remove "
                                           "train.validation_split (it would go unused)")
        if train.get("mix") is not None:
            self.spec(train["mix"], ("train", "mix"), "batch mix", bare_name_ok=True)
        callbacks = train.get("callbacks")
        if isinstance(callbacks, list):
            for j, cb in enumerate(callbacks):
                self.spec(cb, ("train", "callbacks", j), "callback", bare_name_ok=True)
        freeze = train.get("freeze")
        if isinstance(freeze, list):
            for j, pattern in enumerate(freeze):
                if isinstance(pattern, str):
                    try:
                        re.compile(pattern)
                    except re.error as e:
                        self.error(("train", "freeze", j), f"expected a regular expression matching layer names, "
                                                           f"found {pattern!r} ({e})")
