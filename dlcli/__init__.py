"""dlcli: Keras-shaped deep learning on NumPy, driven from YAML configs.

`from dlcli import layers, models, optimizers, losses, metrics` works as in Keras; submodules load lazily so
`dlcli --help` stays fast.
"""
import importlib

__version__ = "0.1.0"
_SUBMODULES = {"layers", "models", "optimizers", "losses", "metrics", "callbacks", "schedules", "data", "config",
               "builder", "runs", "trainer"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"dlcli.{name}")
    raise AttributeError(f"module 'dlcli' has no attribute '{name}'")
