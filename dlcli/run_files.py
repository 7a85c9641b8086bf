"""The run directory contract: create it, write every file atomically, read it back.

runs/<name>-<UTC yyyymmdd-hhmmss>/
  config.yaml        fully resolved config: `dlcli train runs/X/config.yaml` reproduces the run
  history.csv        epoch, every loss/metric, val_*, learning_rate, seconds
  summary.txt        the model summary
  weights/last.npz   named arrays (allow_pickle=False); weights/best.npz by the monitored value
  checkpoint/state.npz  optimizer + RNG + callback state for --resume
  meta.json          versions, seed, git commit, start/end time, status, best epoch, config fingerprint
  evaluation.json    written by `dlcli evaluate`
  train.log          the plain-text epoch lines
  curves.png         the learning curves; divergence.json a diverged run's report
  vocabulary.json, feature_space.json   a text run's word table, a table run's adapted preprocessing
"""
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dlcli.errors import DlcliError
from dlcli.metrics import metric_direction


FOLDS = "folds"


@dataclass(frozen=True)
class RunDir:
    """One run directory: its files by name, as drawn above (`RunDir(path).meta`, never `path / "meta.json"`), and
    the writes a run makes there (atomic; train.log appended). A data-parallel rank other than 0 holds a NoRunDir
    for rank 0's directory instead (`RunDir.for_rank`)."""

    path: Path

    def __init__(self, path):
        object.__setattr__(self, "path", Path(path))

    config = property(lambda self: self.path / "config.yaml")
    history = property(lambda self: self.path / "history.csv")
    summary = property(lambda self: self.path / "summary.txt")
    meta = property(lambda self: self.path / "meta.json")
    evaluation = property(lambda self: self.path / "evaluation.json")
    train_log = property(lambda self: self.path / "train.log")
    curves = property(lambda self: self.path / "curves.png")
    divergence = property(lambda self: self.path / "divergence.json")  # a diverged run's report
    vocabulary = property(lambda self: self.path / "vocabulary.json")  # text runs: the word -> index table
    feature_space = property(lambda self: self.path / "feature_space.json")  # table runs: the adapted preprocessing
    model_onnx = property(lambda self: self.path / "model.onnx")  # dlcli export's default output
    tensorboard = property(lambda self: self.path / "tensorboard")  # the TensorBoard callback's default log_dir
    weights = property(lambda self: self.path / "weights")
    last_weights = property(lambda self: weights_file(self.weights, "last"))
    best_weights = property(lambda self: weights_file(self.weights, "best"))
    checkpoint = property(lambda self: self.path / "checkpoint" / "state.npz")  # --resume's
    folds = property(lambda self: self.path / FOLDS)  # a K-fold run: one run directory per fold, folds/1 ... folds/K
    kfold_csv = property(lambda self: self.path / "kfold.csv")
    # a sweep's study directory, runs/<study>/ (dlcli.sweep): its journal, its trials' run directories and its report
    journal = property(lambda self: self.path / "study.journal")  # the study's storage without --storage
    trials_csv = property(lambda self: self.path / "trials.csv")
    best_yaml = property(lambda self: self.path / "best.yaml")  # the best trial's config.yaml
    history_png = property(lambda self: self.path / "optimization_history.png")
    importances_png = property(lambda self: self.path / "param_importances.png")

    MARKERS = ("config.yaml", "meta.json", "history.csv")  # any of them makes a folder a run directory
    writes = True  # False for a rank that only reads (NoRunDir): what it would write need not be made

    @classmethod
    def for_rank(cls, path, world) -> "RunDir":
        """The run directory as `world`'s rank sees it: rank 0 writes it, every other rank shares it read-only."""
        return cls(path) if world.is_root else NoRunDir(path)

    def fold(self, i: int) -> "RunDir":
        return type(self)(self.folds / str(i))

    def write_bytes(self, path, data: bytes):
        atomic_write_bytes(path, data)

    def write_text(self, path, text: str):
        atomic_write_text(path, text)

    def write_json(self, path, obj):
        atomic_write_json(path, obj)

    def write_npz(self, path, arrays: dict):
        atomic_savez(path, arrays)

    def append_log(self, text: str):
        """Append to train.log: a torn last line is the worst a crash can do to it."""
        with open(self.train_log, "a") as f:
            f.write(text)

    def mark_failed(self, meta: dict, error) -> str:
        """Record in meta.json that the run ended by `error` ('interrupted' for Ctrl-C, else 'failed'); the status."""
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        try:
            self.write_json(self.meta, {**meta, "status": status, "end": utc_now(),
                                        "error": getattr(error, "message", None) or type(error).__name__})
        except Exception:  # the disk may be what failed: the original error matters more
            pass
        return status


class NoRunDir(RunDir):
    """A data-parallel rank other than 0: rank 0's paths, to read, and writes that do nothing (the directory is rank
    0's, and every rank holds the same weights and logs)."""

    writes = False

    def _nothing(self, *args):
        pass

    write_bytes = write_text = write_json = write_npz = append_log = _nothing


def weights_file(folder, which: str) -> Path:
    """A weights folder's best.npz or last.npz (ModelCheckpoint's files; a run's are in weights/)."""
    return Path(folder) / f"{which}.npz"


