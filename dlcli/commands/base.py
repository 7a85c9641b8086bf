"""What every command shares: the typer app, the rich console, `handles_errors` and the `--set` option.

Commands import from here (never from dlcli.cli), so the CLI is a tree: cli.py -> commands/* -> base.py -> library.
"""
import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Train deep-learning models described in YAML configs, on a NumPy engine with a Keras-shaped API.\n\n"
         "Examples:\n\n"
         "  dlcli train configs/mnist.yaml\n\n"
         "  dlcli train configs/mnist.yaml --set train.epochs=1 --set data.limit=2000\n\n"
         "  dlcli inspect-shapes configs/mnist_cnn.yaml\n\n"
         "  dlcli evaluate runs/mnist-mlp-20261124-101500",
    no_args_is_help=True, add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)

SetOption = Annotated[list[str], typer.Option(
    "--set", help="Override a config field, typed like YAML: --set train.epochs=1 "
                  "--set compile.optimizer.learning_rate=0.01 --set model.layers.1.units=256 (repeatable).")]


AllowConfigChangeOption = Annotated[bool, typer.Option(
    "--allow-config-change", help="Use the run's config.yaml even where it was edited after the run was trained "
                                  "(refused by default, with the diff against the config recorded in meta.json).")]


def console(stderr=False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Lines wrap in the terminal, not mid-word in logs; tables written to a file or pipe get room for every column.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def handles_errors(command):
    """One place turns the library's errors into a paragraph on stderr and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from dlcli.errors import DlcliError

        try:
            return command(*args, **kwargs)
        except DlcliError as e:
            from rich.markup import escape

            # escaped: messages quote things like "pip install 'dlcli[onnx]'" that are not markup
            label = "[bold red]error:[/]" if e.exit_code else "[bold]nothing to do:[/]"
            console(stderr=True).print(f"{label} {escape(e.message)}", markup=True, highlight=False)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def load(config: Path, overrides: list[str]):
    """The validated Config of a config file with `--set` overrides."""
    from dlcli.config import load_config

    return load_config(config, overrides)


def metrics_table(title: str, metrics: dict):
    """Loss and metrics, four decimals: the table train and evaluate end with."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    return table


def si(n: float) -> str:
    """1234567 -> '1.23M' (FLOPs, counts)."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.3g}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return str(n)


def _version(value: bool):
    if value:
        from dlcli import __version__

        print(f"dlcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                       help="Print the version and exit.")] = False):
    """dlcli: deep learning from YAML configs."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        # the library's warnings (a dangling layer, say) as one readable line, not Python's source excerpt
        console(stderr=True).print(f"[bold yellow]warning:[/] {message}", markup=True, highlight=False)

    warnings.showwarning = show
