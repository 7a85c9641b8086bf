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


def describe(target, family: str) -> str:
    params, _ = parameters(target, skip_data_args=family in ("losses", "metrics"))
    shown = []
    for arg, (_, required, default) in params.items():
        if family == "layers" and arg in _LAYER_BASE:
            continue
        shown.append(f"{arg} (required)" if required or default is inspect.Parameter.empty else f"{arg}={default!r}")
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
