"""The Callback protocol (Keras' hook names) and the registry of callbacks a config can name. The callbacks
themselves register from their own modules: dlcli.callbacks (Keras' training-control ones) and dlcli.trackers."""
from dlcli.registry import Registry

CALLBACKS = Registry("callback")


class Callback:
    """Keras' hook names; `self.model` is set before training starts."""

    def set_model(self, model):
        self.model = model

    def set_params(self, params: dict):
        """Keras' callback.params: {'epochs': ..., 'samples': ..., 'batch_size': ...} of the fit."""
        self.params = params

    def on_run_begin(self, run):
        """`dlcli.train` (Run.train) calls this once the run directory exists and the data is loaded, before the
        first epoch; `run` is the live dlcli.trainer.Run (its dir, sizes, model). Callbacks observe: `run.stop(status)`
        is the one way to end the run early (after the batch, with a checkpoint)."""

    def on_run_end(self, run):
        """Run.train calls this once the run directory is complete (meta.json, history.csv, curves.png written), whatever ended the
        run: `run.status` is completed, interrupted, diverged, failed or the status given to `run.stop`."""

    def on_train_begin(self, logs=None): ...
    def on_train_end(self, logs=None): ...
    def on_epoch_begin(self, epoch, logs=None): ...
    def on_epoch_end(self, epoch, logs=None): ...
    def on_train_batch_begin(self, batch, logs=None): ...
    def on_train_batch_end(self, batch, logs=None): ...
    def on_test_begin(self, logs=None): ...  # around each epoch's validation
    def on_test_end(self, logs=None): ...

    def get_state(self) -> dict:
        """JSON-safe state to checkpoint (patience counters, best values) for an exact resume."""
        return {}

    def set_state(self, state: dict): ...


class RankZeroCallback(Callback):
    """A callback whose effects leave the process (files, logs, requests): in a data-parallel run only rank 0 has
    them (every rank holds the same weights and epoch logs), so `active` is false on the others. Its state (a best
    value, rows) is kept on every rank alike."""

    active = True

    def on_run_begin(self, run):
        self.active = run.world.is_root
