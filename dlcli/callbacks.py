"""Callbacks (Keras' hooks): History, progress output, and the training-control callbacks a config can name.

Printing is a callback too, so the trainer and library users stay silent unless they ask for output.
"""
import sys
import time

from dlcli.registry import Registry

CALLBACKS = Registry("callback")


class Callback:
    """Keras' hook names; `self.model` is set before training starts."""

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs=None): ...
    def on_train_end(self, logs=None): ...
    def on_epoch_begin(self, epoch, logs=None): ...
    def on_epoch_end(self, epoch, logs=None): ...
    def on_train_batch_begin(self, batch, logs=None): ...
    def on_train_batch_end(self, batch, logs=None): ...

    def get_state(self) -> dict:
        """JSON-safe state to checkpoint (patience counters, best values) for an exact resume."""
        return {}

    def set_state(self, state: dict): ...


class CallbackList(Callback):
    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def __getattribute__(self, name):
        if name.startswith("on_") or name == "set_model":
            def call_all(*args, **kwargs):
                for cb in object.__getattribute__(self, "callbacks"):
                    getattr(cb, name)(*args, **kwargs)
            return call_all
        return object.__getattribute__(self, name)


class History(Callback):
    """`history.history[name]` is the list of per-epoch values, as in Keras."""

    def __init__(self):
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)


def format_logs(logs: dict, skip=("epoch", "seconds", "learning_rate")) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k not in skip and isinstance(v, (int, float)))


class ProgressLogger(Callback):
    """A tqdm bar per epoch on a terminal (live loss/metrics, samples/s); one plain line per epoch otherwise."""

    def __init__(self, epochs: int, samples: int, stream=None, bar: bool | None = None):
        self.epochs, self.samples = epochs, samples
        self.stream = stream or sys.stdout
        self.bar = self.stream.isatty() if bar is None else bar
        self.pbar = None

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.seen, self.last_post = time.perf_counter(), 0, 0.0
        if self.bar:
            from tqdm import tqdm

            self.pbar = tqdm(total=self.samples, desc=f"epoch {epoch + 1}/{self.epochs}", unit="sample",
                             unit_scale=True, leave=False, file=self.stream, dynamic_ncols=True)

    def on_train_batch_end(self, batch, logs=None):
        if self.pbar is None:
            return
        size = logs.get("size", 0)
        self.pbar.update(size)
        now = time.perf_counter()
        if now - self.last_post > 0.25:  # formatting every batch would cost more than a small batch's maths
            self.last_post = now
            self.pbar.set_postfix_str(format_logs(logs, skip=("size", "batch")), refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        seconds = logs.get("seconds", time.perf_counter() - self.start)
        rate = self.samples / seconds if seconds > 0 else 0.0
        print(f"epoch {epoch + 1}/{self.epochs}  {format_logs(logs)}  ({seconds:.1f}s, {rate:,.0f} samples/s)",
              file=self.stream, flush=True)
