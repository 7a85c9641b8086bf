"""dlcli: Keras-shaped deep learning on NumPy, driven from YAML configs.

`dlcli.train("configs/mnist.yaml", overrides=["train.epochs=1"])` runs what `dlcli train` runs and returns the Run;
`from dlcli import layers, models, optimizers, losses, metrics` works as in Keras. Everything loads on first use so
`dlcli --help` stays fast.
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("train", "Run"):
        from dlcli import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module 'dlcli' has no attribute '{name}'")
