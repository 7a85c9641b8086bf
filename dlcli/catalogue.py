"""The catalogue of registered names, grouped by object, with each one's arguments and defaults (`dlcli list`)."""
import inspect

from dlcli.errors import ConfigError
from dlcli.registry import did_you_mean, parameters

# family -> the registry's kind in dlcli.config (imported lazily: the registries import NumPy and the engine)
FAMILIES = {"layers": "layer", "activations": "activation", "losses": "loss", "metrics": "metric",
            "optimizers": "optimizer", "initializers": "initializer", "callbacks": "callback", "datasets": "dataset",
            "schedules": "schedule"}
_LAYER_BASE = ("name", "input_shape", "trainable", "lr_mult", "dtype")


def _registry(family: str):
    if family not in FAMILIES:
        raise ConfigError(f"unknown catalogue '{family}'{did_you_mean(family, FAMILIES)}; known: {', '.join(FAMILIES)}")
    if family == "schedules":
        from dlcli.schedules import SCHEDULES

        return SCHEDULES
    from dlcli.config import registry

    return registry(FAMILIES[family])


def _defaults(target) -> dict:
    """{argument: default} over the constructor and the parents it passes arguments on to."""
    found = {}
    functions = [k.__dict__["__init__"] for k in target.__mro__ if "__init__" in k.__dict__ and k is not object] \
        if inspect.isclass(target) else [target]
    for fn in functions:
        try:
            for p in inspect.signature(fn).parameters.values():
                if p.default is not p.empty:
                    found.setdefault(p.name, p.default)
        except (TypeError, ValueError):
            pass
    return found


def describe(target, family: str) -> str:
    params, _ = parameters(target, skip_data_args=family in ("losses", "metrics"))
    defaults = _defaults(target)
    shown = []
    for arg, (_, required) in params.items():
        if family == "layers" and arg in _LAYER_BASE:
            continue
        shown.append(f"{arg} (required)" if required or arg not in defaults else f"{arg}={defaults[arg]!r}")
    return ", ".join(shown)


def entries(family: str, name: str | None = None) -> list[tuple[list[str], str]]:
    """[(every name of one object, its arguments)] in name order; with `name`, only that object's entry."""
    reg = _registry(family)
    if name is not None:
        reg.get(name)  # an unknown name fails with a did-you-mean
    groups: dict[int, list[str]] = {}
    objects = {}
    for n in reg.names():
        obj = reg.get(n)
        groups.setdefault(id(obj), []).append(n)
        objects[id(obj)] = obj
    rows = []
    for key, names in groups.items():
        if name is not None and name not in names:
            continue
        rows.append((names, describe(objects[key], family)))
    return sorted(rows, key=lambda row: row[0][0].lower())
