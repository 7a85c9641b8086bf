"""Resume and faults through the real CLI in subprocesses: SIGKILL mid-epoch then --resume ends bit-identical to
an uninterrupted run; Ctrl-C saves a resumable checkpoint and exits 130; a NaN loss writes divergence.json; damaged
or foreign checkpoints and unwritable run directories give one clear error, no traceback.

The signals land where the run pauses itself (PAUSED), not where a poll of its checkpoints happened to catch it: the
run trains an epoch in ~0.13 s of CPU (3 epochs of 150 steps after ~1.1 s of start-up), so on a busy machine a
poller kept off the CPU for a second could see the kill land an epoch late, or the run end first; and the waits,
bounded in wall time (30 and 60 s for 1-3 s of CPU), ran out at high loads. Waits are now bounded only against a
hung process (HANG)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlcli import checkpoint
from tests.runs_fixture import write_class_npz

CONFIG = """\
name: tiny
seed: 3
data: {{type: npz, path: {data}}}
model:
  input_shape: [16]
  layers:
    - {{type: Dense, units: {units}, activation: relu, name: h}}
    - {{type: Dropout, rate: 0.2, name: drop}}
    - {{type: Dense, units: 3, activation: softmax, name: out}}
compile:
  optimizer: {{type: {optimizer}, learning_rate: {lr}}}
  loss: sparse_categorical_crossentropy
  metrics: [accuracy]
train:
  epochs: {epochs}
  batch_size: 8
  validation_split: 0.2
  checkpoint_every: 3
  # min_delta 10: no epoch after the first improves, so the learning rate halves at the end of epochs 2 and 3 (a
  # callback that fires after the kill point: its state must survive the resume)
  callbacks: [{{type: EarlyStopping, patience: 50}}, {{type: ReduceLROnPlateau, patience: 1, factor: 0.5,
                                                       min_delta: 10}}]
"""


def _write_config(tmp, units=256, epochs=3, lr=0.01, samples=1500, scale=1.0, optimizer="adam"):
    data = tmp / "data.npz"
    if not data.exists():
        write_class_npz(data, samples, 16, test=1, held_out=False, scale=scale)  # x_test unused: no test split
    path = tmp / "tiny.yaml"
    path.write_text(CONFIG.format(data=data, units=units, epochs=epochs, lr=lr, optimizer=optimizer))
    return path


HANG = 900  # seconds of wall time: only a hung process takes this long (a run is 1-3 s of CPU, a minute at load 40)

# `dlcli train` that pauses once, in epoch 2 (index 1) as it is about to write its second mid-epoch checkpoint (three
# steps after the last one on disk, so a kill there loses work that --resume must redo): it says so in the file
# DLCLI_TEST_PAUSED names and waits for a line on its stdin
PAUSED = """
import os, sys
from dlcli import checkpoint
from dlcli.cli import main
save, paused = checkpoint.save, []
def pausing(files, model, callbacks, position, *args, **kwargs):
    if position["epoch"] == 1 and position["batch"] >= 6 and not paused:
        paused.append(position["batch"])
        open(os.environ["DLCLI_TEST_PAUSED"], "w").close()
        sys.stdin.readline()
    return save(files, model, callbacks, position, *args, **kwargs)
checkpoint.save = pausing
main()
"""


# `dlcli train` that pauses once its last checkpoint (the end of epoch 3) is on disk, before the fit ends and
# meta.json says completed, as PAUSED does
PAUSED_AT_END = """
import os, sys
from dlcli import checkpoint
from dlcli.cli import main
save = checkpoint.save
def pausing(files, model, callbacks, position, *args, **kwargs):
    written = save(files, model, callbacks, position, *args, **kwargs)
    if position["epoch"] == 3 and position["batch"] == 0:
        open(os.environ["DLCLI_TEST_PAUSED"], "w").close()
        sys.stdin.readline()
    return written
