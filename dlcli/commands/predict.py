"""`dlcli predict RUN_DIR INPUT...`: argument parsing and printing around dlcli.prediction.predict_run (reading the
inputs is dlcli.data.inputs). NumPy is imported inside the command so `dlcli --help` stays fast."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import AllowConfigChangeOption, app, console, handles_errors
from dlcli.errors import DlcliError

PRINT_LIMIT = 50


@app.command()
@handles_errors
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/mnist-mlp-20261124-101500.")],
    inputs: Annotated[list[Path], typer.Argument(
        help=".npy/.npz arrays, a .csv of numeric columns, a .txt (one text per line, text runs), or images / a "
             "folder of images (resized and grayscaled to the model's input). Integer arrays (uint8 pixels, "
             "whole-number CSV cells) are raw values and get the dataset's preprocessing, as in training (MNIST: "
             "/ 255); float arrays are taken as already preprocessed and fed as they are.")],
    weights: Annotated[str, typer.Option(help="best or last.")] = "best",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes to print per sample.")] = 3,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write every prediction to a .csv "
                                                   "(class and probabilities) or .npy file.")] = None,
    key: Annotated[Optional[str], typer.Option(help="Array to read from an .npz (default: x).")] = None,
    invert: Annotated[bool, typer.Option("--invert", help="Invert image brightness (dark ink on white paper "
                                                          "for a model trained on MNIST-style light-on-dark; "
                                                          "a light background without it gets a warning).")]
    = False,
    pixel_scale: Annotated[Optional[float], typer.Option(help="Multiply image pixels (0-255) by this (default: "
                                                              "the dataset's, 1/255 for image datasets).")] = None,
    allow_config_change: AllowConfigChangeOption = False,
):
    """Predict with a trained run: top-k classes with probabilities, or every output to a file.

    Integer arrays get the training preprocessing; float arrays are taken as already preprocessed.

    Example: dlcli predict runs/mnist-mlp-20261124-101500 digit.png --invert --top-k 3
    """
    import numpy as np
    from rich.table import Table

    from dlcli.prediction import predict_run, write_predictions

    if output is not None and output.suffix.lower() not in (".csv", ".npy"):
        raise DlcliError(f"--output must end in .csv or .npy; got {output}", exit_code=2)
    p = predict_run(run_dir, list(inputs), weights, key, invert, pixel_scale, allow_config_change)
    out = console()
    if output is not None:
        write_predictions(output, p)
        out.print(f"wrote {len(p.labels):,} predictions to {output}")
        return
    shown = min(len(p.labels), PRINT_LIMIT)
    table = Table(title=f"{Path(run_dir).name} ({weights} weights)")
    table.add_column("input", no_wrap=True)
    if p.probabilities is not None:
        k = min(top_k, p.probabilities.shape[1])
        order = np.argsort(-p.probabilities[:shown], axis=1, kind="stable")[:, :k]
        for j in range(k):
            table.add_column(f"#{j + 1}", justify="right")
        for label, row, idx in zip(p.labels, p.probabilities, order):
            table.add_row(label, *[f"{p.classes[i]} ({row[i]:.3f})" for i in idx])
    else:
        flat = p.outputs.reshape(len(p.outputs), -1)
        table.add_column("output", justify="right")
        for label, row in zip(p.labels[:shown], flat):
            table.add_row(label, ", ".join(f"{v:.4g}" for v in row[:8]) + (" ..." if len(row) > 8 else ""))
    out.print(table)
    if shown < len(p.labels):
        out.print(f"(first {shown} of {len(p.labels):,}; --output FILE.csv writes them all)")
