"""`dlcli predict RUN_DIR INPUT...`: argument parsing and printing around dlcli.prediction.predict_run (reading the
inputs is dlcli.data.inputs). NumPy is imported inside the command so `dlcli --help` stays fast."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import AllowConfigChangeOption, app, console, handles_errors

PRINT_LIMIT = 50


@app.command()
@handles_errors
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/mnist-mlp-20261124-101500.")],
    inputs: Annotated[list[Path], typer.Argument(
        help=".npy/.npz arrays, a .csv of numeric columns, .txt text (an imdb run: one text per line of one file; "
             "a text_folder run: each file is one document, as in training), or images / a folder of images "
             "(resized and grayscaled to the model's input). Integer arrays (uint8 pixels, whole-number CSV "
             "cells) are raw values and get the dataset's preprocessing, as in training (MNIST: / 255); float "
             "arrays are taken as already preprocessed and fed as they are.")],
    weights: Annotated[str, typer.Option(help="best or last.")] = "best",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes to print per sample.")] = 3,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help=(
        "Write every output of every prediction. .npy: the outputs exactly as Keras' predict returns them "
        "((N, 1) for one sigmoid unit); a model with several outputs writes one file per output, "
        "STEM_<output>.npy. .npz: one array per output name. .csv: one row per input, with each output's "
        "predicted class and probabilities (or its values), columns prefixed with the output's name when there "
        "are several; file-name bytes that are not UTF-8 are written as \\xNN (errors='backslashreplace')."))]
    = None,
    key: Annotated[Optional[str], typer.Option(help="Array to read from an .npz (default: x).")] = None,
    invert: Annotated[bool, typer.Option("--invert", help="Invert image brightness (dark ink on white paper "
                                                          "for a model trained on MNIST-style light-on-dark; "
                                                          "a light background without it gets a warning).")]
    = False,
    pixel_scale: Annotated[Optional[float], typer.Option(help="Multiply image pixels (0-255) by this (default: "
                                                              "the dataset's, 1/255 for image datasets).")] = None,
    allow_config_change: AllowConfigChangeOption = False,
):
    """Predict with a trained run: top-k classes with probabilities (a ctc-loss output: its greedy decode), or
    every output to a file.

    Integer arrays get the training preprocessing; float arrays are taken as already preprocessed.

    Example: dlcli predict runs/mnist-mlp-20261124-101500 digit.png --invert --top-k 3
    """
    import numpy as np
    from rich.table import Table
    from rich.text import Text

    from dlcli.prediction import check_output_path, decoded_text, predict_run, write_predictions

    if output is not None:
        check_output_path(output)
    p = predict_run(run_dir, list(inputs), weights, key, invert, pixel_scale, allow_config_change)
    out = console()
    if output is not None:
        files = write_predictions(output, p)
        out.print(f"wrote {len(p.labels):,} predictions to {', '.join(map(str, files))}", markup=False)
        return
    shown = min(len(p.labels), PRINT_LIMIT)
    for o in p.outputs:
        title = f"{Path(run_dir).name} ({weights} weights)" + (f": output {o.name}" if len(p.outputs) > 1 else "")
        table = Table(title=Text(title))  # Text: file and class names are never rich markup
        table.add_column("input", no_wrap=True)
        if o.decoded is not None:
            table.add_column("decoded (CTC greedy)")
            for label, row in zip(p.labels[:shown], o.decoded):
                table.add_row(Text(label), decoded_text(row))
        elif o.probabilities is not None:
            k = min(top_k, o.probabilities.shape[1])
            order = np.argsort(-o.probabilities[:shown], axis=1, kind="stable")[:, :k]
            for j in range(k):
                table.add_column(f"#{j + 1}", justify="right")
            for label, row, idx in zip(p.labels, o.probabilities, order):
                table.add_row(Text(label), *[Text(f"{o.classes[i]} ({row[i]:.3f})") for i in idx])
        else:
            flat = o.values.reshape(len(o.values), -1)
            table.add_column("output", justify="right")
            for label, row in zip(p.labels[:shown], flat):
                table.add_row(Text(label), ", ".join(f"{v:.4g}" for v in row[:8]) + (" ..." if len(row) > 8 else ""))
        out.print(table)
    if shown < len(p.labels):
        out.print(f"(first {shown} of {len(p.labels):,}; --output FILE.csv writes them all)")