def atomic_write_bytes(path, data: bytes):
    """Temp file in the same directory, fsync, rename: a crash leaves the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files get the mode open() would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DlcliError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_savez(path, arrays: dict):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_npz(path) -> dict:
    """Named arrays from an .npz, refusing pickled objects; a damaged file is a clear error."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DlcliError(f"{path} does not exist") from None
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled object), OSError, EOFError...
        # NumPy's own text advises allow_pickle=True, i.e. running code from the file: never repeat it.
        raise DlcliError(f"{path} is damaged or not a dlcli file ({npz_problem(path, e)}); delete it or restore "
                         f"it from a backup") from None


def npz_problem(path, error) -> str:
    """What is wrong with a .npy/.npz NumPy refused, in words that never suggest unpickling it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if not (magic.startswith(b"PK\x03\x04") or magic == b"\x93NUMPY"):
        return "it is neither a NumPy .npy file nor an .npz archive of arrays"
    if "pickle" in str(error).lower():
        return "it holds pickled Python objects, which dlcli never loads"
    if isinstance(error, (zipfile.BadZipFile, EOFError)) or "truncated" in str(error).lower():
        return "it is truncated or corrupt"
    return f"{type(error).__name__}: {error}"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def create_run_dir(runs_dir, name: str) -> Path:
    """A new, empty run directory `<runs_dir>/<name>-<UTC stamp>` (suffixed -2, -3 ... if taken)."""
    runs_dir = Path(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DlcliError(f"cannot create runs directory {runs_dir}: {e.strerror or e}") from None
    base = f"{name}-{utc_stamp()}"
    for i in range(1, 1000):
        path = runs_dir / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise DlcliError(f"cannot create run directory {path}: {e.strerror or e}") from None
        RunDir(path).weights.mkdir()
        return path
    raise DlcliError(f"cannot find a free run directory name under {runs_dir}")


def versions_meta(seed) -> dict:
    from dlcli import __version__

    return {"dlcli": __version__, "numpy": np.__version__, "python": sys.version.split()[0], "seed": seed,
            "git_commit": git_commit()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def history_csv(rows: list[dict]) -> str:
    """Rows of per-epoch logs as CSV; columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return out.getvalue()


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def read_history(run_dir, name: str | None = None) -> list[dict]:
    """A run's history.csv (or its file `name`, a K-fold run's kfold.csv) as rows of numbers."""
    path = RunDir(run_dir).history if name is None else Path(run_dir) / name
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _parse_number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse_number(v):
    if v in ("", None):
        return None
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DlcliError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DlcliError(f"{path} is unreadable or damaged: {e}") from None


def require_run_dir(run_dir, needs: str | None = "config.yaml") -> Path:
    """`run_dir` as a Path if it is a run directory holding `needs` (None: any of RunDir.MARKERS, so a damaged run
    can still be shown); otherwise the one "not a run directory" error every command gives (exit 2, a usage
    error)."""
    path = Path(run_dir)
    if not path.exists():
        problem = "it does not exist"
    elif not path.is_dir():
        problem = "it is a file"
    elif needs is not None:
        problem = None if (path / needs).is_file() else f"no {needs}"
    else:
        problem = None if any((path / m).is_file() for m in RunDir.MARKERS) else f"no {', '.join(RunDir.MARKERS)}"
    if problem:
        raise DlcliError(f"{path} is not a dlcli run directory ({problem}); run directories look like "
                         f"runs/<name>-<yyyymmdd-hhmmss>/ (list them with dlcli runs list --runs-dir DIR)", exit_code=2)
    return path


# --- reading runs back (dlcli runs list / show / compare) ---------------------------------------------------------
def _read_json_or_problem(path: Path):
    """(value, problem): the parsed JSON, or None and why it could not be read."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path.name} damaged ({type(e).__name__})"


def _read_history_or_problem(run_dir: Path):
    try:
        return read_history(run_dir), None
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
    value, epoch = (min if metric_direction(name) == "min" else max)(points, key=lambda p: p[0])
    return name, value, epoch


def run_summary(run_dir) -> dict:
    """What `runs list` shows for one run directory, with `problems` naming whatever is missing or damaged."""
    run_dir = Path(run_dir)
    problems = []
    meta, problem = _read_json_or_problem(RunDir(run_dir).meta)
    if problem:
        problems.append(problem)
    meta = meta if isinstance(meta, dict) else {}
    if not RunDir(run_dir).config.is_file():
        problems.append("no config.yaml")
    rows, problem = _read_history_or_problem(run_dir)
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
    """Run directories under `runs_dir`: any folder holding config.yaml, meta.json or history.csv; and a sweep's
    trials, `<study>/trial-NNN-<time>/` (dlcli.sweep), after their study's place."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise DlcliError(f"runs directory {root} does not exist; train something first (dlcli train CONFIG) "
                         f"or point --runs-dir at the folder holding run directories", exit_code=2)

    def is_run(d: Path) -> bool:
        return d.is_dir() and any((d / m).exists() for m in RunDir.MARKERS)

    found = []
    for d in sorted(root.iterdir()):
        if is_run(d):
            found.append(d)
        elif d.is_dir():
            found += sorted(t for t in d.glob("trial-*") if is_run(t))
    return found
