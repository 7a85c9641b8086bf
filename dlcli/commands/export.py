"""`dlcli export RUN_DIR`: the run's model as an ONNX file, checked by onnxruntime against dlcli's predictions."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import AllowConfigChangeOption, app, console, handles_errors


@app.command()
@handles_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/mnist-mlp-20261124-101500.")],
    weights: Annotated[str, typer.Option(help="best or last.")] = "best",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The .onnx file to write "
                                                   "(default: RUN_DIR/model.onnx).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version (13 or newer).")] = 17,
    preprocessed_inputs: Annotated[bool, typer.Option(
        "--preprocessed-inputs", help="A table run: export the model on the preprocessed vector, without the "
                                      "preprocessing (hashed, crossed or date features cannot be expressed in "
                                      "ONNX).")] = False,
    allow_config_change: AllowConfigChangeOption = False,
):
    """Export a run's model to ONNX: checked by the ONNX checker, then run by onnxruntime on a batch of the run's
    test data; a difference from dlcli's predictions above 1e-4 is an error and nothing is written.

    The ONNX inputs are what `dlcli predict` feeds the model (pixels already scaled, word indices); the pixel scale,
    vocabulary and class names are in the file's metadata. A run trained on a table takes its raw columns by name:
    the preprocessing is in the graph (--preprocessed-inputs leaves it out). Needs: pip install 'dlcli[onnx]'.

    Example: dlcli export runs/mnist-cnn-20261124-101500 --output mnist_cnn.onnx
    """
    from dlcli.interop.onnx_export import TOLERANCE, export_run

    report = export_run(run_dir, weights, output, opset, allow_config_change=allow_config_change,
                        preprocessed_inputs=preprocessed_inputs)
    out = console()
    out.print(f"wrote {report.path} (opset {report.opset}, {report.nodes} nodes)", markup=False)
    if report.max_difference is None:
        out.print(report.checked_on, markup=False)
    else:
        out.print(f"onnxruntime vs dlcli on {report.checked_on}: largest difference {report.max_difference:.2e} "
                  f"(limit {TOLERANCE:g})", markup=False)
