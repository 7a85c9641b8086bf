"""Configs: YAML -> a validated `Config`, with every error in the file reported at once.

Two passes over the parsed YAML, both collecting errors instead of stopping at the first:
1. the fixed schema (pydantic models below, unknown keys forbidden): `name`, `seed`, sections and their plain fields;
2. the named specs: `data`, each layer, optimizer, loss, metric and callback is looked up in its closed registry
   and its other keys are bound to the constructor's signature and checked against its annotations.
Each error names the file and line (or the `--set` that wrote the value), the YAML path, what was expected and what
was found, with a did-you-mean for misspelt names and keys. Nothing here loads data or builds a model.
"""
import difflib
import functools
import math
import re
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from dlcli.errors import ConfigError
from dlcli.extends import compose_document
from dlcli.registry import did_you_mean, is_size, parameters
from dlcli.yaml_lines import Document, Override, apply_override, dump_yaml, format_path

__all__ = ["Config", "Override", "as_config", "load_config", "parse_config", "validate_config", "dump_yaml",
           "split_spec"]


# --- the fixed schema -------------------------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # Config.to_dict() is computed once


# A dimension a model can hold: positive, and small enough that shape arithmetic cannot overflow int64 (a model
# this large is refused later by its memory estimate, with the figures).
MAX_DIM = 2**31 - 1
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # NumPy and Keras take unsigned 32-bit seeds
RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")  # a run name becomes a directory name: never a path


class InputConfig(_Section):
    """One named input of a functional model."""

    name: str
    shape: Annotated[list[Dim], Field(min_length=1)] | None = None  # None: a table feature's width (output_mode dict)
    dtype: str = "float32"


class ModelConfig(_Section):
    type: Literal["sequential", "functional"] = "sequential"
    input_shape: Annotated[list[Dim], Field(min_length=1)] | None = None  # sequential (or `input_shape` on the first layer)
    input_dtype: str | None = None
    inputs: list[InputConfig] | None = None  # functional
    layers: list[dict[str, Any]] = Field(min_length=1)
    outputs: list[str] | None = None  # functional


class CompileConfig(_Section):
    optimizer: str | dict[str, Any] = "rmsprop"
    loss: str | dict[str, Any]
    loss_weights: list[float] | dict[str, float] | None = None
    metrics: list[str | dict[str, Any]] | dict[str, Any] = []


class TrainConfig(_Section):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    # null means no validation split, as 0 does (and is stored as 0.0, so the two never differ in a diff)
    validation_split: Annotated[float, BeforeValidator(lambda v: 0.0 if v is None else v)] = Field(0.0, ge=0.0, lt=1.0)
    stratify: bool = False
    shuffle: bool = True
    callbacks: list[str | dict[str, Any]] = []
    freeze: list[str] = []  # regular expressions matched against whole layer names
    # {class: weight}, or "balanced": n_samples / (n_classes * class count) on the training split (scikit-learn's)
    class_weight: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=0, allow_inf_nan=False)]] | \
        Literal["balanced"] | None = None
    checkpoint_every: int | None = Field(None, ge=1)  # batches between mid-epoch checkpoints
    # stop as diverged when the loss exceeds this many times its early value (dlcli.trainer); null: NaN/inf only
    divergence_factor: float | None = Field(1e4, gt=1, allow_inf_nan=False)
    kfold: int | None = Field(None, ge=2)  # K runs on K folds of the training data, in one run directory


class SweepParameter(_Section):
    """One searched value: `{type: float, low, high, log}`, `{type: int, low, high, step}`, `{type: categorical,
    choices}` (Optuna's suggest_float / suggest_int / suggest_categorical)."""

    type: Literal["float", "int", "categorical"]
    low: int | float | None = None  # int first: an int parameter's bounds print as 32, not 32.0
    high: int | float | None = None
    step: int | float | None = Field(None, gt=0)
    log: bool = False
    choices: list[Any] | None = Field(None, min_length=1)


