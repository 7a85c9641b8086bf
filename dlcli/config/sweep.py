"""The `sweep:` section's checks: each searched path is tried as the override a trial will get, at both ends of its
range and with every choice, so a misspelt path or a value the schema refuses fails before any trial runs."""
import copy
import math
from decimal import Decimal

from dlcli.config.schema import check_schema
from dlcli.config.specs import SpecChecker, promotable
from dlcli.registry import did_you_mean
from dlcli.yaml_lines import Document, Override, apply_override


def sweep_values(spec: dict) -> list:
    """The values that bound a sweep parameter's range (low and high, every choice): checking them against the
    schema checks what any trial could be given."""
    if spec.get("type") == "categorical":
        return list(spec.get("choices") or [])
    cast = int if spec.get("type") == "int" else float
    return [cast(spec[k]) for k in ("low", "high") if isinstance(spec.get(k), (int, float))]


def check_sweep(doc: Document):
    """Each `sweep.parameters` path is checked as the `--set` a trial will get, at both ends of its range (and every
    choice), so a misspelt path or a value the schema rejects fails before any trial runs, at the parameter's line."""
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
            apply_override(trial, Override(name, value, f"sweep.parameters.{name}"), 0, promotable)
            check_schema(trial)
            SpecChecker(trial).check(trial.data)
            for issue in trial.issues:
                text = issue.message if issue.path in ("", name) else f"{issue.path}: {issue.message}"
                if text not in seen:
                    seen.add(text)
                    doc.issues.append(doc.issue(path, f"with the value {value!r}: {text}", at_key=True))
