"""`dlcli plot RUN_DIR...`: overlay several runs' training curves in one PNG."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import app, handles_errors


@app.command()
@handles_errors
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run directories.")],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="PNG to write (default: curves.png inside the run for one run, "
                               "compare.png in the current directory for several).")] = None,
):
    """Plot loss and each metric per epoch (train solid, validation dashed), one colour per run.

    Example: dlcli plot runs/mnist-mlp-20261124-101500 runs/mnist-cnn-20261124-113000 -o compare.png
    """
    from dlcli import run_files
    from dlcli.plots import plot_runs

    if output is None:
        output = run_files.RunDir(run_dirs[0]).curves if len(run_dirs) == 1 else Path("compare.png")
    print(f"wrote {plot_runs(run_dirs, output)}")
