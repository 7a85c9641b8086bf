"""A study's report, from the study as it stands (every worker's trials): trials.csv, best.yaml (the best trial's
resolved config), optimization_history.png and param_importances.png; and the line printed per finished trial."""
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dlcli import run_files
from dlcli.sweep.search import Sweep, optuna_module

@dataclass
class SweepResult:
    study_name: str
    dir: Path
    trials: list = field(default_factory=list)  # rows of trials.csv
    best: dict | None = None
    files: list = field(default_factory=list)
    interrupted: bool = False
    lost: list = field(default_factory=list)  # lines naming trials whose worker process died


def trial_line(trial, sweep: Sweep) -> str:
    value = "" if trial.value is None else f" {sweep.spec.metric} {trial.value:.4f}"
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    reason = trial.user_attrs.get("reason")
    return (f"trial {trial.number} {trial.state.name.lower()}{value} ({params})"
            + (f": {reason}" if reason and trial.state.name != "PRUNED" else f", {reason}" if reason else "")
            + f"  {trial.user_attrs.get('run_dir', '')}")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report(sweep: Sweep, study) -> SweepResult:
    """trials.csv, best.yaml and the plots, from the study as it stands (every worker's trials)."""
    rows = trial_rows(study, sweep.spec.parameters)
    result, files = SweepResult(sweep.study_name, sweep.dir, rows), run_files.RunDir(sweep.dir)
    files.write_text(files.trials_csv, run_files.history_csv(rows) if rows else "number,state\n")
    result.files.append(files.trials_csv)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        pick = min if sweep.direction == "minimize" else max
        result.best = pick(complete, key=lambda r: r["value"])
        config = run_files.RunDir(result.best["run_dir"]).config if result.best.get("run_dir") else None
        if config is not None and config.exists():
            files.write_text(files.best_yaml, f"# best of study {sweep.study_name}: trial {result.best['number']}, "
                                              f"{sweep.spec.metric} {result.best['value']:.6g} "
                                              f"({result.best['run_dir']})\n" + config.read_text())
            result.files.append(files.best_yaml)
    result.files += plots(study, files, sweep.spec.metric, sweep.direction == "minimize")
    return result


def trial_rows(study, parameters: dict) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     **{name: t.params.get(name) for name in parameters},
                     "seconds": None if seconds is None else round(seconds, 2),
                     "run_dir": t.user_attrs.get("run_dir", ""), "reason": t.user_attrs.get("reason", ""),
                     "worker": t.user_attrs.get("worker", "")})
    return rows


def plots(study, files: run_files.RunDir, metric: str, minimize: bool) -> list[Path]:
    """optimization_history.png, and param_importances.png once two completed trials differ in what they tried."""
    from dlcli.plots import importances_png, sweep_history_png

    optuna = optuna_module()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return []
    files.write_bytes(files.history_png, sweep_history_png([(t.number, t.value) for t in complete], metric, minimize,
                                                           f"study {study.study_name}"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError):
        importances = {}  # e.g. one completed trial, or every trial tried the same values: nothing to rank
    if not importances:
        return [files.history_png]
    files.write_bytes(files.importances_png, importances_png(importances, metric,
                                                             f"study {study.study_name}: parameter importances"))
    return [files.history_png, files.importances_png]
