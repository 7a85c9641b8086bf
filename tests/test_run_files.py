"""The run directory contract (dlcli.run_files): atomic writes with the user's file modes, damaged files refused in
words that never suggest unpickling them."""
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.runs_fixture import train_tiny

runner = CliRunner()


def test_run_files_get_the_users_umask(tmp_path):
    import os

    from dlcli import run_files

    old = os.umask(0o022)
    try:
        run_files.atomic_write_text(tmp_path / "a.txt", "x")
        run_files.atomic_savez(tmp_path / "w.npz", {"a": np.zeros(2)})
        os.umask(0o077)
        run_files.atomic_write_json(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert (tmp_path / "w.npz").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content,why", [
    (b"garbage, not an archive", "neither a NumPy .npy file nor an .npz archive"),
    (None, "pickled Python objects, which dlcli never loads"),
    ("truncated", "truncated or corrupt"),
])
def test_damaged_weights_never_suggest_unpickling(tmp_path, content, why):
    from dlcli.cli import app

    run = train_tiny(tmp_path, runner)
    last = run / "weights" / "last.npz"
    if content is None:
        np.savez(last, a=np.array([{"code": 1}], dtype=object))
    elif content == "truncated":
        last.write_bytes(last.read_bytes()[:300])
    else:
        last.write_bytes(content)
    result = runner.invoke(app, ["evaluate", str(run), "--weights", "last"], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    assert f"{last} is damaged or not a dlcli file (it " in result.output and why in result.output
    assert "allow_pickle" not in result.output and "Traceback" not in result.output


def test_a_rank_other_than_0_shares_the_run_directory_without_writing_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from dlcli import plots, run_files
    from dlcli.distributed import World
    from dlcli.plots import write_curves

    other = run_files.RunDir.for_rank(tmp_path, SimpleNamespace(is_root=False))
    other.write_text(other.config, "x")
    other.write_json(other.meta, {})
    other.append_log("epoch 1\n")
    other.write_npz(other.checkpoint, {"a": np.zeros(2)})
    other.mark_failed({}, KeyboardInterrupt())
    drawn = []
    monkeypatch.setattr(plots, "curves_png", lambda *a, **k: drawn.append(a) or b"png")
    write_curves(other, [{"epoch": 1, "loss": 1.0}])
    assert drawn == []  # not drawn only to be discarded
    monkeypatch.undo()
    assert other.meta == tmp_path / "meta.json" and list(tmp_path.iterdir()) == []  # rank 0's paths, nothing written
    root = run_files.RunDir.for_rank(tmp_path, World())
    root.write_json(root.meta, {})
    root.append_log("epoch 1\n")
    write_curves(root, [{"epoch": 1, "loss": 1.0}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "meta.json", "train.log"]
