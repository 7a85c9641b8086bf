"""A tiny classification config with a sweep: section, and helpers to run `dlcli sweep` as a real process."""
import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.runs_fixture import write_class_npz

ROOT = Path(__file__).resolve().parents[1]

SWEEP_CONFIG = """\
name: tiny-sweep
seed: 0
data: {{type: npz, path: {data}, x_test: x_test, y_test: y_test}}
model:
  input_shape: [8]
  layers:
    - {{type: Dense, units: 8, activation: relu}}
    - {{type: Dense, units: 3, activation: softmax}}
compile:
  optimizer: {{type: adam, learning_rate: 0.01}}
  loss: sparse_categorical_crossentropy
  metrics: [accuracy]
train: {{epochs: {epochs}, batch_size: 32, validation_split: 0.25}}
sweep:
  metric: val_loss
  trials: 4
  sampler: {sampler}
  pruner: {pruner}
  seed: 0
  parameters:
{parameters}
"""

PARAMETERS = """\
    compile.optimizer.learning_rate: {type: float, low: 0.003, high: 0.03, log: true}
    model.layers.0.units: {type: categorical, choices: [4, 8, 16]}
"""


def write_sweep_config(folder: Path, epochs=2, sampler="tpe", pruner="none", parameters=PARAMETERS) -> Path:
    write_class_npz(folder / "data.npz", 240, test=40, threshold=0.5)
    path = folder / "sweep.yaml"
    path.write_text(SWEEP_CONFIG.format(data=folder / "data.npz", epochs=epochs, sampler=sampler, pruner=pruner,
                                        parameters=parameters))
    return path


DLCLI = [str(Path(sys.executable).parent / "dlcli")]  # the console script `pip install -e .` put beside python


def dlcli(*args, timeout=300, cwd=None):
    """`dlcli ...` as a separate process, output captured."""
    return subprocess.run([*DLCLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=cwd or ROOT)


def start_dlcli(*args, cwd=None):
    return subprocess.Popen([*DLCLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=cwd or ROOT)


def read_trials(study_dir: Path) -> list[dict]:
    with open(study_dir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))