class SweepConfig(_Section):
    metric: str = "val_loss"  # a history.csv column; its best epoch's value is the trial's value
    direction: Literal["minimize", "maximize"] | None = None  # inferred from the metric's name when not given
    trials: int = Field(20, ge=1)
    sampler: str | dict[str, Any] = "tpe"  # tpe | random | grid, or {type: tpe, **Optuna's arguments}
    pruner: str | dict[str, Any] = "median"  # median | hyperband | none, or {type: median, n_startup_trials: 5}
    seed: int | None = None  # the sampler's seed (default: the config's seed)
    parameters: dict[str, SweepParameter] = Field(min_length=1)  # dotted --set paths -> what to search


class Config(_Section):
    name: str
    seed: Seed = 0
    data: dict[str, Any]
    model: ModelConfig
    compile: CompileConfig
    train: TrainConfig = TrainConfig()
    sweep: SweepConfig | None = None  # read by `dlcli sweep`; `dlcli train` ignores it

    def to_dict(self) -> dict:
        """The fully resolved config as plain data, computed once: what a run's config.yaml holds, what its
        fingerprint hashes and MLflow logs; parses back to an equal Config. Shared: copy before changing it."""
        return self._dumped

    def model_copy(self, *, update=None, deep=False):
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("_dumped", None)  # the copy's own values, not the original's plain form
        return copy

    @functools.cached_property
    def _dumped(self) -> dict:
        out = _plain(self.model_dump(mode="python"))
        out["model"] = {k: v for k, v in out["model"].items() if v is not None}
        if out["compile"]["loss_weights"] is None:
            del out["compile"]["loss_weights"]
        if out["train"]["kfold"] is None:
            del out["train"]["kfold"]
        if out["sweep"] is None:
            del out["sweep"]
        else:
            out["sweep"]["parameters"] = {k: {f: v for f, v in p.items() if v is not None and (f != "log" or v)}
                                          for k, p in out["sweep"]["parameters"].items()}
        return out


def _resolve_optimizer(doc: Document):
    """`rmsprop` or `{type: rmsprop, learning_rate: 0.001}` becomes every argument the optimizer takes (its
    Keras-style get_config), so two configs naming the same optimizer do not differ in `dlcli config`, `runs compare`
    or a resume's diff."""
    from dlcli.errors import DlcliError

    compile_ = doc.data["compile"]
    try:
        compile_["optimizer"] = registry("optimizer").create(compile_.get("optimizer", "rmsprop")).get_config()
    except DlcliError as e:  # arguments the signature allows but not together (clipnorm and clipvalue)
        doc.issues.append(doc.issue(("compile", "optimizer"), e.message))
        _raise(doc)


# Paths whose contents the second pass checks (so the first pass does not report them twice, less clearly).
_SPEC_FIELDS = {("data",), ("model", "layers"), ("compile", "optimizer"), ("compile", "loss"),
                ("compile", "loss_weights"), ("compile", "metrics"), ("train", "callbacks")}


