"""`dlcli runs list|show|compare`: read run directories back and show them; a damaged run shows its state, never a
traceback."""
import json
from pathlib import Path
from typing import Annotated

import typer

from dlcli.commands.base import app, console, handles_errors

runs_app = typer.Typer(help="List, show and compare run directories.", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(runs_app, name="runs")

def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _number(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


_STATUS_STYLE = {"completed": "green", "interrupted": "yellow", "diverged": "red", "failed": "red",
                 "damaged": "red", "running or killed": "yellow"}


def _metric_label(name: str) -> str:
    """A metric name that says which split it is on: without a validation split the best is a training figure."""
    return name if name.startswith("val_") else f"{name} (training)"


@runs_app.command("list")
@handles_errors
def list_runs(runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder of run directories.")] = Path("runs")):
    """A table of runs: name, date, status, epochs, best metric (validation, else training), duration.

    Example: dlcli runs list --runs-dir runs
    """
    from rich.table import Table
    from rich.text import Text

    from dlcli.run_files import find_runs, run_summary

    found = find_runs(runs_dir)
    out = console()
    if not found:
        out.print(f"no runs in {runs_dir}")
        return
    trials = sum(1 for d in found if d.parent != Path(runs_dir))
    table = Table(title=f"{len(found)} run{'s' if len(found) != 1 else ''} in {runs_dir}"
                        + (f" ({trials} of them sweep trials, shown as study/trial)" if trials else ""))
    table.add_column("run", no_wrap=True)
    for col, justify in (("date (UTC)", "left"), ("status", "left"), ("epochs", "right"),
                         ("best metric", "right"), ("duration", "right")):
        table.add_column(col, justify=justify)
    notes = []
    for d in found:
        s = run_summary(d)
        best = "-" if s["best"] is None else f"{_metric_label(s['metric'])} {s['best']:.4f} (ep {s['best_epoch']})"
        name = s["run"] if d.parent == Path(runs_dir) else f"{d.parent.name}/{s['run']}"
        table.add_row(name, s["date"], Text(s["status"], style=_STATUS_STYLE.get(s["status"], "")),
                      str(s["epochs"]), best, _duration(s["seconds"]))
        if s["problems"]:
            notes.append(f"  {name}: {'; '.join(s['problems'])}")
    out.print(table)
    if notes:
        out.print("problems:\n" + "\n".join(notes), markup=False)


@runs_app.command("show")
@handles_errors
def show_run(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]):
    """Print a run's config, summary (status, times, best epoch, test metrics) and per-epoch history.

    Example: dlcli runs show runs/mnist-mlp-20261124-101500
    """
    from rich.table import Table

    from dlcli.run_files import RunDir, require_run_dir, run_summary

    s = run_summary(require_run_dir(run_dir, needs=None))
    out = console()
    out.print(f"[bold]{s['run']}[/]  {s['path']}", markup=True)
    config = RunDir(run_dir).config
    out.rule(config.name)
    try:
        out.print(config.read_text().rstrip(), markup=False)
    except (OSError, UnicodeDecodeError) as e:
        out.print(f"(unreadable: {e})")
    out.rule("summary")
    meta = s["meta"]
    facts = [("status", s["status"]), ("problems", "; ".join(s["problems"]) or None),
             ("started", meta.get("start")), ("ended", meta.get("end")), ("duration", _duration(s["seconds"])),
             ("epochs", s["epochs"]), ("parameters", meta.get("params")), ("data", meta.get("source")),
             ("sizes", meta.get("sizes")), ("seed", meta.get("seed")), ("git commit", meta.get("git_commit")),
             ("best", None if s["best"] is None else f"{s['metric']} {s['best']:.4f} at epoch {s['best_epoch']}"),
             ("test", meta.get("test"))]
    for key, value in facts:
        if value not in (None, "", {}):
            if isinstance(value, dict):
                value = ", ".join(f"{k} {_number(v)}" for k, v in value.items())
            out.print(f"  {key:<11} {value}", markup=False)
    summary = RunDir(run_dir).summary
    if summary.is_file():
        out.rule("model")
        out.print(summary.read_text(errors="replace").rstrip(), markup=False)
    out.rule("history")
    rows = s["history"]
    if not rows:
        out.print("(no epochs recorded)")
        return
    columns = [c for c in rows[0] if c != "seconds"] + (["seconds"] if "seconds" in rows[0] else [])
    table = Table()
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_number(r.get(c)) for c in columns])
    out.print(table)


def _load_config(run_dir: Path) -> dict:
    import yaml

    from dlcli.run_files import RunDir

    try:
        data = yaml.safe_load(RunDir(run_dir).config.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}


@runs_app.command("compare")
@handles_errors
def compare_runs(run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")]):
    """The configs' differences and the final metrics side by side.

    Example: dlcli runs compare runs/mnist-mlp-20261124-101500 runs/mnist-mlp-20261124-113000
    """
    from rich.table import Table

    from dlcli.errors import DlcliError
    from dlcli.run_files import require_run_dir, run_summary

    for d in run_dirs:
        require_run_dir(d, needs=None)  # a damaged run is compared as far as it can be, a stray folder is not
    if len(run_dirs) < 2:
        raise DlcliError("give at least two run directories to compare", exit_code=2)
    summaries = [run_summary(d) for d in run_dirs]
    labels = [s["run"] for s in summaries]
    from dlcli.yaml_lines import flatten

    flat = [flatten(_load_config(Path(d))) for d in run_dirs]
    readable = [f for f in flat if f]  # a run without a readable config.yaml would make every key differ
    keys: list[str] = []
    for f in readable:
        keys += [k for k in f if k not in keys]
    differing = [k for k in keys if len({json.dumps(f.get(k, "<absent>"), sort_keys=True, default=str)
                                         for f in readable}) > 1]
    out = console()
    title = ("config differences" if differing else "configs are identical") if len(readable) > 1 \
        else "fewer than two readable configs: nothing to diff"
    diff = Table(title=title)
    diff.add_column("key")
    for label in labels:
        diff.add_column(label)
    for k in differing:
        diff.add_row(k, *["-" if k not in f else json.dumps(f[k], default=str) for f in flat])
    if not all(flat):
        diff.caption = "'-': no such key, or no readable config.yaml in that run"
    if differing or len(readable) < 2:
        out.print(diff)
    else:  # no empty table: say it
        out.print(f"the configs are identical ({len(readable)} runs, {len(keys)} settings each)")
    results = Table(title="results")
    results.add_column("")
    for label in labels:
        results.add_column(label, justify="right")
    final_keys: list[str] = []
    for s in summaries:
        final_keys += [k for k in (s["history"][-1] if s["history"] else {}) if k not in final_keys
                       and k not in ("epoch", "seconds")]
    results.add_row("status", *[s["status"] for s in summaries])
    results.add_row("epochs", *[str(s["epochs"]) for s in summaries])
    results.add_row("duration", *[_duration(s["seconds"]) for s in summaries])
    for k in final_keys:
        results.add_row(f"final {k}", *[_number(s["history"][-1].get(k)) if s["history"] else "-"
                                        for s in summaries])
    results.add_row("best", *["-" if s["best"] is None else f"{s['metric']} {s['best']:.4f} (ep {s['best_epoch']})"
                              for s in summaries])
    test_keys: list[str] = []
    for s in summaries:
        test = s["meta"].get("test")
        test_keys += [k for k in (test if isinstance(test, dict) else {}) if k not in test_keys]
    for k in test_keys:
        results.add_row(f"test {k}", *[_number((s["meta"].get("test") or {}).get(k)) for s in summaries])
    out.print(results)