checkpoint.save = pausing
main()
"""


def _dlcli(*args, **kw):
    return [sys.executable, "-m", "dlcli.cli", *map(str, args)]


def _run(*args, timeout=HANG):
    return subprocess.run(_dlcli(*args), capture_output=True, text=True, timeout=timeout)


def _start_paused(runs_dir: Path, *args, script=PAUSED, **popen):
    env = {**os.environ, "DLCLI_TEST_PAUSED": str(runs_dir.parent / f"{runs_dir.name}.paused")}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args), "--runs-dir", runs_dir],
                            stdin=subprocess.PIPE, env=env, **popen)


def _only_run(runs_dir: Path) -> Path:
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    return run


def _wait_until_paused(proc, runs_dir: Path) -> dict:
    """The position of the last checkpoint written once a PAUSED run waits."""
    deadline = time.time() + HANG
    while time.time() < deadline and proc.poll() is None:
        if (runs_dir.parent / f"{runs_dir.name}.paused").exists():
            (state,) = runs_dir.glob("*/checkpoint/state.npz")
            return checkpoint.load(state)["header"]["position"]
        time.sleep(0.01)
    pytest.fail(f"the run never reached its pause in epoch 2 (exit code {proc.poll()})")


def _weights(run: Path) -> dict:
    with np.load(run / "weights" / "last.npz") as f:
        return {k: f[k] for k in f.files}


def _history(run: Path) -> list[list[str]]:
    lines = (run / "history.csv").read_text().splitlines()
    head = lines[0].split(",")
    keep = [i for i, h in enumerate(head) if h != "seconds"]
    return [[line.split(",")[i] for i in keep] for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    config = _write_config(tmp)
    done = _run("train", config, "--runs-dir", tmp / "runs", "-q")
    assert done.returncode == 0, done.stderr
    return tmp, config, _only_run(tmp / "runs")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference):
    tmp, config, ref = reference
    rates = [float(row[-1]) for row in _history(ref)[1:]]
    assert rates == [0.01, 0.01, 0.005], rates  # ReduceLROnPlateau fired at the end of epoch 2 (and 3)
    runs_dir = tmp / "killed"  # the kill lands in epoch 2, before the plateau callback fires
    proc = _start_paused(runs_dir, "train", config, "-q", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    position = _wait_until_paused(proc, runs_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG)
    assert proc.returncode == -signal.SIGKILL
    assert (position["epoch"], position["batch"]) == (1, 3)  # the last checkpoint, three steps before the kill
    run = _only_run(runs_dir)
    assert json.loads((run / "meta.json").read_text())["status"] == "running"
    resumed = _run("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch" in resumed.stdout and "samples seen" in resumed.stdout, resumed.stdout
    assert position["epoch"] >= 1
    a, b = _weights(ref), _weights(run)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-identical, not approximately equal
    assert _history(run) == _history(ref)
    assert json.loads((run / "meta.json").read_text())["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_saves_a_checkpoint_and_resumes_exactly(reference, signum):
    tmp, config, ref = reference
    runs_dir = tmp / f"interrupted-{signum.name}"
    proc = _start_paused(runs_dir, "train", config, "-q", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_paused(proc, runs_dir)
    proc.send_signal(signum)  # while it waits, mid-epoch
    out, err = proc.communicate("go on\n", timeout=HANG)
    assert proc.returncode == 128 + signum, err  # 130 for Ctrl-C, 143 for SIGTERM
    assert "resume with: dlcli train --resume" in err and "Traceback" not in err
    run = _only_run(runs_dir)
    assert json.loads((run / "meta.json").read_text())["status"] == "interrupted"
    resumed = _run("train", "--resume", run, "-q")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(ref), _weights(run)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_refuses_architecture_changes_and_gates_epochs(reference, tmp_path):
    _, config, ref = reference
    changed = tmp_path / "wider.yaml"
    changed.write_text(config.read_text().replace("units: 256", "units: 128"))
    result = _run("train", changed, "--resume", ref)
    assert result.returncode == 2 and "architecture" in result.stderr and "model.layers.0.units" in result.stderr
    more = _run("train", "--resume", ref, "--set", "train.epochs=4")
    assert more.returncode == 2 and "--allow-config-change" in more.stderr and "train.epochs: 3 -> 4" in more.stderr


def test_resume_of_a_finished_run_says_it_is_finished(reference):
    """Was: 'resuming at the start of epoch 4' of 3, then a run of no epochs. Exit 0: a job that resumes until its
    run is complete (a requeued scheduler job, tools/kill_soak.py) succeeds."""
    _, _, ref = reference
    result = _run("train", "--resume", ref)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "error" not in result.stderr
    assert f"{ref} has finished (completed: 3 of 3 epochs trained), so there is nothing to resume" in \
        " ".join(result.stderr.split())


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "adam, use_ema: true"])
def test_a_run_killed_after_its_last_checkpoint_resumes_to_its_end(tmp_path, optimizer):
    """Was: --resume said the run had finished ('its checkpoint is at the end') and exited 0, leaving meta.json
    'running' for ever and the fit's end undone (tools/kill_soak.py counted such a trial as not completed). With
    use_ema the end makes the weights their averages, as the uninterrupted run's does."""
    config = _write_config(tmp_path, units=32, optimizer=optimizer)
    config.write_text(config.read_text().replace("}\nmodel:", ", x_test: x_test, y_test: y_test}\nmodel:"))
    done = _run("train", config, "--runs-dir", tmp_path / "runs", "-q")
    assert done.returncode == 0, done.stderr
    ref, runs_dir = _only_run(tmp_path / "runs"), tmp_path / "killed_at_end"
    proc = _start_paused(runs_dir, "train", config, "-q", script=PAUSED_AT_END, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    assert _wait_until_paused(proc, runs_dir)["epoch"] == 3
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG)
    run = _only_run(runs_dir)
    assert json.loads((run / "meta.json").read_text())["status"] == "running"
    result = _run("train", "--resume", run, "-q")
    assert result.returncode == 0 and "has finished" not in result.stderr, result.stderr
    meta, want_meta = (json.loads((r / "meta.json").read_text()) for r in (run, ref))
    assert meta["status"] == "completed" and meta["test"] and meta["test"] == want_meta["test"]  # the end's weights
    assert _history(run) == _history(ref)
    got, want = _weights(run), _weights(ref)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    again = _run("train", "--resume", run)
    assert again.returncode == 0 and "has finished (completed: 3 of 3 epochs trained)" in " ".join(again.stderr.split())