# --- entry points -------------------------------------------------------------------------------------------------
def load_config(path, overrides: typing.Sequence = ()) -> Config:
    """Read, override (`--set key.path=value` texts or `Override`s, in order) and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    return parse_config(text, str(path), overrides)


def parse_config(text: str, source: str = "<config>", overrides: typing.Sequence = ()) -> Config:
    """Validate `text` (read from `source`, the base for `extends:` paths) with overrides applied: `--set` texts or
    `Override`s (`--seed`, `--name`, a sweep trial's values)."""
    doc = compose_document(text, source, _promotable)
    if doc.issues and doc.data is None:
        _raise(doc)  # a syntax error or a broken extends chain: nothing further to check
    return _validate(doc, overrides)


def validate_config(data: dict, source: str, overrides: typing.Sequence = ()) -> Config:
    """Plain data (`Config.to_dict()`, a run's recorded config, an imported model's) checked as a file's would be,
    with overrides applied; no YAML is rendered or parsed again. Errors name `source` and the override."""
    return _validate(Document(source, _plain(data)), overrides)


def _validate(doc: Document, overrides) -> Config:
    if doc.data is None:
        doc.data = {}
    if not isinstance(doc.data, dict):
        doc.issues.append(doc.issue((), f"expected a mapping of sections (name, seed, data, model, compile, "
                                        f"train) at the top level, found {_found(doc.data)}"))
        _raise(doc)
    for position, override in enumerate(overrides):
        apply_override(doc, override, position, _promotable)
    doc.data.setdefault("name", re.sub(r"[^A-Za-z0-9._-]", "-", Path(doc.source).stem)[:100] or "run")
    _check_schema(doc)
    _SpecChecker(doc).check(doc.data)
    if not doc.issues:
        _check_sweep(doc)
    if doc.issues:
        _raise(doc)
    _resolve_optimizer(doc)
    try:
        return Config.model_validate(doc.data)
    except ValidationError as e:  # a safety net: pass 1 leaves spec contents to pass 2, which should catch all
        doc.issues.extend(_schema_issue(doc, err, tuple(p for p in err["loc"] if p != "[key]")) for err in e.errors())
        _raise(doc)


def as_config(config) -> Config:
    """A Config as is; a resolved config's plain data (`Config.to_dict()`, a run's config.yaml) as a Config again."""
    return config if isinstance(config, Config) else Config.model_validate(config)


def split_spec(spec) -> tuple[str, dict]:
    """`'adam'` or `{type: adam, learning_rate: 0.01}` -> ('adam', {'learning_rate': 0.01})."""
    if isinstance(spec, str):
        return spec, {}
    args = dict(spec)
    return args.pop("type"), args


def _raise(doc: Document):
    issues = sorted(doc.issues, key=lambda i: i.order)
    count = f"{len(issues)} error{'s' if len(issues) != 1 else ''}"
    error = ConfigError(f"invalid config {doc.source} ({count}):\n" + "\n".join(str(i) for i in issues))
    error.issues = issues
    raise error


def _promotable(path) -> bool:
    """Places where a name may stand for `{type: name}`: `--set` can set arguments into them."""
    return (path in (("compile", "optimizer"), ("compile", "loss")) or path[:2] == ("train", "callbacks")
            or (path[:2] == ("compile", "loss") and len(path) == 3) or path[:2] == ("compile", "metrics"))


# --- pass 1: the fixed schema -------------------------------------------------------------------------------------
def _check_schema(doc: Document):
    try:
        Config.model_validate(doc.data)
    except ValidationError as e:
        for err in e.errors():
            # a union of a mapping and a literal (class_weight: {0: 2.0} or "balanced"): pydantic tags each
            # member's errors with its type ("dict[...]", "literal[...]"); a name given is judged against the
            # literal only, anything else against the other member
            tags = [p for p in err["loc"] if isinstance(p, str) and "[" in p]
            if tags and isinstance(_value_at(doc.data, err["loc"][:err["loc"].index(tags[0])]), str) \
                    != tags[0].startswith("literal["):
                continue
            path = tuple(p for p in err["loc"] if p != "[key]" and p not in tags)
            if any(path[:len(s)] == s and len(path) > len(s) for s in _SPEC_FIELDS):
                continue  # inside a spec: pass 2 says what is wrong there, by name
            doc.issues.append(_schema_issue(doc, err, path))


def _value_at(data, loc):
    for part in loc:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _schema_issue(doc: Document, err: dict, path: tuple):
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        return doc.issue(path[:-1], f"missing required key '{path[-1]}'", at_key=True)
    if kind == "extra_forbidden":
        known = _model_fields(path[:-1])
        return doc.issue(path, _unknown_key(path[-1], known, _section_name(path[:-1])), at_key=True)
    if "[key]" in err["loc"]:
        return doc.issue(path, f"expected {_expected(err)} as key, found {_found(path[-1])}", at_key=True)
    hint = did_you_mean(value, re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))) \
        if kind == "literal_error" else ""
    return doc.issue(path, f"expected {_expected(err)}, found {_found(value)}{hint}")


def _model_fields(path) -> list[str]:
    cls = Config
    for part in path:
        if isinstance(part, int):
            continue
        if part not in cls.model_fields:
            return []
        cls = _inner_model(cls.model_fields[part].annotation)
        if cls is None:
            return []
    return list(cls.model_fields)


