"""Training curves as PNG: one subplot per quantity (loss, then each metric), train solid and validation dashed.

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, never pyplot: no global backend switch, no display
needed, nothing left open. Figures have a fixed size in pixels (`figure_pixels`) so tests can check the PNG header.
"""
import io
import math
from pathlib import Path

from dlcli import run_files
from dlcli.errors import DlcliError

DPI = 100
PANEL_INCHES = (4.8, 3.6)  # one subplot
MAX_COLUMNS = 3
NOT_PLOTTED = {"epoch", "learning_rate", "seconds", "lr", "batch", "size"}


def quantities(rows: list[dict]) -> list[str]:
    """The quantities to plot from history rows: 'loss' first, then metrics in column order, val_ folded in."""
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            base = key[4:] if key.startswith("val_") else key
            if base not in NOT_PLOTTED and base not in names and isinstance(value, (int, float)):
                names.append(base)
    return sorted(names, key=lambda n: (n != "loss", names.index(n)))


def grid(count: int) -> tuple[int, int]:
    """(rows, columns) of subplots for `count` quantities."""
    count = max(count, 1)
    cols = min(count, MAX_COLUMNS)
    return math.ceil(count / cols), cols


def figure_pixels(count: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for `count` quantities."""
    rows, cols = grid(count)
    return round(PANEL_INCHES[0] * cols * DPI), round(PANEL_INCHES[1] * rows * DPI)


def curves_png(histories: list[tuple[str, list[dict]]], title: str | None = None) -> bytes:
    """PNG bytes overlaying (label, history rows) pairs: per run one colour, train solid, validation dashed."""
    names: list[str] = []
    for _, rows in histories:
        names += [n for n in quantities(rows) if n not in names]
    names.sort(key=lambda n: n != "loss")
    fig, panels = _epoch_panels(names, title)
    colours = [f"C{i % 10}" for i in range(len(histories))]
    for name, ax in panels:
        for (label, rows), colour in zip(histories, colours):
            prefix = f"{label} " if len(histories) > 1 else ""
            for key, style, split in ((name, "-", "train"), (f"val_{name}", "--", "validation")):
                points = [(r.get("epoch", i + 1), r.get(key)) for i, r in enumerate(rows)]
                points = [(e, v) for e, v in points if isinstance(v, (int, float)) and isinstance(e, (int, float))]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=colour, marker="." if len(points) < 30 else None,
                            label=f"{prefix}{split}")
        _finish_panel(ax)
    return _png(fig)


def band_png(rows: list[dict], folds: int, title: str | None = None) -> bytes:
    """K-fold curves: per quantity the mean across folds per epoch with a band of +- one standard deviation
    (`<name>_std` columns); validation solid with its band, training as a thin dotted line for reference."""
    fig, panels = _epoch_panels(quantities([{k: v for k, v in r.items() if not k.endswith("_std")} for r in rows]),
                                title)
    epochs = [r["epoch"] for r in rows]
    for name, ax in panels:
        for key, style, label in ((f"val_{name}", "-", f"validation, mean of {folds} folds"),
                                  (name, ":", "training mean")):
            mean = [r.get(key) for r in rows]
            if not epochs or any(not isinstance(v, (int, float)) for v in mean):
                continue
            line, = ax.plot(epochs, mean, style, marker="." if len(epochs) < 30 else None, label=label)
            std = [r.get(f"{key}_std") for r in rows]
            if style == "-" and all(isinstance(v, (int, float)) for v in std):
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.25, label="+- 1 std across folds")
        _finish_panel(ax)
    return _png(fig)


def _epoch_panels(names: list[str], title: str | None):
    """A figure with one subplot per quantity against epochs: (figure, [(name, axes)])."""
    nrows, ncols = grid(len(names))
    width, height = figure_pixels(len(names))
    fig = _figure(width / DPI, height / DPI)
    if title:
        fig.suptitle(title)
    panels = []
    for k, name in enumerate(names or ["loss"]):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        panels.append((name, ax))
    return fig, panels


def _finish_panel(ax):
    if ax.has_data():
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)


def _png(fig) -> bytes:
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # a run or class name in a script the font lacks draws as boxes; the picture is still right
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure(width_inches: float, height_inches: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_inches, height_inches), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def sweep_history_png(trials: list[tuple[int, float]], metric: str, minimize: bool, title: str) -> bytes:
    """A study's optimisation history: each completed trial's value by trial number, and the best so far."""
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if trials:
        numbers, values = zip(*sorted(trials))
        best, running = [], None
        for v in values:
            running = v if running is None or (v < running if minimize else v > running) else running
            best.append(running)
        ax.plot(numbers, values, "o", label=f"trial {metric}")
        ax.step(numbers, best, where="post", color="C3", label="best so far")
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def importances_png(importances: dict, metric: str, title: str) -> bytes:
    """Horizontal bars: each parameter's share of the variation in `metric` (Optuna's fANOVA importances)."""
    fig = _figure(8, 1.2 + 0.5 * max(len(importances), 1))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(f"importance for {metric}")
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def write_curves(files: run_files.RunDir, rows: list[dict] | None = None, output=None) -> Path:
    """Draw a run's curves.png (or `output`) from `rows` (default: the run's history.csv); a K-fold run's from its
    kfold.csv, as the mean across folds with a +-1 standard deviation band. A data-parallel rank other than 0 (a
    NoRunDir) neither draws nor writes it: rank 0 does."""
    path, name = Path(output or files.curves), files.path.name
    if not files.writes:
        return path
    if rows is None and files.folds.is_dir() and files.kfold_csv.is_file():
        meta = run_files.read_json(files.meta) if files.meta.is_file() else {}
        k, done = meta.get("kfold"), sum(s == "completed" for s in meta.get("folds") or [])
        png = band_png(run_files.read_history(files.path, files.kfold_csv.name), done, f"{name}: {k}-fold")
    else:
        rows = run_files.read_history(files.path) if rows is None else rows
        png = curves_png([(name, rows)], title=name)
    files.write_bytes(path, png)
    return path


def plot_runs(run_dirs: list, output) -> Path:
    """Overlay several runs' histories in one PNG at `output`; one run is drawn as its curves.png is (a K-fold run
    with its band)."""
    histories = []
    for d in run_dirs:
        d = run_files.require_run_dir(d, needs=None)
        if not run_files.RunDir(d).history.is_file():
            raise DlcliError(f"{d} has no history.csv yet: the run has not finished an epoch", exit_code=2)
        try:
            histories.append((d.name, run_files.read_history(d)))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise DlcliError(f"{run_files.RunDir(d).history} is unreadable or damaged: {e}") from None
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise DlcliError(f"--output must end in .png; got {output}")
    if len(run_dirs) == 1:
        return write_curves(run_files.RunDir(run_dirs[0]), output=output)
    run_files.atomic_write_bytes(output, curves_png(histories))
    return output
