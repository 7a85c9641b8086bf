"""The `dlcli` command: parses arguments, calls the library, prints with rich. Nothing else knows the CLI.

Heavy imports (NumPy, the engine) happen inside commands so `dlcli --help` answers at once.
"""
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import AllowConfigChangeOption, SetOption, app, console, handles_errors, load, metrics_table, si


@app.command()
@handles_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(
        help="YAML config, e.g. configs/mnist.yaml (optional with --resume: the run's own config.yaml).")] = None,
    set_: SetOption = [],
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where run directories are created.")] = Path("runs"),
    name: Annotated[Optional[str], typer.Option(help="Run name (default: the config's name).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override the config's seed.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the run directory (banner, progress and "
                                                            "test table are in the run's files).")] = False,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue an interrupted run directory exactly where its last checkpoint stopped.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(
        "--init-from", help="Start a new run from another run's weights (fresh optimizer and counters).")] = None,
    allow_config_change: Annotated[bool, typer.Option(
        "--allow-config-change", help="With --resume: accept a changed train.epochs or learning rate (the model "
                                      "never changes on a resume).")] = False,
    distributed: Annotated[bool, typer.Option(
        "--distributed", help="Data-parallel over the MPI ranks this was launched with: mpiexec -n 4 dlcli train "
                              "CONFIG --distributed (or srun). train.batch_size is the global batch; only rank 0 "
                              "prints and writes. Needs pip install 'dlcli[distributed]'.")] = False,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="BLAS threads per process (default with --distributed: this node's cores / its "
                                 "ranks; else NumPy's default or OMP_NUM_THREADS).")] = None,
):
    """Train the model a config describes; writes runs/<name>-<UTC time>/.

    Example: dlcli train configs/mnist.yaml --set train.epochs=1 --set data.limit=2000

    Resume after a crash or Ctrl-C: dlcli train --resume runs/mnist-mlp-20261124-101500

    On 4 processes (MPI): mpiexec -n 4 dlcli train configs/mnist_cnn.yaml --distributed
    """
    import dlcli
    from dlcli.commands.train_output import (Banner, StopOnSignal, print_baseline, print_kfold,
                                             report_interrupted, test_set)

    out, stop = console(), StopOnSignal()
    try:
        run = dlcli.train(config, set_, runs_dir=runs_dir, resume=resume or False,
                          allow_config_change=allow_config_change, init_from=init_from, seed=seed, name=name,
                          verbose=0 if quiet else 1, distributed=distributed, threads=threads,
                          callbacks=[stop] if quiet else [Banner(out, config, resume), stop])
    except KeyboardInterrupt:  # a second Ctrl-C: StopOnSignal has said that nothing more was saved
        raise typer.Exit(130) from None
    if run.config.train.kfold and not quiet:
        print_kfold(out, run)  # the mean and spread per epoch (or which folds finished); the test table: their mean
    if run.test and not quiet:
        out.print(metrics_table(f"test: {test_set(run.config, run.sizes['test'])}", run.test))
        print_baseline(out, run.test, run.data.extra)
    if run.status == "interrupted":
        report_interrupted(run)
        raise typer.Exit(128 + (stop.signum or signal.SIGINT))  # 130 for Ctrl-C, 143 for TERM
    print(f"run directory: {run.dir}" if not quiet else run.dir)


