"""Layers by family; importing this package registers every layer name a config may use."""
from dlcli.engine.graph import Input, InputLayer
from dlcli.engine.layer import LAYERS, Layer
from dlcli.layers.core import Activation, Dense, Dropout, Flatten, Reshape

__all__ = ["LAYERS", "Layer", "Input", "InputLayer", "Dense", "Activation", "Flatten", "Reshape", "Dropout"]
