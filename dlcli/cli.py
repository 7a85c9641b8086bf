"""The `dlcli` command: parses arguments, calls the library, prints with rich. Nothing else knows the CLI.

Heavy imports (NumPy, the engine) happen inside commands so `dlcli --help` answers at once.
"""
import functools
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

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


def _console(stderr=False):
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
            _console(stderr=True).print(f"[bold red]error:[/] {escape(e.message)}", markup=True, highlight=False)
            raise typer.Exit(e.exit_code) from None

    return wrapper


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
        _console(stderr=True).print(f"[bold yellow]warning:[/] {message}", markup=True, highlight=False)

    warnings.showwarning = show


def _load(config: Path, overrides: list[str]):
    from dlcli.config import load_config

    return load_config(config, overrides).to_dict()


@app.command()
@handles_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(
        help="YAML config, e.g. configs/mnist.yaml (optional with --resume: the run's own config.yaml).")] = None,
    set_: SetOption = [],
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where run directories are created.")] = Path("runs"),
    name: Annotated[Optional[str], typer.Option(help="Run name (default: the config's name).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override the config's seed.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print the run directory and results.")] = False,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue an interrupted run directory exactly where its last checkpoint stopped.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(
        "--init-from", help="Start a new run from another run's weights (fresh optimizer and counters).")] = None,
    allow_config_change: Annotated[bool, typer.Option(
        "--allow-config-change", help="With --resume: accept a changed train.epochs or learning rate.")] = False,
):
    """Train the model a config describes; writes runs/<name>-<UTC time>/.

    Example: dlcli train configs/mnist.yaml --set train.epochs=1 --set data.limit=2000

    Resume after a crash or Ctrl-C: dlcli train --resume runs/mnist-mlp-20261124-101500
    """
    import numpy as np

    from dlcli import checkpoint, experiment, runs
    from dlcli.builder import build_model
    from dlcli.config import dump_yaml
    from dlcli.errors import DlcliError

    overrides = list(set_) + ([f"seed={seed}"] if seed is not None else []) + ([f"name={name}"] if name else [])
    out = _console()
    state = None
    if resume is not None:
        if init_from is not None:
            raise DlcliError("--resume continues a run; --init-from starts a new one from a run's weights: "
                             "give one of them", exit_code=2)
        run_dir = runs.require_run_dir(resume)
        state = checkpoint.load(run_dir)  # before anything else: a damaged checkpoint fails fast
        old = _load(run_dir / "config.yaml", [])
        cfg = _load(config, overrides) if config is not None else _load(run_dir / "config.yaml", overrides)
        cfg["name"] = old["name"]
        changes = experiment.check_resume_config(old, cfg, allow_config_change)
        if changes and not quiet:
            out.print("config changes accepted for this resume:\n" + "\n".join(changes), markup=False)
        new_lr = _constant_lr(cfg)
        if new_lr is not None and new_lr != _constant_lr(old):  # the new rate replaces the checkpointed one
            state["arrays"]["optimizer/learning_rate"] = np.array(new_lr, np.float64)
            state["header"]["position"]["learning_rate"] = new_lr
    elif config is None:
        raise DlcliError("give a config file (dlcli train configs/mnist.yaml) or --resume RUN_DIR", exit_code=2)
    else:
        cfg = _load(config, overrides)
    model = build_model(cfg)  # shapes and names fail here, before any data is loaded
    initial = experiment.init_from(model, init_from) if init_from is not None else None
    splits = experiment.load_splits(cfg, model)
    if state is None:
        run_dir = runs.create_run_dir(runs_dir, cfg["name"])
        lines = []
        model.summary(print_fn=lines.append)
        runs.atomic_write_text(run_dir / "summary.txt", "\n".join(lines) + "\n")
    runs.atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    if not quiet:
        sizes = splits.sizes()
        out.print(f"[bold]dlcli train[/] {config or ''}  ->  {run_dir}", markup=True)
        out.print(f"  data    {cfg['data'].get('type')} from {splits.source}: train {sizes['train']:,}, "
                  f"validation {sizes['validation']:,}, test {sizes['test']:,}")
        if splits.extra.get("folder"):
            from dlcli.data.folders import banner_lines

            for line in banner_lines(splits.extra["folder"]):
                out.print(f"  files   {line}", markup=False)
        source = splits.x_train.describe()
        if source.get("workers"):
            out.print(f"  decode  {source['workers']} threads, {splits.x_train.prefetch} batches ahead, "
                      f"cache {source['cache']}" + (f" ({source['cache_file']})" if source.get("cache_file") else ""))
        elif source.get("memory_mapped"):
            out.print(f"  mmap    {source['memory_mapped']} ({source['bytes'] / 2**20:,.0f} MiB, read per batch)",
                      markup=False)
        out.print(f"  model   {model.name}: {model.count_params():,} parameters "
                  f"({sum(p.value.size for p in model.trainable_weights):,} trainable)")
        opt = model.optimizer.get_config()
        out.print(f"  train   {cfg['train']['epochs']} epochs x batch {cfg['train']['batch_size']}, "
                  f"optimizer {opt.get('type')} (learning rate {opt.get('learning_rate')}), seed {cfg['seed']}")
        if initial is not None:
            out.print(f"  init    weights from {initial} (fresh optimizer and counters)")
        if state is not None:
            out.print(f"  resume  {experiment.resume_banner(state)}; appending to {run_dir / 'history.csv'}")

    stop_signal = []

    def install_interrupt(trainer):
        # Ctrl-C and a polite kill (SIGTERM: a cancelled CI job, a scheduler) both finish the batch and save.
        def on_signal(signum, frame):
            if trainer.stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt
            trainer.stop_requested = True
            stop_signal.append(signum)
            print(f"\n{signal.Signals(signum).name}: finishing this batch, then saving a checkpoint "
                  f"(Ctrl-C again to abort)", file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    result = experiment.train_run(cfg, model, splits, run_dir, verbose=0 if quiet else 1,
                                  trainer_hook=install_interrupt, resume=state)
    if result.test and not quiet:
        from rich.table import Table

        table = Table(title=f"test ({splits.sizes()['test']:,} samples)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in result.test.items():
            table.add_row(k, f"{v:.4f}")
        out.print(table)
    if result.status == "interrupted":
        p = result.position or {}
        _console(stderr=True).print(
            f"interrupted at epoch {p.get('epoch', 0) + 1}, batch {p.get('batch', 0)} (step {p.get('step', 0):,}); "
            f"checkpoint saved in {run_dir / checkpoint.FILENAME}\nresume with: dlcli train --resume {run_dir}",
            markup=False)
        print(run_dir)
        raise typer.Exit(128 + (stop_signal[0] if stop_signal else signal.SIGINT))  # 130 for Ctrl-C, 143 for TERM
    print(f"run directory: {run_dir}" if not quiet else run_dir)


def _constant_lr(cfg) -> float | None:
    opt = cfg["compile"]["optimizer"]
    lr = opt.get("learning_rate") if isinstance(opt, dict) else None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


@app.command("inspect-shapes")
@handles_errors
def inspect_shapes(
    config: Annotated[Path, typer.Argument(help="YAML config.")],
    set_: SetOption = [],
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Batch size for the activation-memory estimate (default: train.batch_size).")] = None,
    graph: Annotated[Optional[Path], typer.Option(
        "--graph", help="Also draw the layer graph: FILE.svg or FILE.png (needs Graphviz 'dot'; without it a .dot "
                        "file is written instead), FILE.dot, or FILE.md (a mermaid flowchart).")] = None,
    trace: Annotated[bool, typer.Option(
        "--trace", help="Also run one real batch forward and backward: per layer activation mean/std, dead "
                        "ReLUs, gradient norms (loads the data).")] = False,
):
    """Print each layer's output shape and parameters, totals, memory and FLOPs, without loading data.

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
    cfg = _load(config, list(set_))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(cfg)
    for w in caught:
        _console(stderr=True).print(f"[bold yellow]warning:[/] {w.message}", markup=True, highlight=False)
    rows = model.summary_rows()
    functional = cfg["model"].get("type", "sequential") == "functional"
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
                 f"{r['params']:,}", _si(r["flops"])]
        if functional:
            cells.append(", ".join(r["connected_to"]))
        table.add_row(*cells)
    out = _console()
    out.print(table)
    from dlcli import memory

    bs = batch_size or int(cfg["train"]["batch_size"])
    total = model.count_params()
    trainable = sum(p.value.size for p in model.trainable_weights)
    out.print(f"Total params: {total:,}  (trainable {trainable:,}, non-trainable {total - trainable:,})")
    out.print(f"Memory: {memory.describe(memory.estimate(model, bs))} (float32, forward outputs kept for backward)")
    out.print(f"FLOPs per sample (forward): {_si(sum(r['flops'] for r in rows))}")
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
):
    """Evaluate a run's weights: loss and metrics, per-class accuracy and confusion matrix; writes evaluation.json.

    Example: dlcli evaluate runs/mnist-mlp-20261124-101500 --weights last
    """
    from rich.table import Table

    from dlcli.errors import DlcliError
    from dlcli.experiment import evaluate_run

    if weights not in ("best", "last"):
        raise DlcliError(f"--weights must be 'best' or 'last'; found '{weights}'", exit_code=2)
    if split not in ("test", "validation"):
        raise DlcliError(f"--split must be 'test' or 'validation'; found '{split}'", exit_code=2)
    result = evaluate_run(run_dir, weights, split)
    out = _console()
    table = Table(title=f"{result['run']}: {split} split, {result['samples']:,} samples, {weights} weights")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.4f}")
    out.print(table)
    comparison = result.get("comparison")
    if comparison:
        verdict = "beats" if comparison["beats_baseline"] else "does NOT beat"
        out.print(f"MAE in {comparison['units']} units: model {comparison['model_mae']:.4f}, common-sense baseline "
                  f"(last value) {comparison['baseline_mae']:.4f}: the model {verdict} the baseline "
                  f"({comparison['improvement']:+.1%})")
    if "confusion_matrix" in result:
        names = result["classes"]
        cm = Table(title="confusion matrix (rows: true class, columns: predicted)")
        cm.add_column("class")
        for n in names:
            cm.add_column(n[:8], justify="right")
        cm.add_column("accuracy", justify="right")
        for n, row in zip(names, result["confusion_matrix"]):
            acc = result["per_class_accuracy"][n]
            cm.add_row(n, *[str(v) for v in row], "-" if acc is None else f"{acc:.3f}")
        out.print(cm)
    print(f"wrote {Path(run_dir) / 'evaluation.json'}")


def _si(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.3g}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return str(n)


# Command groups register themselves on `app` (imported last: each does `from dlcli.cli import app`).
import dlcli.commands.check  # noqa: E402,F401
import dlcli.commands.config  # noqa: E402,F401
import dlcli.commands.data  # noqa: E402,F401
import dlcli.commands.export  # noqa: E402,F401
import dlcli.commands.import_keras  # noqa: E402,F401
import dlcli.commands.plot  # noqa: E402,F401
import dlcli.commands.predict  # noqa: E402,F401
import dlcli.commands.runs  # noqa: E402,F401  (module names here never shadow dlcli.runs)


def main():
    app()


if __name__ == "__main__":
    main()
