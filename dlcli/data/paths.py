"""Where datasets live. Search order for a named dataset, first found wins: the `path` argument,
$DLCLI_DATA_DIR/<name>/, the cache ($DLCLI_CACHE_DIR, else $XDG_CACHE_HOME/dlcli, else ~/.cache/dlcli)/datasets/<name>/,
/usr/share/datasets/<name>/ (where Debian's dataset-* packages install). <name> is tried in every spelling
given (e.g. fashion_mnist and fashion-mnist). A run records where its data was found (`recorded_dirs`, in
meta.json); commands on that run (evaluate, export, --resume) search those directories first, so a new shell
without $DLCLI_DATA_DIR finds the same files instead of downloading."""
import contextlib
import contextvars
import json
import os
from pathlib import Path

from dlcli.errors import DlcliError

SYSTEM_DIR = Path("/usr/share/datasets")
# the data directories of the run a command works on, searched before everything else (see searching_first)
_first: contextvars.ContextVar = contextvars.ContextVar("dlcli_run_data_dirs", default=())


def recorded_dirs() -> list[str]:
    """Where this process finds data, for a run to record: $DLCLI_DATA_DIR and the working directory (relative
    data paths), absolute."""
    data_dir = os.environ.get("DLCLI_DATA_DIR")
    found = [str(Path(data_dir).expanduser().resolve())] if data_dir else []
    return found + [str(Path.cwd().resolve())]


@contextlib.contextmanager
def searching_first(run_dir):
    """While the block runs, look first where the run in `run_dir` found its data (its meta.json's data_dirs); a
    run without that record, or None, searches as usual."""
    from dlcli import run_files

    try:
        dirs = json.loads(run_files.RunDir(run_dir).meta.read_text()).get("data_dirs") if run_dir else None
    except (OSError, ValueError, AttributeError):  # no or damaged meta.json: the usual search
        dirs = None
    dirs = [Path(d) for d in dirs if isinstance(d, str)] if isinstance(dirs, list) else []
    token = _first.set(tuple(d for d in dirs if d.is_dir()))
    try:
        yield
    finally:
        _first.reset(token)


def cache_dir() -> Path:
    """Root of the dataset cache; downloads go into cache_dir()/<name>/."""
    root = os.environ.get("DLCLI_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "dlcli" if xdg else Path.home() / ".cache" / "dlcli"
    return Path(root).expanduser() / "datasets"


def candidate_dirs(names: list[str]) -> list[tuple[str, Path]]:
    """(label, directory) in search order, after an explicit `path`; the label says where it came from."""
    out = [("recorded by the run", root / n) for root in _first.get() for n in names]
    data_dir = os.environ.get("DLCLI_DATA_DIR")
    if data_dir:
        out += [("$DLCLI_DATA_DIR", Path(data_dir).expanduser() / n) for n in names]
    out += [("cache", cache_dir() / n) for n in names]
    out += [("system", SYSTEM_DIR / n) for n in names]
    return out


def resolve_path(path: str, what: str = "data.path") -> Path:
    """A user-given file: absolute, else relative to the current directory, else to $DLCLI_DATA_DIR."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        for root in _first.get():  # the run's own data first
            if (root / p).exists():
                return root / p
    tried = [p if p.is_absolute() else Path.cwd() / p]
    if p.exists():
        return p
    data_dir = os.environ.get("DLCLI_DATA_DIR")
    if not p.is_absolute() and data_dir:
        q = Path(data_dir).expanduser() / p
        if q.exists():
            return q
        tried.append(q)
    hint = "" if data_dir or p.is_absolute() else " (set DLCLI_DATA_DIR to also look there)"
    raise DlcliError(f"{what}: file not found: {path} (tried {', '.join(map(str, tried))}){hint}")
