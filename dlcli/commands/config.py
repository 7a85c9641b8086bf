"""`dlcli config CONFIG [--set ...]`: print the fully resolved config (extends merged, overrides applied, defaults
filled), as LightningCLI's --print_config does."""
from pathlib import Path
from typing import Annotated

import typer

from dlcli.commands.base import SetOption, app, handles_errors


@app.command("config")
@handles_errors
def config_command(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/mnist_sweep.yaml.")],
    set_: SetOption = [],
):
    """Print the fully resolved YAML of a config: every extends: merged, --set applied, defaults filled in.

    Example: dlcli config configs/mnist_sweep.yaml --set train.epochs=1

    The output is itself a complete config: dlcli config a.yaml > resolved.yaml && dlcli train resolved.yaml
    """
    from dlcli.config import dump_yaml, load_config

    print(dump_yaml(load_config(config, list(set_)).to_dict()), end="")
