"""One data-parallel training job, run by tests/test_distributed.py under `mpiexec -n 2` (and in-process with one
rank as the reference): python tests/distributed_job.py CASE OUT.npz [resume|stop-at=B|fail-at=B] [report-after=S]
(report-after: rank 0 takes S seconds to print a failure, as a loaded machine may)

Rank 0 writes OUT.npz: the final weights, the history, and a hash of every rank's weights (gathered to rank 0).
"""
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlcli import callbacks, checkpoint, distributed, layers, models  # noqa: E402
from dlcli.data import Dataset  # noqa: E402
from dlcli.engine.layer import clear_session  # noqa: E402
from dlcli.run_files import RunDir  # noqa: E402
from dlcli.trainer import Run  # noqa: E402

EPOCHS = 2


def case(name: str):
    """(model, xs, ys, batch_size): small, seeded, with a dataset size that does not divide by 2 and a last batch
    that leaves one rank without a sample (dense_adam, conv_bn) or splits unevenly (lstm)."""
    clear_session()
    rng = np.random.default_rng(1)
    if name == "dense_adam":
        x = rng.normal(size=(101, 6)).astype(np.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
        model = models.Sequential([layers.Dense(16, activation="relu", input_shape=(6,)),
                                   layers.Dense(3, activation="softmax")])
        model.build(rng=np.random.default_rng(0))  # seeded weights: every rank and run starts equal
        model.compile(optimizer={"type": "adam", "learning_rate": 0.01}, loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return model, [x], [y], 10
    if name == "dropout":  # rank-specific dropout masks: 2 ranks differ from 1 process, but resume exactly
        x = rng.normal(size=(101, 6)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        model = models.Sequential([layers.Dense(16, activation="relu", input_shape=(6,)), layers.Dropout(0.3),
                                   layers.Dense(2, activation="softmax")])
        model.build(rng=np.random.default_rng(0))  # seeded weights: every rank and run starts equal
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model, [x], [y], 10
    if name == "conv_bn":
        x = rng.normal(size=(33, 8, 8, 1)).astype(np.float32) * 2 + 0.5
        y = (x.mean((1, 2, 3)) > 0.5).astype(np.int64)
        model = models.Sequential([layers.Conv2D(4, 3, input_shape=(8, 8, 1)), layers.BatchNormalization(),
                                   layers.Activation("relu"), layers.MaxPooling2D(2), layers.Flatten(),
                                   layers.Dense(8), layers.BatchNormalization(), layers.Activation("relu"),
                                   layers.Dense(2, activation="softmax")])
        model.build(rng=np.random.default_rng(0))  # seeded weights: every rank and run starts equal
        model.compile(optimizer={"type": "sgd", "learning_rate": 0.05, "momentum": 0.9},
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model, [x], [y], 8
    if name == "lstm":
        x = rng.normal(size=(45, 7, 3)).astype(np.float32)
        y = x[:, :, 0].sum(1, keepdims=True).astype(np.float32)
        model = models.Sequential([layers.LSTM(8, input_shape=(7, 3)), layers.Dense(1)])
        model.build(rng=np.random.default_rng(0))  # seeded weights: every rank and run starts equal
        model.compile(optimizer="rmsprop", loss="mse", metrics=["mae"])
        return model, [x], [y], 16
    if name == "masked_bn":  # BatchNormalization's statistics over unmasked steps only, summed across ranks
        x = rng.normal(size=(37, 6, 3)).astype(np.float32) + 1.0
        for i, length in enumerate(rng.integers(2, 7, len(x))):
            x[i, length:] = 0.0  # padding, masked out
        y = (x[:, :, 0].sum(1) > 3).astype(np.int64)
        model = models.Sequential([layers.Masking(0.0, input_shape=(6, 3)), layers.BatchNormalization(),
                                   layers.LSTM(4), layers.Dense(2, activation="softmax")])
        model.build(rng=np.random.default_rng(0))  # seeded weights: every rank and run starts equal
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model, [x], [y], 8
    raise SystemExit(f"unknown case {name}")


class StopAt(callbacks.Callback):
    """Asks to stop after global batch `batch` of the first epoch, on rank 0 only (as a signal to one rank would)."""

    def __init__(self, trainer, batch, world):
        self.trainer, self.at, self.world = trainer, batch, world

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer.epoch == 0 and batch == self.at and self.world.rank == 0:
            self.trainer.stop()


class FailAt(callbacks.Callback):
    """Raises on the last rank at global batch `batch`."""

    def __init__(self, batch, world):
        self.at, self.world = batch, world

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.at and self.world.rank == self.world.size - 1:
            raise ValueError(f"injected failure at batch {batch}")


def run(name, out, mode="", world=None, state_dir=None):
    """Train CASE in `world` (this process's MPI world by default); returns (weights, history, position)."""
    world = world or distributed.world(True)
    model, xs, ys, batch_size = case(name)
    files = RunDir.for_rank(Path(state_dir or Path(out).parent) / f"{name}-run", world)  # rank 0 writes
    trainer = Run(model, verbose=0, rng=np.random.default_rng(7), world=world, files=files, checkpoint_every=3)
    extra = []
    if mode.startswith("stop-at="):
        extra.append(StopAt(trainer, int(mode.split("=")[1]), world))
    if mode.startswith("fail-at="):
        extra.append(FailAt(int(mode.split("=")[1]), world))
    trainer.callbacks += extra
    resume = checkpoint.load(files.checkpoint) if mode == "resume" and world.is_root else None
    history = trainer.fit(Dataset(xs, ys), epochs=EPOCHS, batch_size=batch_size, resume=resume)
    weights = model.get_weights()
    digest = hashlib.sha256(b"".join(w.tobytes() for w in model.weights_dict().values())).hexdigest()
    hashes = world.gather_json(digest)
    streams = world.gather_json({k: g.bit_generator.state for k, g in checkpoint.layer_rngs(model).items()})
    if world.is_root and out:
        np.savez(out, *weights, hashes=np.array(json.dumps(hashes)), streams=np.array(json.dumps(streams)), history=np.array(json.dumps(history.history)),
                 stopped=np.array(trainer.stop_agreed or trainer.stopping is not None))
    return weights, history.history


if __name__ == "__main__":
    try:
        run(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
    except BaseException as e:  # as the CLI does: rank 0 prints the one message, every rank exits with its code
        if distributed.world(True).is_root:
            if len(sys.argv) > 4 and sys.argv[4].startswith("report-after="):
                time.sleep(float(sys.argv[4].split("=")[1]))
            print(f"error: {distributed.failure_text(e)}", file=sys.stderr, flush=True)
        sys.exit(distributed.failure_code(e))
