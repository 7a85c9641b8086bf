"""Config -> compiled model. Names were checked by the config schema; shapes are checked here, before any data."""
import re

from dlcli.engine.layer import clear_session, set_random_seed
from dlcli.errors import ConfigError
from dlcli.memory import check_training_fits


def build_model(config: dict):
    """The compiled model a resolved config describes, its weights initialised from `config['seed']`."""
    import dlcli.layers  # noqa: F401  (registers every layer family)
    from dlcli.models import from_config

    clear_session()
    set_random_seed(int(config.get("seed", 0)))
    model = from_config({"name": config.get("name"), **config["model"]})
    apply_freeze(model, config.get("train", {}).get("freeze") or [])
    compile_spec = config.get("compile", {})
    model.compile(optimizer=compile_spec.get("optimizer", "rmsprop"), loss=compile_spec.get("loss"),
                  metrics=compile_spec.get("metrics") or [], loss_weights=compile_spec.get("loss_weights"))
    # before any data, optimizer state or activation is allocated
    check_training_fits(model, int(config.get("train", {}).get("batch_size", 32)))
    return model


def apply_freeze(model, patterns: list[str]):
    """`train.freeze: ["conv.*"]`: layers whose names fully match a pattern stop training."""
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"train.freeze: '{pattern}' is not a valid regular expression ({e})") from None
        matched = [layer for layer in model.layers if regex.fullmatch(layer.name)]
        if not matched:
            names = ", ".join(layer.name for layer in model.layers)
            raise ConfigError(f"train.freeze: pattern '{pattern}' matches no layer; layers: {names}")
        for layer in matched:
            layer.trainable = False