def test_damaged_and_foreign_checkpoints_are_clear_errors(reference, tmp_path):
    _, _, ref = reference
    run = tmp_path / "copy"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.yaml").write_text((ref / "config.yaml").read_text())
    state = run / "checkpoint" / "state.npz"
    state.write_bytes((ref / "checkpoint" / "state.npz").read_bytes()[:500])  # a torn file
    damaged = _run("train", "--resume", run)
    assert damaged.returncode == 1 and "damaged" in damaged.stderr and "Traceback" not in damaged.stderr
    np.savez(state, x=np.zeros(3))
    foreign = _run("train", "--resume", run)
    assert foreign.returncode == 1 and "not a dlcli checkpoint" in foreign.stderr
    np.savez(state, __checkpoint__=np.array([{"a": 1}], dtype=object))  # pickled content is refused, not loaded
    pickled = _run("train", "--resume", run)
    assert pickled.returncode == 1 and "Traceback" not in pickled.stderr
    assert "pickled Python objects, which dlcli never loads" in pickled.stderr and "allow_pickle" not in pickled.stderr


def test_nan_loss_stops_with_divergence_report(tmp_path):
    config = _write_config(tmp_path, units=8, lr=1e6, samples=200, scale=1e3, optimizer="sgd")
    result = _run("train", config, "--runs-dir", tmp_path / "runs", "--set", "train.divergence_factor=null")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training diverged" in result.stderr and "batch" in result.stderr and "Traceback" not in result.stderr
    run = _only_run(tmp_path / "runs")
    report = json.loads((run / "divergence.json").read_text())
    assert report["non_finite"] == "loss"
    assert report["sample_indices"] and report["learning_rate"] == 1e6 and report["recent_norms"]
    # the weights are still finite (the gate stops before the update): the output layer's logits overflow first
    assert report["diagnosis"]["nonfinite_weights"] == [] and report["diagnosis"]["first_nonfinite_forward"] == "out"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "diverged" and meta["hint"]


def test_a_finite_loss_blowing_up_is_divergence_not_completion(tmp_path):
    """RMSprop at learning rate 1e6 keeps the loss finite (clipped cross-entropy) but 1e4+ times its start."""
    config = _write_config(tmp_path, units=8, lr=1e6, samples=200, optimizer="rmsprop")
    result = _run("train", config, "--runs-dir", tmp_path / "runs")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training diverged: the loss rose to" in result.stderr and "divergence_factor (10000)" in result.stderr
    run = _only_run(tmp_path / "runs")
    report = json.loads((run / "divergence.json").read_text())
    assert report["non_finite"] is None and float(report["loss"]) > 1e4 * max(report["rule"]["initial_loss"], 1)
    assert report["rule"]["divergence_factor"] == 1e4 and 0.5 < report["rule"]["initial_loss"] < 3  # ~ln 3
    assert json.loads((run / "meta.json").read_text())["status"] == "diverged"

    off = _run("train", config, "--runs-dir", tmp_path / "off", "--set", "train.divergence_factor=null",
               "--set", "train.epochs=1")
    assert off.returncode == 0, off.stderr  # the rule is configurable; null keeps only the NaN/inf stop
    position = checkpoint.load(_only_run(tmp_path / "off"))["header"]["position"]
    assert 0.5 < position["initial_loss"] < 3  # checkpointed, so a resumed run applies the same threshold


def test_unwritable_runs_dir_is_a_clear_error(tmp_path):
    config = _write_config(tmp_path, units=8, samples=100)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _run("train", config, "--runs-dir", blocker / "runs")
    assert result.returncode == 1 and "cannot create runs directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_init_from_starts_fresh_from_weights(reference, tmp_path):
    tmp, config, ref = reference
    result = _run("train", config, "--init-from", ref, "--runs-dir", tmp_path / "runs", "--set", "train.epochs=1")
    assert result.returncode == 0, result.stderr
    assert "weights from" in result.stdout and "best.npz" in result.stdout
    run = _only_run(tmp_path / "runs")
    assert checkpoint.load(run)["header"]["position"]["step"] == 150  # 1200 samples / batch 8: counters restarted
    # the weights it started from are the source's best: zero epochs of training reproduce them exactly
    zero = _run("train", config, "--init-from", ref, "--runs-dir", tmp_path / "zero", "--set", "train.epochs=1",
                "--set", "compile.optimizer.learning_rate=0.0", "--set", "model.layers.1.rate=0.0")
    assert zero.returncode == 0, zero.stderr
    with np.load(ref / "weights" / "best.npz") as f:
        source = {k: f[k] for k in f.files}
    started = _weights(_only_run(tmp_path / "zero"))
    assert sorted(started) == sorted(source)
    for k in source:
        np.testing.assert_array_equal(started[k], source[k], err_msg=k)
