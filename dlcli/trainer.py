"""The epoch x batch loop behind `Model.fit`: shuffling, metrics, validation and callback hooks."""
import time

import numpy as np

from dlcli import metrics as metrics_module
from dlcli.callbacks import CallbackList, History, ProgressLogger


class Trainer:
    def __init__(self, model, callbacks=None, verbose=1, rng: np.random.Generator | None = None):
        self.model = model
        self.user_callbacks = list(callbacks or [])
        self.verbose = verbose
        self.rng = rng if rng is not None else np.random.default_rng()
        self.stop_requested = False  # set from a signal handler: finish the batch, then stop
        self.epoch, self.batch = 0, 0

    def fit(self, xs, ys, epochs=1, batch_size=32, validation_data=None, shuffle=True, class_weight=None,
            sample_weight=None, initial_epoch=0) -> History:
        model = self.model
        n = len(xs[0])
        history = History()
        callbacks = [history] + ([ProgressLogger(epochs, n)] if self.verbose else []) + self.user_callbacks
        cbs = CallbackList(callbacks)
        cbs.set_model(model)
        model.stop_training = False
        model.history = history
        weights = _sample_weights(ys[0], n, class_weight, sample_weight)
        loss_mean = metrics_module.Mean()
        part_means = [metrics_module.Mean() for _ in ys]
        names = model._metric_names()
        cbs.on_train_begin()
        logs = {}
        for epoch in range(initial_epoch, epochs):
            self.epoch = epoch
            start = time.perf_counter()
            cbs.on_epoch_begin(epoch)
            # Permutation drawn even without shuffling, so the RNG stream is the same either way.
            order = self.rng.permutation(n)
            loss_mean.reset()
            for pm in part_means:
                pm.reset()
            for ms in model.metrics:
                for m in ms:
                    m.reset()
            for batch, begin in enumerate(range(0, n, batch_size)):
                self.batch = batch
                if shuffle:
                    idx = np.sort(order[begin:begin + batch_size])  # sorted gathers read memory in order
                    xb, yb = [a[idx] for a in xs], [a[idx] for a in ys]
                    wb = None if weights is None else weights[idx]
                else:
                    sl = slice(begin, begin + batch_size)
                    xb, yb = [a[sl] for a in xs], [a[sl] for a in ys]
                    wb = None if weights is None else weights[sl]
                cbs.on_train_batch_begin(batch)
                total, parts, outs = model.train_step(xb, yb, wb)
                size = len(yb[0])
                loss_mean.update(total, size)
                for pm, v in zip(part_means, parts):
                    pm.update(v, size)
                for y, out, ms in zip(yb, outs, model.metrics):
                    for m in ms:
                        m.update(y, out, wb)
                batch_logs = {"batch": batch, "size": size, **self._results(names, loss_mean, part_means)}
                cbs.on_train_batch_end(batch, batch_logs)
                if model.stop_training or self.stop_requested:
                    break
            logs = self._results(names, loss_mean, part_means)
            if validation_data is not None and not self.stop_requested:
                val = model.evaluate_arrays(validation_data[0], validation_data[1], batch_size)
                logs.update({f"val_{k}": v for k, v in val.items()})
            logs["learning_rate"] = float(model.optimizer.current_lr)
            logs["seconds"] = time.perf_counter() - start
            cbs.on_epoch_end(epoch, logs)
            if model.stop_training or self.stop_requested:
                break
        cbs.on_train_end(logs)
        return history

    def _results(self, names, loss_mean, part_means) -> dict:
        values = [loss_mean.result()]
        if len(part_means) > 1:
            values += [pm.result() for pm in part_means]
        values += [m.result() for ms in self.model.metrics for m in ms]
        return {k: float(v) for k, v in zip(names, values)}


def _sample_weights(y, n, class_weight, sample_weight):
    """Per-sample weights from Keras' `class_weight` ({class: weight}) and/or `sample_weight`."""
    weights = None if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(n)
    if class_weight:
        labels = y.reshape(n, -1).argmax(1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(n).astype(int)
        table = np.ones(int(max(max(class_weight), labels.max())) + 1)
        for k, v in class_weight.items():
            table[int(k)] = v
        cw = table[labels]
        weights = cw if weights is None else weights * cw
    return weights
