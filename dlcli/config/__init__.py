"""Configs: YAML -> a validated `Config`, with every error in the file reported at once.

Two passes over the parsed YAML, both collecting errors instead of stopping at the first:
1. the fixed schema (schema.py: pydantic models, unknown keys forbidden): `name`, `seed`, sections and their plain
   fields;
2. the named specs (specs.py): `data`, each layer, optimizer, loss, metric and callback is looked up in its closed
   registry and its other keys are bound to the constructor's signature and checked against its annotations.
Each error names the file and line (or the `--set` that wrote the value), the YAML path, what was expected and what
was found, with a did-you-mean for misspelt names and keys (describe.py words them); sweep.py checks the
`sweep:` section. Nothing here loads data or builds a model.
"""
import re
import typing
from pathlib import Path

from pydantic import ValidationError

from dlcli.config.describe import found, plain
from dlcli.config.schema import Config, SweepConfig, check_schema, schema_issue
from dlcli.config.specs import SpecChecker, promotable, registry
from dlcli.config.sweep import check_sweep
from dlcli.errors import ConfigError
from dlcli.extends import compose_document
from dlcli.yaml_lines import Document, Override, apply_override, dump_yaml

__all__ = ["Config", "Override", "SweepConfig", "as_config", "dump_yaml", "load_config", "parse_config", "registry",
           "validate_config"]


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
    doc = compose_document(text, source, promotable)
    if doc.issues and doc.data is None:
        _raise(doc)  # a syntax error or a broken extends chain: nothing further to check
    return _validate(doc, overrides)


def validate_config(data: dict, source: str, overrides: typing.Sequence = ()) -> Config:
    """Plain data (`Config.to_dict()`, a run's recorded config, an imported model's) checked as a file's would be,
    with overrides applied; no YAML is rendered or parsed again. Errors name `source` and the override."""
    return _validate(Document(source, plain(data)), overrides)


def _validate(doc: Document, overrides) -> Config:
    if doc.data is None:
        doc.data = {}
    if not isinstance(doc.data, dict):
        doc.issues.append(doc.issue((), f"expected a mapping of sections (name, seed, data, model, compile, "
                                        f"train) at the top level, found {found(doc.data)}"))
        _raise(doc)
    for position, override in enumerate(overrides):
        apply_override(doc, override, position, promotable)
    doc.data.setdefault("name", re.sub(r"[^A-Za-z0-9._-]", "-", Path(doc.source).stem)[:100] or "run")
    check_schema(doc)
    SpecChecker(doc).check(doc.data)
    if not doc.issues:
        check_sweep(doc)
    if doc.issues:
        _raise(doc)
    _resolve_optimizer(doc)
    try:
        return Config.model_validate(doc.data)
    except ValidationError as e:  # a safety net: pass 1 leaves spec contents to pass 2, which should catch all
        doc.issues.extend(schema_issue(doc, err, tuple(p for p in err["loc"] if p != "[key]")) for err in e.errors())
        _raise(doc)


def as_config(config) -> Config:
    """A Config as is; a resolved config's plain data (`Config.to_dict()`, a run's config.yaml) as a Config again."""
    return config if isinstance(config, Config) else Config.model_validate(config)


def _raise(doc: Document):
    issues = sorted(doc.issues, key=lambda i: i.order)
    count = f"{len(issues)} error{'s' if len(issues) != 1 else ''}"
    error = ConfigError(f"invalid config {doc.source} ({count}):\n" + "\n".join(str(i) for i in issues))
    error.issues = issues
    raise error


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
