"""`dlcli list FAMILY`: the catalogue a config can name (layers, activations, losses, metrics, optimizers,
schedules, initializers, callbacks, datasets), each with its arguments and defaults, read from the registries."""
from typing import Annotated, Optional

import typer

from dlcli.commands.base import app, console, handles_errors

FAMILIES = ["layers", "activations", "losses", "metrics", "optimizers", "schedules", "initializers", "callbacks",
            "datasets"]


@app.command("list")
@handles_errors
def list_command(
    family: Annotated[str, typer.Argument(help=f"One of: {', '.join(FAMILIES)}.")],
    name: Annotated[Optional[str], typer.Argument(help="Only this entry (any of its names).")] = None,
):
    """List what a config can name in FAMILY, with every argument and its default.

    Example: dlcli list metrics | dlcli list layers Conv2D

    Names are Keras' (class names and their snake_case forms where Keras takes both); a misspelt name gets a
    did-you-mean. Layers also take name, trainable, lr_mult and input_shape.
    """
    from rich.table import Table

    from dlcli.catalogue import entries

    table = Table(show_lines=False, pad_edge=False)
    table.add_column("name")
    table.add_column("arguments (default)")
    for names, arguments in entries(family, name):
        table.add_row(", ".join(names), arguments or "-")
    console().print(table)
