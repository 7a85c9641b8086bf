"""Weight penalties that enter the loss: `penalty(w)` adds to the loss, `gradient(w)` to the weight's gradient."""
import numpy as np

from dlcli.errors import ConfigError


class Regularizer:
    """l1 * sum(|w|) + l2 * sum(w^2), with Keras' default factor 0.01 for the named forms."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        self.l1, self.l2 = float(l1), float(l2)

    def penalty(self, w) -> float:
        return float(self.l1 * np.abs(w).sum() + self.l2 * np.square(w).sum())

    def gradient(self, w):
        return self.l1 * np.sign(w) + 2 * self.l2 * w

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


def get(identifier):
    """None, 'l1' / 'l2' / 'l1_l2' (factor 0.01 as Keras), {l1: .., l2: ..} or a Regularizer."""
    if identifier is None or isinstance(identifier, Regularizer):
        return identifier
    if isinstance(identifier, str):
        named = {"l1": {"l1": 0.01}, "l2": {"l2": 0.01}, "l1_l2": {"l1": 0.01, "l2": 0.01}}
        if identifier not in named:
            raise ConfigError(f"unknown regularizer '{identifier}'; known: l1, l2, l1_l2 or {{l1: x, l2: y}}")
        return Regularizer(**named[identifier])
    if isinstance(identifier, dict):
        args = {k: v for k, v in identifier.items() if k != "type"}
        return Regularizer(**args)
    raise ConfigError(f"a regularizer is a name (l1, l2, l1_l2) or {{l1: x, l2: y}}; found {identifier!r}")


def serialize(reg):
    return None if reg is None else reg.get_config()
