"""Layers, one family per module. Importing this package registers every layer a config may name (each class's
@register in its own module); `layers.Dense` and `from dlcli.layers import Dense` look the name up in that registry,
so a new layer in an existing module needs no line here."""
from dlcli.engine.graph import Input, InputLayer
from dlcli.engine.layer import LAYERS, Layer
from dlcli.layers import (activations, applications, attention, categorical, color, conv, core,  # noqa: F401
                          embedding, merge, normalization, pooling, preprocessing, recurrent, regularization,
                          reshaping, transformer, wrappers)


def __getattr__(name: str):
    if name in LAYERS:
        return LAYERS.get(name)
    raise AttributeError(f"module 'dlcli.layers' has no attribute '{name}'")


def __dir__():
    return sorted([*globals(), *LAYERS])


__all__ = ["LAYERS", "Layer", "Input", "InputLayer", *LAYERS.names()]
