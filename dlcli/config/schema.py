"""The fixed schema (pydantic models, unknown keys forbidden): `name`, `seed`, the sections and their plain fields;
and pass 1, which checks a document against it and reports every error with its line."""
import functools
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from dlcli.config.describe import expected, found, plain
from dlcli.registry import did_you_mean
from dlcli.yaml_lines import Document, format_path


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
    # Keras' MixUp or CutMix on every training batch's inputs and targets (dlcli.mixing): {type: MixUp, alpha: 0.2}
    mix: str | dict[str, Any] | None = None


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
        out = plain(self.model_dump(mode="python"))
        out["model"] = {k: v for k, v in out["model"].items() if v is not None}
        if out["compile"]["loss_weights"] is None:
            del out["compile"]["loss_weights"]
        for key in ("kfold", "mix"):  # unset: left out, so earlier runs' configs and fingerprints stay as they were
            if out["train"][key] is None:
                del out["train"][key]
        if out["sweep"] is None:
            del out["sweep"]
        else:
            out["sweep"]["parameters"] = {k: {f: v for f, v in p.items() if v is not None and (f != "log" or v)}
                                          for k, p in out["sweep"]["parameters"].items()}
        return out


# Paths whose contents the second pass checks (so the first pass does not report them twice, less clearly).
_SPEC_FIELDS = {("data",), ("model", "layers"), ("compile", "optimizer"), ("compile", "loss"),
                ("compile", "loss_weights"), ("compile", "metrics"), ("train", "callbacks")}



def check_schema(doc: Document):
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
            doc.issues.append(schema_issue(doc, err, path))


def _value_at(data, loc):
    for part in loc:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def schema_issue(doc: Document, err: dict, path: tuple):
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        return doc.issue(path[:-1], f"missing required key '{path[-1]}'", at_key=True)
    if kind == "extra_forbidden":
        known, where = _model_fields(path[:-1]), format_path(path[:-1]) if path[:-1] else "the top level"
        return doc.issue(path, f"unknown key '{path[-1]}'{did_you_mean(path[-1], known)}; {where} takes: "
                               f"{', '.join(map(str, known))}", at_key=True)
    if "[key]" in err["loc"]:
        return doc.issue(path, f"expected {expected(err)} as key, found {found(path[-1])}", at_key=True)
    hint = did_you_mean(value, re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))) \
        if kind == "literal_error" else ""
    return doc.issue(path, f"expected {expected(err)}, found {found(value)}{hint}")


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
