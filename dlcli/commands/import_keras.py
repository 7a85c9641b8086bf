"""`dlcli import-keras MODEL --output RUN_DIR`: a Keras model file as a dlcli run directory."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import SetOption, app, console, handles_errors


@app.command("import-keras")
@handles_errors
def import_keras(
    source: Annotated[Path, typer.Argument(help="A Keras 3 .keras file, or HDF5 weights (.weights.h5 / legacy .h5) "
                                                "with --config.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The run directory to create.")],
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="A dlcli config with the same architecture, for weights-only HDF5 files.")] = None,
    set_: SetOption = [],
):
    """Import a Keras model into a new run directory that inspect-shapes, evaluate, predict, export and
    train --init-from accept. The file is read as data: zip members in memory with size limits, HDF5 with plain
    datasets only, every class name mapped through dlcli's registries (Lambda and custom objects are refused).
    Needs: pip install 'dlcli[keras]'.

    Example: dlcli import-keras convnet.keras --output runs/imported-convnet --set data.type=mnist

    Example: dlcli import-keras mlp.weights.h5 --config mlp.yaml --output runs/imported-mlp
    """
    from dlcli.interop.keras_import import import_keras as run_import
    from dlcli.run_files import RunDir

    report = run_import(source, output, config, list(set_))
    out = console()
    err = console(stderr=True)
    for note in report.notes:
        err.print(f"note: {note}", markup=False)
    version = f"Keras {report.keras_version}, " if report.keras_version else ""
    out.print(f"imported {report.source} ({version}{report.layers} layers, {report.params:,} parameters) into "
              f"{report.run_dir}", markup=False)
    out.print(f"next: dlcli inspect-shapes {RunDir(report.run_dir).config} | dlcli predict {report.run_dir} INPUT | "
              f"dlcli export {report.run_dir}", markup=False)
