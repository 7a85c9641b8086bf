"""`dlcli check grad|overfit|determinism CONFIG` (fit for CI smoke runs: exit 1 and a table of what failed), and
the `inspect-shapes --trace` table."""
from pathlib import Path
from typing import Annotated

import typer

from dlcli.commands.base import SetOption, app, console, handles_errors, load

check_app = typer.Typer(help="Built-in checks of a configured model; each exits 1 on failure (CI-friendly).",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(check_app, name="check")

ConfigArg = Annotated[Path, typer.Argument(help="YAML config, e.g. configs/mnist.yaml.")]


def _fail(out, message: str):
    out.print(f"[bold red]FAILED[/] {message}", markup=True)
    raise typer.Exit(1)


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


@check_app.command("grad")
@handles_errors
def check_grad(
    config: ConfigArg,
    set_: SetOption = [],
    samples: Annotated[int, typer.Option(min=1, help="Training samples in the checked batch.")] = 4,
    entries: Annotated[int, typer.Option(min=1, help="Random entries checked per weight array.")] = 6,
    tolerance: Annotated[float, typer.Option(help="Largest relative error that passes.")] = 1e-4,
    eps: Annotated[float, typer.Option(help="Finite-difference step.")] = 1e-6,
):
    """Finite-difference gradient check of the whole configured model in float64, per layer weight.

    Example: dlcli check grad configs/mnist_cnn.yaml --samples 2
    """
    from rich.table import Table

    from dlcli.builder import build_model
    from dlcli.diagnostics import first_batch, gradient_check

    cfg = load(config, list(set_))
    model = build_model(cfg)
    xs, ys = first_batch(cfg, model, samples)
    rows = gradient_check(model, xs, ys, entries=entries, eps=eps, tolerance=tolerance, seed=cfg.seed)
    out = console()
    table = Table(title=f"gradient check: {model.name}, {len(xs[0])} samples, float64, tolerance {tolerance:g}",
                  caption="kinks: entries skipped because they sit on a ReLU/max-pool kink")
    for col, justify in (("layer", "left"), ("weight", "left"), ("shape", "left"), ("checked", "right"),
                         ("kinks", "right"), ("max rel error", "right"), ("max abs error", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r["layer"], r["weight"], str(r["shape"]), str(r["checked"]), str(r["kinks"]),
                      f"{r['max_rel_error']:.2e}",
                      f"{r['max_abs_error']:.2e}", "ok" if r["ok"] else "[bold red]FAIL[/]")
    out.print(table)
    failed = [f"{r['layer']}/{r['weight']}" for r in rows if not r["ok"]]
    if failed:
        _fail(out, f"gradient check: {', '.join(failed)} (a wrong backward pass in that layer or one after it)")
    out.print(f"gradient check passed: {len(rows)} weight arrays")


@check_app.command("overfit")
@handles_errors
def check_overfit(
    config: ConfigArg,
    set_: SetOption = [],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples in the batch to memorise.")] = 16,
    steps: Annotated[int, typer.Option(min=1, help="Most optimizer steps to take.")] = 200,
    threshold: Annotated[float, typer.Option(help="Loss that counts as near zero.")] = 0.05,
):
    """Drive one batch to near-zero loss with the configured optimizer: a model that cannot memorise 16 samples
    has a bug (wrong loss/labels, a dead network, a learning rate far off).

    Example: dlcli check overfit configs/mnist.yaml --steps 100
    """
    from rich.table import Table

    from dlcli.builder import build_model
    from dlcli.diagnostics import first_batch, overfit_batch

    cfg = load(config, list(set_))
    model = build_model(cfg)
    xs, ys = first_batch(cfg, model, batch_size)
    r = overfit_batch(model, xs, ys, steps=steps, threshold=threshold)
    out = console()
    table = Table(title=f"overfit one batch: {model.name}, {r['batch']} samples, up to {steps} steps")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("initial loss", f"{r['initial_loss']:.4g}")
    table.add_row("final loss (training mode)", f"{r['final_loss']:.4g}")
    table.add_row("best loss", f"{r['best_loss']:.4g}")
    table.add_row("threshold", f"{threshold:g}")
    table.add_row("steps", f"{r['steps']}" + (f" (below threshold at {r['reached_at']})" if r["ok"] else ""))
    for k, v in r["inference"].items():
        table.add_row(f"{k} (inference mode)", f"{v:.4g}")
    out.print(table)
    if not r["ok"]:
        why = ("the loss did not fall at all (labels vs loss mismatch, dead ReLUs, frozen layers, learning rate "
               "far too small?)" if r["best_loss"] >= 0.9 * r["initial_loss"] else
               "the loss fell but not far enough (more --steps, a higher learning rate, less dropout or "
               "regularisation, or a model too small for the task)")
        _fail(out, f"overfit: best loss {r['best_loss']:.4g} > {threshold:g} after {r['steps']} steps: {why}")
    out.print(f"overfit passed: loss {r['final_loss']:.4g} after {r['reached_at']} steps")


@check_app.command("determinism")
@handles_errors
def check_determinism(
    config: ConfigArg,
    set_: SetOption = [],
    samples: Annotated[int, typer.Option(min=1, help="Training samples per short run.")] = 256,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per short run.")] = 1,
):
    """Train twice from scratch with the same seed on a few samples; every weight's hash must match.

    Example: dlcli check determinism configs/mnist.yaml --samples 512
    """
    from rich.table import Table

    from dlcli.diagnostics import determinism
    from dlcli.errors import plural

    cfg = load(config, list(set_))
    r = determinism(cfg, samples=samples, epochs=epochs)
    out = console()
    bad = [row for row in r["rows"] if not row["ok"]]
    table = Table(title=f"determinism: two runs, seed {cfg.seed}, {plural(samples, 'sample')} x "
                        f"{plural(epochs, 'epoch')}")
    for col in ("weight", "first run", "second run", ""):
        table.add_column(col)
    for row in (bad or r["rows"]):
        table.add_row(row["weight"], row["first"], str(row["second"]), "ok" if row["ok"] else "[bold red]DIFFERS[/]")
    out.print(table)
    a, b = r["losses"]
    if a != b:
        out.print(f"epoch losses: first {a}, second {b}")
    if not r["ok"]:
        _fail(out, f"determinism: {len(bad)} of {len(r['rows'])} weight arrays differ between two runs with the "
                   f"same seed (a layer or the data pipeline draws from an unseeded or shared random source)")
    out.print(f"determinism passed: {len(r['rows'])} weight arrays identical, epoch losses {a}")


def print_trace(cfg, model, out, batch_size: int | None = None):
    """The `inspect-shapes --trace` report: one real batch forward and backward, per layer."""
    from rich.table import Table

    from dlcli.diagnostics import first_batch, trace_batch

    xs, ys = first_batch(cfg, model, batch_size or cfg.train.batch_size)
    r = trace_batch(model, xs, ys)
    table = Table(title=f"trace: one training batch of {r['batch']} (training mode), loss {r['loss']:.4g}")
    table.caption = ("mean/std: the layer's output; dead: ReLU units zero on the whole batch; |g out|: norm of "
                     "dL/d(output) (of the logits for a softmax/sigmoid fused with its loss); |w|, |g w|: norms of "
                     "each weight and its gradient")
    table.add_column("layer", no_wrap=True)
    for col, justify in (("type", "left"), ("mean", "right"), ("std", "right"), ("dead", "right"),
                         ("|g out|", "right"), ("weight", "left"), ("|w|", "right"), ("|g w|", "right")):
        table.add_column(col, justify=justify)
    for row in r["rows"]:
        dead = "-" if row["dead"] is None else f"{row['dead']:.0%}"
        head = [row["name"], row["type"], _g(row["mean"]), _g(row["std"]), dead, _g(row["grad_norm"])]
        params = row["params"] or [None]
        for i, p in enumerate(params):
            cells = head if i == 0 else [""] * len(head)
            table.add_row(*cells, *(["-", "", ""] if p is None else [p["name"], _g(p["norm"]), _g(p["grad_norm"])]))
    out.print(table)
    for hint in r["hints"]:
        out.print(f"[yellow]hint:[/] {hint}", markup=True)
