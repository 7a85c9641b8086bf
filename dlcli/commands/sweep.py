"""`dlcli sweep CONFIG`: search the config's `sweep:` parameters with Optuna, each trial an ordinary run."""
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import SetOption, app, console, handles_errors


@app.command()
@handles_errors
def sweep(
    config: Annotated[Path, typer.Argument(help="YAML config with a sweep: section, e.g. configs/mnist_sweep.yaml.")],
    set_: SetOption = [],
    workers: Annotated[int, typer.Option(help="Local worker processes sharing the study.")] = 1,
    trials: Annotated[Optional[int], typer.Option(
        help="Trials in all (default: sweep.trials); a study that has fewer continues up to it.")] = None,
    storage: Annotated[Optional[str], typer.Option(
        help="Optuna storage URL shared by workers on many machines, e.g. postgresql://user:pw@host/db "
             "(default: runs/<study>/study.journal, shared by local workers).")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name (default: the config's name).")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Trials go to RUNS_DIR/<study>/.")] = Path("runs"),
):
    """Search hyperparameters: each trial is a run in runs/<study>/; writes trials.csv, best.yaml and plots.

    Example: dlcli sweep configs/mnist_sweep.yaml --workers 2

    Example (one study, many machines; run the same line on each): dlcli sweep configs/mnist_sweep.yaml
    --storage postgresql://dlcli:secret@db-host/optuna --study mnist-lr

    Running the command again continues the study; Ctrl-C stops after marking running trials interrupted and
    prints the table.
    """
    from dlcli import run_files
    from dlcli.sweep import prepare, run_sweep

    out, err = console(), console(stderr=True)
    plan = prepare(config, list(set_), trials=trials, storage=storage, study=study, runs_dir=runs_dir)

    def banner(study_, counted, lost):
        where = plan.storage or run_files.RunDir(plan.dir).journal
        progress = (f"{counted} of {plan.target} trials so far" if counted < plan.target else
                    f"{counted} trials already (target {plan.target}): nothing to run; --trials N continues it")
        out.print(f"[bold]dlcli sweep[/] {config}: study {plan.study_name} ({plan.direction} "
                  f"{plan.spec.metric}), {progress}, {workers} worker{'s' if workers != 1 else ''}, storage {where}",
                  markup=True)
        for line in lost:  # left by an earlier run of the study whose process was killed
            err.print(f"notice: {line}", markup=False)

    result = run_sweep(plan, workers, on_start=banner, log=_log)
    print_table(result, plan, out)
    if result.interrupted:
        err.print(f"interrupted: continue the study with: {resume_command(config, set_, trials, workers, plan)}",
                  markup=False)
        raise typer.Exit(130)
    if result.lost:
        for line in result.lost:
            err.print(f"notice: {line}", markup=False)
        err.print(f"error: a worker process died during the sweep; its trial is recorded as failed (not counted). "
                  f"Continue the study with: {resume_command(config, set_, trials, workers, plan)}", markup=False)
        raise typer.Exit(1)


def _log(line: str):
    print(line, flush=True)


def resume_command(config, set_, trials, workers, plan) -> str:
    """The command that continues this study as it was started: every --set, --trials and --workers kept."""
    import shlex

    args = ["dlcli", "sweep", str(config), *[a for s in set_ for a in ("--set", s)],
            *(["--trials", str(trials)] if trials is not None else []),
            *(["--workers", str(workers)] if workers != 1 else []), "--study", plan.study_name,
            *(["--storage", plan.storage] if plan.storage else ["--runs-dir", str(plan.dir.parent)])]
    return shlex.join(args)


def print_table(result, plan, out):
    from rich.table import Table

    from dlcli.run_files import RunDir

    names = list(plan.spec.parameters)
    table = Table(title=f"study {result.study_name}: {len(result.trials)} trials")
    for col in ("#", "state", plan.spec.metric, *names, "run", "note"):
        table.add_column(col, justify="right" if col in ("#", plan.spec.metric) else "left")
    for r in result.trials:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        table.add_row(str(r["number"]), r["state"].lower(), value,
                      *[_cell(r.get(n)) for n in names], Path(r["run_dir"]).name if r["run_dir"] else "",
                      r["reason"])
    out.print(table)
    if result.best is not None:
        out.print(f"best: trial {result.best['number']}, {plan.spec.metric} {result.best['value']:.4f}; "
                  f"reproduce with: dlcli train {RunDir(result.dir).best_yaml}")
    for path in result.files:
        print(f"wrote {path}")
    sys.stdout.flush()


def _cell(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