@app.command("inspect-shapes")
@handles_errors
def inspect_shapes(
    config: Annotated[Path, typer.Argument(help="YAML config.")],
    set_: SetOption = [],
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, help="Batch size for the activation-memory estimate (default: train.batch_size).")] = None,
    graph: Annotated[Optional[Path], typer.Option(
        "--graph", help="Also draw the layer graph: FILE.svg or FILE.png (needs Graphviz 'dot'; without it a .dot "
                        "file is written instead), FILE.dot, or FILE.md (a mermaid flowchart).")] = None,
    trace: Annotated[bool, typer.Option(
        "--trace", help="Also run one real batch forward and backward: per layer activation mean/std, dead "
                        "ReLUs, gradient norms (loads the data).")] = False,
):
    """Print each layer's output shape and parameters, totals, memory and FLOPs, without loading data (a table's
    features are adapted on its training split to know their widths, shown per feature).

    Example: dlcli inspect-shapes configs/mnist_cnn.yaml --set model.layers.0.filters=16

    Example: dlcli inspect-shapes configs/fashion_mnist_resnet.yaml --graph resnet.md
    """
    import warnings

    from rich.table import Table

    from dlcli.builder import build_model
    from dlcli.engine.layer import format_shape
    from dlcli.render import check_graph_path

    if graph is not None:
        check_graph_path(graph)  # a usage error, before any work is printed
    cfg = load(config, list(set_))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(cfg)
    for w in caught:
        console(stderr=True).print(f"[bold yellow]warning:[/] {w.message}", markup=True, highlight=False)
    rows = model.summary_rows()
    functional = cfg.model.type == "functional"
    table = Table(title=f"{model.name} ({config})")
    for col, justify in (("layer", "left"), ("type", "left"), ("output shape", "left"), ("params", "right"),
                         ("FLOPs/sample", "right")):
        table.add_column(col, justify=justify)
    if functional:
        table.add_column("connected to")
    for r in rows:
        if r["type"] == "InputLayer" and not functional:
            continue
        cells = [r["name"] + ("" if r["trainable"] else " (frozen)"), r["type"], format_shape(r["output_shape"]),
                 f"{r['params']:,}", si(r["flops"])]
        if functional:
            cells.append(", ".join(r["connected_to"]))
        table.add_row(*cells)
    out = console()
    out.print(table)
    from dlcli.commands.train_output import print_table_features

    print_table_features(out, cfg.data)
    from dlcli import memory

    bs = cfg.train.batch_size if batch_size is None else batch_size
    total = model.count_params()
    trainable = sum(p.value.size for p in model.trainable_weights)
    out.print(f"Total params: {total:,}  (trainable {trainable:,}, non-trainable {total - trainable:,})")
    out.print(f"Memory: {memory.describe(memory.estimate(model, bs))} (float32, forward outputs kept for backward)")
    out.print(f"FLOPs per sample (forward): {si(sum(r['flops'] for r in rows))}")
    if graph is not None:
        from dlcli.render import render_graph

        out.print(render_graph(model, graph))
    if trace:
        from dlcli.commands.check import print_trace

        print_trace(cfg, model, out, batch_size)


@app.command()
@handles_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/mnist-mlp-20261124-101500.")],
    weights: Annotated[str, typer.Option(help="best or last.")] = "best",
    split: Annotated[str, typer.Option(help="test or validation.")] = "test",
    allow_config_change: AllowConfigChangeOption = False,
):
    """Evaluate a run's weights: loss and metrics, per-class accuracy and confusion matrix; writes evaluation.json.

    Example: dlcli evaluate runs/mnist-mlp-20261124-101500 --weights last
    """
    from dlcli.commands.train_output import print_evaluation
    from dlcli.errors import DlcliError
    from dlcli.experiment import evaluation_report
    from dlcli.run_files import RunDir

    if split not in ("test", "validation"):
        raise DlcliError(f"--split must be 'test' or 'validation'; found '{split}'", exit_code=2)
    result = evaluation_report(run_dir, weights, split, allow_config_change=allow_config_change)
    print_evaluation(console(), result, weights, split)
    print(f"wrote {RunDir(run_dir).evaluation}")


# The other command modules register themselves on the app; imported after the core three so --help lists those first.
import dlcli.commands.catalogue  # noqa: E402,F401
import dlcli.commands.check  # noqa: E402,F401
import dlcli.commands.config  # noqa: E402,F401
import dlcli.commands.data  # noqa: E402,F401
import dlcli.commands.export  # noqa: E402,F401
import dlcli.commands.generate  # noqa: E402,F401
import dlcli.commands.import_keras  # noqa: E402,F401
import dlcli.commands.plot  # noqa: E402,F401
import dlcli.commands.predict  # noqa: E402,F401
import dlcli.commands.runs  # noqa: E402,F401
import dlcli.commands.serve  # noqa: E402,F401
import dlcli.commands.sweep  # noqa: E402,F401

main = app  # the console script's entry point


if __name__ == "__main__":
    main()
