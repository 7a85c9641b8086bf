"""Data-parallel training with a real `mpiexec -n 2` against one process on the same global batches."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlcli import distributed
from tests import distributed_job as job

JOB = Path(job.__file__)


def _mpiexec():
    # the mpich wheel ('dlcli[distributed]') puts mpiexec beside this interpreter
    found = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return found


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec/mpi4py: pip install -e '.[distributed]'")


def mpirun(*args, n=2, timeout=120, cwd=None):
    start = time.monotonic()
    done = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    done.seconds = time.monotonic() - start
    return done


def saved(path, count):
    f = np.load(path)
    return ([f[f"arr_{i}"] for i in range(count)], json.loads(str(f["history"])), json.loads(str(f["hashes"])),
            bool(f["stopped"]))


def assert_close(a, b, tol):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def test_rank_share_covers_every_item_once():
    for count in range(0, 12):
        for size in (1, 2, 3, 5):
            parts = [distributed.rank_share(count, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


@needs_mpi
@pytest.mark.parametrize("case", ["dense_adam", "conv_bn", "lstm"])
def test_two_ranks_equal_one_process(case, tmp_path):
    """Same weights and history within float32 rounding; an odd dataset size; every rank ends identical."""
    done = mpirun(JOB, case, tmp_path / "two.npz")
    assert done.returncode == 0, done.stderr
    ref_weights, ref_history = job.run(case, None, world=distributed.World(), state_dir=tmp_path)
    weights, history, hashes, _ = saved(tmp_path / "two.npz", len(ref_weights))
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert_close(weights, ref_weights, 2e-5)
    for key in ref_history:
        if key != "seconds":
            np.testing.assert_allclose(history[key], ref_history[key], rtol=1e-5)


@needs_mpi
@pytest.mark.parametrize("case", ["dense_adam", "dropout"])
def test_resume_two_ranks_on_two_and_on_one(case, tmp_path):
    """A stop asked on rank 0 alone stops both ranks at the same batch with one checkpoint; resuming it on 2 ranks
    ends bit-identical to the uninterrupted 2-rank run (each rank's dropout stream included), and on 1 process
    equal within rounding (without dropout, whose masks are rank-specific)."""
    full = tmp_path / "full"
    full.mkdir()
    assert mpirun(JOB, case, full / "out.npz").returncode == 0
    stopped = mpirun(JOB, case, tmp_path / "stopped.npz", "stop-at=4")
    assert stopped.returncode == 0, stopped.stderr
    _, _, _, was_stopped = saved(tmp_path / "stopped.npz", 0)
    assert was_stopped
    from dlcli import checkpoint

    state = tmp_path / f"{case}-state.npz"
    position = checkpoint.load(state)["header"]["position"]
    assert (position["epoch"], position["batch"]) == (0, 6)  # asked after batch 4, agreed in batch 5's exchange
    kept = state.read_bytes()
    resumed = mpirun(JOB, case, tmp_path / "resumed.npz", "resume")
    assert resumed.returncode == 0, resumed.stderr
    count = len(job.case(case)[0].get_weights())
    full_weights, full_history, _, _ = saved(full / "out.npz", count)
    weights, history, hashes, _ = saved(tmp_path / "resumed.npz", count)
    assert hashes[0] == hashes[1]
    for a, b in zip(weights, full_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert history["loss"] == full_history["loss"]
    streams = json.loads(str(np.load(tmp_path / "resumed.npz")["streams"]))
    if case == "dropout":
        assert streams[0] != streams[1]  # each rank drops different units
        return
    state.write_bytes(kept)
    one_weights, one_history = job.run("dense_adam", None, mode="resume", world=distributed.World(),
                                       state_dir=tmp_path)
    assert_close(one_weights, full_weights, 2e-5)
    np.testing.assert_allclose(one_history["loss"], full_history["loss"], rtol=1e-5)


@needs_mpi
def test_one_rank_failing_stops_every_rank_with_its_message(tmp_path):
    done = mpirun(JOB, "dense_adam", tmp_path / "out.npz", "fail-at=3", timeout=60)
    assert done.returncode == 1
    message = "rank 1 of 2 failed: ValueError: injected failure at batch 3"
    assert done.stderr.count(message) == 1, done.stderr  # printed once, by rank 0
    assert done.seconds < 30
    assert not (tmp_path / "out.npz").exists()


def test_world_of_one_needs_no_mpi(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    world = distributed.world(False)
    assert (world.rank, world.size, world.is_root) == (0, 1, True)
    buf = np.arange(3.0)
    assert world.allreduce(buf) is buf and world.gather_json(5) == [5]


def test_distributed_without_the_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setattr(distributed, "_world", None)
    with pytest.raises(distributed.DlcliError, match=r"pip install 'dlcli\[distributed\]'"):
        distributed.world(True)
