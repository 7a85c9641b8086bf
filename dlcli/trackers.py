"""Callbacks that log a run to the experiment trackers people already use: TensorBoard (through tensorboardX, an
event writer without TensorFlow) and MLflow. Both are the optional extra `dlcli[tracking]`.

They are ordinary callbacks in the registry (`train.callbacks: [{type: TensorBoard}]`); a run hands them its
directory and resolved config (`on_run_begin`) and its final status once the run directory is complete
(`on_run_end`).
"""
import fcntl
import logging
import os
import time
from pathlib import Path

import numpy as np

from dlcli.callback import CALLBACKS, RankZeroCallback
from dlcli.errors import DlcliError, require


@CALLBACKS.register("TensorBoard")
class TensorBoard(RankZeroCallback):
    """Event files TensorBoard reads, laid out as Keras 3 writes them: `log_dir/train` and `log_dir/validation`,
    each with `epoch_<metric>` scalars (so train and validation curves overlay), `epoch_learning_rate`,
    `batch_<metric>` every `update_freq` batches ('epoch': none; 'batch': every batch; N: every N), weight
    histograms every `histogram_freq` epochs, and the model summary as text when `write_graph`.

    `log_dir` defaults to the run directory's `tensorboard/` (`tensorboard --logdir runs` shows every run).
    """

    def __init__(self, log_dir: str | None = None, histogram_freq: int = 0, write_graph: bool = True,
                 update_freq: str | int = "epoch"):
        self.writer_class = require("tensorboardX", "tracking", "the TensorBoard callback").SummaryWriter
        if update_freq not in ("epoch", "batch") and not (isinstance(update_freq, int) and update_freq >= 1):
            raise DlcliError(f"TensorBoard update_freq must be 'epoch', 'batch' or a number of batches >= 1; "
                             f"got {update_freq!r}", exit_code=2)
        self.log_dir, self.histogram_freq, self.write_graph = log_dir, int(histogram_freq), bool(write_graph)
        self.update_freq = 1 if update_freq == "batch" else 0 if update_freq == "epoch" else int(update_freq)
        self.writers: dict = {}

    def on_run_begin(self, run):
        super().on_run_begin(run)
        if self.log_dir is None:
            self.log_dir = str(run.files.tensorboard)

    def writer(self, split: str):
        if split not in self.writers:
            if self.log_dir is None:
                raise DlcliError("the TensorBoard callback needs log_dir outside a run directory")
            self.writers[split] = self.writer_class(logdir=os.path.join(self.log_dir, split), flush_secs=30)
        return self.writers[split]

    def on_train_begin(self, logs=None):
        if not self.active:
            return
        if self.write_graph:
            lines = []
            self.model.summary(print_fn=lines.append)
            # TensorBoard renders text summaries as markdown: indent to keep the table's columns
            self.writer("train").add_text("model", "\n".join("    " + line for line in lines), 0)

    def on_train_batch_end(self, batch, logs=None):
        if not self.active:
            return
        if not self.update_freq or (batch + 1) % self.update_freq:
            return
        step = int(self.model.optimizer.iterations)
        for name, value in _scalars(logs, skip=("batch", "size")).items():
            self.writer("train").add_scalar(f"batch_{name}", value, step)

    def on_epoch_end(self, epoch, logs=None):
        if not self.active:
            return
        for name, value in _scalars(logs, skip=("seconds",)).items():
            split = "validation" if name.startswith("val_") else "train"
            self.writer(split).add_scalar(f"epoch_{name.removeprefix('val_')}", value, epoch)
        if self.histogram_freq and (epoch + 1) % self.histogram_freq == 0:
            for name, value in self.model.weights_dict().items():
                self.writer("train").add_histogram(name.removeprefix("weights/"), np.asarray(value), epoch)
        for w in self.writers.values():
            w.flush()

    def on_train_end(self, logs=None):
        for w in self.writers.values():
            w.close()
        self.writers = {}


@CALLBACKS.register("MLflow")
class MLflow(RankZeroCallback):
    """One MLflow run per dlcli run: the resolved config as params (dotted paths, as --set writes them), every epoch's
    logs as metrics (step = epoch), the run directory as artifacts at the end, the status as the run's state.

    The tracking URI is `tracking_uri`, else $MLFLOW_TRACKING_URI, else a local `mlruns/` (an SQLite store,
    `mlruns/mlflow.db`, with artifacts beside it: MLflow 3 keeps the plain-file store in maintenance mode).
    The experiment defaults to the config's name; a resumed run logs into the same MLflow run.
    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None,
                 run_name: str | None = None, log_artifacts: bool = True):
        require("mlflow", "tracking", "the MLflow callback")
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.log_artifacts = bool(log_artifacts)
        self.run_dir, self.config, self.run_id, self.client = None, {}, None, None

    def on_run_begin(self, run):
        super().on_run_begin(run)
        self.run_dir, self.config = Path(run.dir), run.config.to_dict()  # plain data: logged as flat params
        self.experiment_name = self.experiment_name or run.config.name or "dlcli"
        self.run_name = self.run_name or self.run_dir.name

    def _client(self):
        from mlflow.tracking import MlflowClient

        # MLflow's INFO lines ("Creating initial MLflow database tables...") are not the run's output
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            Path("mlruns").mkdir(exist_ok=True)
            uri = "sqlite:///mlruns/mlflow.db"
            # sweep workers starting together would each create (migrate) the new database: one at a time
            with open("mlruns/.dlcli.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                return MlflowClient(tracking_uri=uri)
        return MlflowClient(tracking_uri=uri)

    def on_train_begin(self, logs=None):
        if not self.active:
            return
        from mlflow.entities import Param

        from dlcli.yaml_lines import flatten

        self.client = self._client()
        self.experiment_name = self.experiment_name or "dlcli"
        if self.run_id is not None:  # resumed: same MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if not (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
                artifacts = Path("mlruns").resolve().as_uri()
            experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=artifacts and
                                                          f"{artifacts}/{self.experiment_name}")
        tags = {"dlcli.run_dir": str(self.run_dir)} if self.run_dir else {}
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
        # MLflow caps a param value at 6000 characters (a long layer list, say)
        params = [Param(k, str(v)[:6000]) for k, v in flatten(self.config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def on_epoch_end(self, epoch, logs=None):
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in _scalars(logs, skip=()).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_train_end(self, logs=None):
        if self.active and self.run_dir is None:  # a plain model.fit, no run directory to wait for
            self.client.set_terminated(self.run_id, status="FINISHED")

    def on_run_end(self, run):
        if not self.active or self.client is None or self.run_id is None:
            return  # the run failed before training started
        if self.log_artifacts:
            # the finished run directory (checkpoint/ is only for --resume, and the largest part)
            for item in sorted(Path(run.dir).iterdir()):
                if item.name.startswith(".") or item == run.files.checkpoint.parent:
                    continue
                if item.is_dir():
                    self.client.log_artifacts(self.run_id, str(item), item.name)
                else:
                    self.client.log_artifact(self.run_id, str(item))
        self.client.set_tag(self.run_id, "dlcli.status", run.status)
        state = {"completed": "FINISHED", "interrupted": "KILLED"}.get(run.status, "FAILED")
        self.client.set_terminated(self.run_id, status=state)

    def get_state(self):
        return {"run_id": self.run_id}

    def set_state(self, state):
        self.run_id = state.get("run_id")


def _scalars(logs, skip) -> dict:
    return {k: float(v) for k, v in (logs or {}).items()
            if k not in skip and isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}