def _inner_model(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # list[InputConfig] | None -> InputConfig
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def _section_name(path) -> str:
    return format_path(path) if path else "the top level"


_EXPECTED = {"int": "an integer", "float": "a number", "finite_number": "a finite number", "bool": "true or false",
             "string": "a string", "list": "a list", "tuple": "a list", "dict": "a mapping", "model": "a mapping",
             "model_attributes": "a mapping", "mapping": "a mapping", "none_required": "null"}


def _expected(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    base = kind.split("_")[0] if kind.split("_")[0] in ("int", "float", "bool") else kind.removesuffix("_type")
    if base in _EXPECTED:
        return _EXPECTED[base]
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        return f"a value {bounds[kind]} {next(iter(ctx.values()))}"
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind == "too_short":
        return f"at least {ctx.get('min_length')} item{'s' if ctx.get('min_length') != 1 else ''}"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} items"
    msg = err.get("msg", kind)
    return msg[:1].lower() + msg[1:].removeprefix("nput should be ").removeprefix("Input should be ")


def _found(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        text = repr(list(value))
        return f"the list {text}" if len(text) <= 40 else f"a list of {len(value)} items"
    return f"a {type(value).__name__}"


def _unknown_key(key, known, where: str) -> str:
    return f"unknown key '{key}'{did_you_mean(key, known)}; {where} takes: {', '.join(map(str, known))}"


# --- pass 2: names and their arguments ----------------------------------------------------------------------------
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
    """The registry of `kind`: dataset, layer, optimizer, loss, metric, callback, activation or initializer."""
    return _registries()[kind]


@functools.cache
def _registries() -> dict:
    # importing a package fills its registry (each entry registers where it is defined); here rather than at the
    # top so that `dlcli --help` stays fast
    from dlcli import callbacks, data, layers, losses, metrics, optimizers
    from dlcli.engine import activations, initializers

    return {"dataset": data.DATASETS, "layer": layers.LAYERS, "optimizer": optimizers.OPTIMIZERS,
            "loss": losses.LOSSES, "metric": metrics.METRICS, "callback": callbacks.CALLBACKS,
            "activation": activations.ACTIVATIONS, "initializer": initializers.INITIALIZERS}


class _SpecChecker:
    def __init__(self, doc: Document):
        self.doc = doc

    def error(self, path, message, at_key=False):
        self.doc.issues.append(self.doc.issue(path, message, at_key))

    def check(self, data: dict):
        name = data.get("name")
        if isinstance(name, str) and (not RUN_NAME.fullmatch(name) or name in (".", "..")):
            self.error(("name",), f"expected a plain file name (letters, digits, '.', '-', '_'; at most 100 "
                                  f"characters) because the run directory is named after it, found {_found(name)}")
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
            self.error(path, f"expected {expected}, found {_found(spec)}")
            return
        if "type" not in spec:
            self.error(path, f"missing required key 'type' (the {kind} name)", at_key=True)
            return
        target = self.name(spec["type"], (*path, "type"), kind)
        if target is None:
            return
        params, open_ = parameters(target, skip_data_args=kind in ("loss", "metric"))
        for k in params:  # an activation may be a mapping with its arguments, whatever a layer's annotation says
            if k.endswith("activation") and params[k][0] is not None:
                params[k] = (params[k][0] | dict, params[k][1])
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
            spec[key] = self.value(value, params[key][0], (*path, key))
            self.named_argument(key, spec[key], (*path, key))
            if len(self.doc.issues) == before:  # one error per value: the annotation's, else the bounds'
                self.bounded_argument(key, spec[key], (*path, key), is_size(params[key][0]))
        for key, (_, needed) in params.items():
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
                self.error(path, f"expected {what}, found {_found(value)}")
                return

    def name(self, name, path, kind, aliases=()):
        """The registered object `name` refers to; None (after reporting) if unknown, or if not checkable."""
        if not isinstance(name, str):
            self.error(path, f"expected a {kind} name, found {_found(name)}")
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
        adapter = _adapter(annotation)
        if adapter is None:
            return value
        try:
            return _plain(adapter.validate_python(value))
        except ValidationError as e:
            errors = e.errors()
            if len(errors) == 1 and all(isinstance(p, int) for p in errors[0]["loc"]):
                loc = errors[0]["loc"]
                self.error((*path, *loc), f"expected {_expected(errors[0])}, found {_found(errors[0]['input'])}")
            else:
                self.error(path, f"expected {_describe(annotation)}, found {_found(value)}")
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
                self.error(path, f"expected a layer mapping like {{type: Dense, units: 10}}, found {_found(layer)}")
                continue
            if not functional:
                for key in _FUNCTIONAL_KEYS:
                    if key in layer:
                        self.error((*path, key), f"'{key}' is only for functional models "
                                                 f"(model.type: functional)", at_key=True)
            if functional and "shares" in layer and "type" not in layer:
                for key in layer:
                    if key not in ("name", "inputs", "shares"):
                        self.error((*path, key), f"a layer that shares another's weights takes only name, inputs "
                                                 f"and shares; found '{key}'", at_key=True)
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
        table = isinstance(self.doc.data.get("data"), dict) and self.doc.data["data"].get("type") == "table"
        if model.get("input_shape") is None and first.get("input_shape") is None and not table:
            self.error(("model",), "missing required key 'input_shape' (the shape of one sample, without the batch "
                                   "axis, e.g. [28, 28]); or give input_shape on the first layer", at_key=True)
        for key in ("inputs", "outputs"):
            if key in model:
                self.error(("model", key), f"'{key}' is only for functional models (model.type: functional)",
                           at_key=True)
        return None

    def graph(self, model: dict, layers: list):
        """Functional wiring: every name a layer reads, shares or outputs must exist."""
        for key, example in (("inputs", "[{name: img, shape: [28, 28, 1]}]"), ("outputs", "[out]")):
            if not model.get(key):
                self.error(("model",), f"a functional model needs '{key}', e.g. {key}: {example}", at_key=True)
        if model.get("input_shape") is not None:
            self.error(("model", "input_shape"), "functional models declare their inputs under 'inputs' "
                                                 "(a list of {name, shape}), not input_shape", at_key=True)
        inputs = [i.get("name") for i in model.get("inputs") or [] if isinstance(i, dict)]
        data = self.doc.data.get("data") if isinstance(self.doc.data.get("data"), dict) else {}
        dict_table = data.get("type") == "table" and data.get("output_mode") == "dict"
        for i, entry in enumerate(model.get("inputs") or []):
            if isinstance(entry, dict) and entry.get("shape") is None and not dict_table:
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
                self.error(path, f"expected the name of {what}, found {_found(ref)}")
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
            self.error(path, f"expected a list of metric names like [accuracy], found {_found(items)}")
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


# --- sweep parameters --------------------------------------------------------------------------------------------
def sweep_values(spec: dict) -> list:
    """The values that bound a sweep parameter's range (low and high, every choice): checking them against the
    schema checks what any trial could be given."""
    if spec.get("type") == "categorical":
        return list(spec.get("choices") or [])
    cast = int if spec.get("type") == "int" else float
    return [cast(spec[k]) for k in ("low", "high") if isinstance(spec.get(k), (int, float))]


def _check_sweep(doc: Document):
    """Each `sweep.parameters` path is checked as the `--set` a trial will get, at both ends of its range (and every
    choice), so a misspelt path or a value the schema rejects fails before any trial runs, at the parameter's line."""
    import copy

    sweep = doc.data.get("sweep")
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        return
    for key, known in (("sampler", ("tpe", "random", "grid")), ("pruner", ("median", "hyperband", "none"))):
        value = sweep.get(key)
        name = value.get("type") if isinstance(value, dict) else value
        if value is not None and name not in known:
            doc.issues.append(doc.issue(("sweep", key), f"unknown {key} {name!r}{did_you_mean(name, known)}; "
                                                        f"known: {', '.join(known)}"))
    for name, spec in sweep["parameters"].items():
        path = ("sweep", "parameters", name)
        kind = spec.get("type")
        if kind in ("float", "int"):
            missing = [k for k in ("low", "high") if spec.get(k) is None]
            if missing:
                doc.issues.append(doc.issue(path, f"a {kind} parameter needs low and high; missing "
                                                  f"{' and '.join(missing)}", at_key=True))
                continue
            bad = [f"{k} {spec[k]}" for k in ("low", "high", "step") if isinstance(spec.get(k), float)
                   and not math.isfinite(spec[k])]
            if bad:  # NaN compares false to everything, so no check below would catch it; Optuna would overflow
                doc.issues.append(doc.issue(path, f"low, high and step must be finite numbers; found "
                                                  f"{' and '.join(bad)}", at_key=True))
                continue
            if spec["low"] > spec["high"]:
                doc.issues.append(doc.issue(path, f"low ({spec['low']}) must not be above high ({spec['high']})",
                                            at_key=True))
            step = spec.get("step")
            numbers = [spec["low"], spec["high"], step]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) and step > 0 \
                    and spec["low"] <= spec["high"]:
                # Optuna would quietly search only up to the last step below high (with a warning per process)
                span = Decimal(str(spec["high"])) - Decimal(str(spec["low"]))
                if span % Decimal(str(step)):
                    last = float(Decimal(str(spec["high"])) - span % Decimal(str(step)))
                    doc.issues.append(doc.issue(path, f"high - low ({float(span):g}) is not a multiple of step "
                                                      f"({step}); the last value reached would be {last:g}: make "
                                                      f"high {last:g}", at_key=True))
            if spec.get("log") and spec["low"] <= 0:
                doc.issues.append(doc.issue(path, f"a log-scale range needs low > 0; found {spec['low']}",
                                            at_key=True))
            if spec.get("log") and spec.get("step") is not None:
                doc.issues.append(doc.issue(path, "give step or log: true, not both (Optuna samples a log range "
                                                  "continuously)", at_key=True))
            if kind == "int" and any(spec.get(k) is not None and float(spec[k]) != int(spec[k])
                                     for k in ("low", "high", "step")):
                doc.issues.append(doc.issue(path, "an int parameter needs whole numbers for low, high and step",
                                            at_key=True))
        elif kind == "categorical" and not spec.get("choices"):
            doc.issues.append(doc.issue(path, "a categorical parameter needs choices: [...]", at_key=True))
            continue
        if str(name).split(".")[0] in ("sweep", "name"):
            doc.issues.append(doc.issue(path, f"'{name}' cannot be searched (only model, data, compile, train "
                                              f"and seed fields)", at_key=True))
            continue
        seen = set()
        for value in sweep_values(spec):
            trial = Document(doc.source, copy.deepcopy(doc.data), dict(doc.lines), dict(doc.key_lines),
                             dict(doc.overrides), [], list(doc.files))
            trial.data.pop("sweep")
            apply_override(trial, Override(name, value, f"sweep.parameters.{name}"), 0, _promotable)
            _check_schema(trial)
            _SpecChecker(trial).check(trial.data)
            for issue in trial.issues:
                text = issue.message if issue.path in ("", name) else f"{issue.path}: {issue.message}"
                if text not in seen:
                    seen.add(text)
                    doc.issues.append(doc.issue(path, f"with the value {value!r}: {text}", at_key=True))


# --- values against annotations -------------------------------------------------------------------------------------
_ADAPTERS: dict = {}


def _adapter(annotation):
    if annotation is None:
        return None
    try:
        if annotation not in _ADAPTERS:
            try:
                _ADAPTERS[annotation] = TypeAdapter(annotation)
            except Exception:  # an annotation pydantic cannot check (a custom class): leave it to the constructor
                _ADAPTERS[annotation] = None
        return _ADAPTERS[annotation]
    except TypeError:  # unhashable annotation
        return None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
               list: "a list", dict: "a mapping", tuple: "a list"}


def _describe(annotation) -> str:
    """'int | tuple[int, int]' -> 'an integer or a list of 2 integers'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _describe(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple) and args:
        if origin is tuple and Ellipsis not in args:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_plural(args[0])}"
            return "a list of (" + ", ".join(_describe(a) for a in args) + ")"
        return f"a list of {_plural(args[0])}"
    if origin is dict and args:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    if annotation in _TYPE_WORDS:
        return _TYPE_WORDS[annotation]
    if origin in _TYPE_WORDS:
        return _TYPE_WORDS[origin]
    return getattr(annotation, "__name__", str(annotation))


def _plural(annotation) -> str:
    words = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
    return words.get(annotation, f"({_describe(annotation)})")


def _plain(value):
    """Pydantic may return tuples; configs hold lists (YAML has no tuples)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value

