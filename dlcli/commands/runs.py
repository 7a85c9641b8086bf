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

# Metric names where smaller is better; anything else (accuracy, auc, precision ...) is better larger.
_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "mape", "msle", "squared", "absolute", "hinge", "crossentropy",
                    "divergence", "poisson", "cosh")


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in _LOWER_IS_BETTER)


def _read_json(path: Path):
    """(value, problem): the parsed JSON, or None and why it could not be read."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path.name} damaged ({type(e).__name__})"


def _read_history(run_dir: Path):
    from dlcli import runs

    try:
        return runs.read_history(run_dir), None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [], f"history.csv damaged ({type(e).__name__})"


def best_metric(rows: list[dict]):
    """(name, value, epoch) of the best validation metric: the first val_ metric that is not the loss, else
    val_loss, else the training loss."""
    columns = [k for row in rows[:1] for k in row]
    val = [c for c in columns if c.startswith("val_")]
    name = next((c for c in val if c != "val_loss"), "val_loss" if "val_loss" in val else "loss")
    points = [(r.get(name), r.get("epoch", i + 1)) for i, r in enumerate(rows)]
    points = [(v, e) for v, e in points if isinstance(v, (int, float)) and v == v]
    if not points:
        return name, None, None
    value, epoch = (min if lower_is_better(name) else max)(points, key=lambda p: p[0])
    return name, value, epoch


def run_summary(run_dir) -> dict:
    """What `runs list` shows for one run directory, with `problems` naming whatever is missing or damaged."""
    run_dir = Path(run_dir)
    problems = []
    meta, problem = _read_json(run_dir / "meta.json")
    if problem:
        problems.append(problem)
    meta = meta if isinstance(meta, dict) else {}
    if not (run_dir / "config.yaml").is_file():
        problems.append("no config.yaml")
    rows, problem = _read_history(run_dir)
    if problem:
        problems.append(problem)
    status = str(meta.get("status") or ("damaged" if problems else "unknown"))
    if status == "running" and meta.get("end") is None:
        status = "running or killed"
    seconds = meta.get("seconds")
    if not isinstance(seconds, (int, float)):
        per_epoch = [r.get("seconds") for r in rows if isinstance(r.get("seconds"), (int, float))]
        seconds = sum(per_epoch) if per_epoch else None
    name, value, epoch = best_metric(rows)
    return {"run": run_dir.name, "path": str(run_dir), "name": meta.get("name") or run_dir.name,
            "date": _date(meta.get("start"), run_dir.name), "status": status, "epochs": len(rows),
            "metric": name, "best": value, "best_epoch": epoch, "seconds": seconds, "problems": problems,
            "meta": meta, "history": rows}


def _date(start, dir_name: str) -> str:
    if isinstance(start, str) and len(start) >= 16:
        return start[:16].replace("T", " ")
    parts = dir_name.rsplit("-", 2)  # <name>-<yyyymmdd>-<hhmmss>
    if len(parts) == 3 and parts[1].isdigit() and parts[2][:6].isdigit() and len(parts[1]) == 8:
        d, t = parts[1], parts[2]
        return f"{d[:4]}-{d[4:6]}-{d[6:]} {t[:2]}:{t[2:4]}"
    return "-"


def find_runs(runs_dir) -> list[Path]:
    """Run directories under `runs_dir`: any folder holding config.yaml, meta.json or history.csv."""
    root = Path(runs_dir)
    if not root.is_dir():
        from dlcli.errors import DlcliError

        raise DlcliError(f"runs directory {root} does not exist; train something first (dlcli train CONFIG) "
                         f"or point --runs-dir at the folder holding run directories")
    markers = ("config.yaml", "meta.json", "history.csv")
    return sorted(d for d in root.iterdir() if d.is_dir() and any((d / m).exists() for m in markers))


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


@runs_app.command("list")
@handles_errors
def list_runs(runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder of run directories.")] = Path("runs")):
    """A table of runs: name, date, status, epochs, best validation metric, duration.

    Example: dlcli runs list --runs-dir runs
    """
    from rich.table import Table
    from rich.text import Text

    found = find_runs(runs_dir)
    out = console()
    if not found:
        out.print(f"no runs in {runs_dir}")
        return
    table = Table(title=f"{len(found)} run{'s' if len(found) != 1 else ''} in {runs_dir}")
    table.add_column("run", no_wrap=True)
    for col, justify in (("date (UTC)", "left"), ("status", "left"), ("epochs", "right"),
                         ("best val metric", "right"), ("duration", "right")):
        table.add_column(col, justify=justify)
    notes = []
    for d in found:
        s = run_summary(d)
        best = "-" if s["best"] is None else f"{s['metric']} {s['best']:.4f} (ep {s['best_epoch']})"
        table.add_row(s["run"], s["date"], Text(s["status"], style=_STATUS_STYLE.get(s["status"], "")),
                      str(s["epochs"]), best, _duration(s["seconds"]))
        if s["problems"]:
            notes.append(f"  {s['run']}: {'; '.join(s['problems'])}")
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

    from dlcli.errors import DlcliError

    if not Path(run_dir).is_dir():
        raise DlcliError(f"{run_dir} is not a directory; list runs with `dlcli runs list`")
    s = run_summary(run_dir)
    out = console()
    out.print(f"[bold]{s['run']}[/]  {s['path']}", markup=True)
    config = Path(run_dir) / "config.yaml"
    out.rule("config.yaml")
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
    summary = Path(run_dir) / "summary.txt"
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

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
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

    missing = [str(d) for d in run_dirs if not Path(d).is_dir()]
    if missing:
        raise DlcliError(f"not a directory: {', '.join(missing)}")
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
    out.print(diff)
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
