"""dlcli: Keras-shaped deep learning on NumPy, driven from YAML configs.

`dlcli.train("configs/mnist.yaml", overrides=["train.epochs=1"])` runs what `dlcli train` runs and returns the Run;
`from dlcli import layers, models, optimizers, losses, metrics` works as in Keras. Everything loads lazily so
`dlcli --help` stays fast.
"""
import importlib

__version__ = "0.1.0"
_SUBMODULES = {"layers", "models", "optimizers", "losses", "metrics", "callbacks", "schedules", "data", "config",
               "builder", "runs", "trainer"}
_ENTRY_POINTS = {"train": "experiment", "Run": "experiment"}


def __getattr__(name):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(f"dlcli.{_ENTRY_POINTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"dlcli.{name}")
    raise AttributeError(f"module 'dlcli' has no attribute '{name}'")
