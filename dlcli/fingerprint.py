"""The config a run's weights were trained with: its fingerprint, recorded when the run starts, and the check that
an edited `config.yaml` is noticed before `evaluate`, `predict`, `export` or `--resume` trust it.

A run records `config_fingerprint` (SHA-256 of the resolved config as config.yaml holds it, keys sorted) and the
`config` itself in meta.json and in every checkpoint. Commands compare the run's config.yaml with the record: an
equal fingerprint is the fast path; otherwise both are resolved through today's schema and diffed (so a schema that
gained a default since the run was recorded is not a change). Runs recorded before fingerprints existed have none
and are trusted as before.
"""
import hashlib
import json

from dlcli.errors import DlcliError
from dlcli.run_files import RunDir

META_KEYS = ("config_fingerprint", "config")


def _digest(plain) -> str:
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def record(config: dict) -> dict:
    """What meta.json and the checkpoint header hold about the config the run trains with: `config` is plain data,
    a Config's `to_dict()` (as config.yaml holds it)."""
    return {"config_fingerprint": _digest(config), "config": config}


def recorded(run_dir, checkpoint: dict | None = None) -> dict | None:
    """The run's record ({config_fingerprint, config}): the checkpoint's when given, else meta.json's; None for a
    run recorded before fingerprints (or without a readable meta.json)."""
    if checkpoint is not None and checkpoint["header"].get("config_fingerprint"):
        return {k: checkpoint["header"].get(k) for k in META_KEYS}
    try:
        meta = json.loads((RunDir(run_dir).meta).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and isinstance(meta.get("config_fingerprint"), str) and isinstance(
            meta.get("config"), dict):
        return {k: meta[k] for k in META_KEYS}
    return None


def recorded_config(run_dir, checkpoint: dict | None = None) -> dict | None:
    """The recorded config resolved through today's schema (None without a record)."""
    record_ = recorded(run_dir, checkpoint)
    return None if record_ is None else _resolve(record_["config"], RunDir(run_dir).meta)


def _resolve(plain: dict, source) -> dict:
    from dlcli.config import validate_config
    from dlcli.errors import ConfigError

    try:
        return validate_config(plain, str(source)).to_dict()
    except ConfigError:  # today's schema refuses what was recorded: compare as recorded
        return plain


def changes(run_dir, config: dict, checkpoint: dict | None = None) -> list[tuple[str, object, object]]:
    """What `config` (the run's config.yaml, resolved) changes from what the run recorded (see `diff`); [] when
    unchanged or nothing was recorded."""
    record_ = recorded(run_dir, checkpoint)
    if record_ is None or record(config)["config_fingerprint"] == record_["config_fingerprint"]:
        return []
    return diff(_resolve(record_["config"], RunDir(run_dir).meta), config)


def diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted path, old value, new value) for every setting that differs; `name` never counts."""
    from dlcli.yaml_lines import flatten

    a, b = flatten(old), flatten(new)
    missing = object()
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b), key=str)
            if k != "name" and a.get(k, missing) != b.get(k, missing)]


def diff_lines(diff_) -> str:
    return "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diff_)


def check(run_dir, config: dict, allow_change: bool = False) -> str | None:
    """Refuse (exit 2, with the diff) a run whose config.yaml no longer matches the config its weights were trained
    with; with `allow_change`, return the diff text for the caller to show and go on."""
    diff = changes(run_dir, config)
    if not diff:
        return None
    shown = diff_lines(diff)
    if allow_change:
        return shown
    what = "the model" if any(k.startswith("model.") for k in (d[0] for d in diff)) else "settings"
    raise DlcliError(f"{RunDir(run_dir).config} was edited after the run was trained: it changes {what} "
                     f"from the config recorded in {RunDir(run_dir).meta} (config_fingerprint), so its "
                     f"weights may not mean what the file says:\n{shown}\nrestore config.yaml (meta.json's "
                     f"\"config\" holds the original), train a new run with the change (--init-from "
                     f"{run_dir} starts from these weights), or pass --allow-config-change to use the edited "
                     f"config anyway", exit_code=2)


# What may change on --resume with --allow-config-change; anything else would make the continuation another run.
RESUMABLE_CHANGES = ("train.epochs", "compile.optimizer.learning_rate")


def check_resume(old: dict, new: dict, allow_change: bool) -> list[str]:
    """Lines naming what a resume changes from the recorded config `old`; a DlcliError when the change cannot be
    resumed (architecture, data) or is not allowed."""
    found = diff(old, new)
    if not found:
        return []
    refused = [k for k, _, _ in found if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)]
    shown = diff_lines(found)
    if refused:
        what = "the architecture" if any(k.startswith("model.") for k in refused) else "settings"
        raise DlcliError(f"the config differs from the one the run was trained with (recorded in its meta.json and "
                         f"checkpoint) in {what} that a resumed run cannot change:\n{shown}\nonly "
                         f"{' and '.join(RESUMABLE_CHANGES)} may change on --resume; start a new run instead "
                         f"(--init-from RUN_DIR starts from its weights)", exit_code=2)
    if not allow_change:
        raise DlcliError(f"the config differs from the one the run was trained with (recorded in its meta.json and "
                         f"checkpoint):\n{shown}\npass --allow-config-change to resume with these changes, or drop "
                         f"them", exit_code=2)
    return shown.splitlines()
