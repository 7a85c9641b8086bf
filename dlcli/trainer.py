"""A training run, one object (`Run`): `Run.fit` is the epoch x batch loop behind `Model.fit` (shuffling, metrics,
validation, callback hooks, resumable checkpoints, the stop on divergence); `Run.train` is a whole run into its run
directory around it, behind `dlcli.train` and each K-fold fold. Callbacks observe; `run.stop(status)` (a flag) ends
a run after the batch.

Resuming is exact: a checkpoint keeps the shuffling RNG's state from the start of its epoch, so a run resumed
mid-epoch draws the same permutation and continues at the next batch, with the epoch's running metric sums intact.

Data-parallel (a `world` of several ranks, dlcli.distributed): `batch_size` is the global batch; every rank draws
the same permutation and trains on its slice of each batch; one exchange per step sums gradients, loss and metric
sums, so every rank holds the global figures and identical weights. Only rank 0 reports progress and writes.
"""
import math
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from dlcli import checkpoint, distributed, kernels, mixing, plots, run_files
from dlcli.callbacks import CALLBACKS, Callback, CallbackList, History, ModelCheckpoint, ProgressLogger, format_logs
from dlcli.data.source import ArraySource, as_source, batch_indices, index_array
from dlcli.engine import lanes
from dlcli.errors import DlcliError
from dlcli.metrics import RunningLogs

NORM_HISTORY = 20  # recent (weight norm, gradient norm) pairs kept for divergence.json
# The norms are one pass over every weight and every gradient: 7% of the book MLP's batch when taken at every step.
# Taken at every NORM_EVERY-th optimizer step (the first included) they cost under 1%; the loss rules below still run
# at every step. A non-finite gradient on a step in between reaches the weights, and the next step stops on its
# non-finite loss (divergence.json then lists the non-finite weights).
NORM_EVERY = 10
# Divergence beyond NaN: a finite loss that rises `divergence_factor` times above the run's initial loss (its first
# batch, computed before any update, floored at 1 so a near-zero start is not a hair trigger) stops the run as a NaN
# does. 1e4 is four orders of magnitude: far beyond the noise of a healthy run, whose loss falls.
DIVERGENCE_FACTOR = 1e4
_ONE_PASS = nullcontext()  # a step whose layers do not split their batch over lanes (reusable: it holds nothing)


class RunRecorder(Callback):
    """Writes the run's history.csv (rewritten whole, atomically, each epoch) and appends to train.log.

    Weights are ModelCheckpoint's job (weights/best.npz, weights/last.npz); resumable state is the run's
    (checkpoint/state.npz)."""

    def __init__(self, files: run_files.RunDir):
        self.files, self.rows = files, []

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch + 1, **logs})
        self.files.write_text(self.files.history, run_files.history_csv(self.rows))
        self.files.append_log(f"epoch {epoch + 1}  {format_logs(logs)}  ({logs.get('seconds', 0):.1f}s)\n")

    def on_run_end(self, run):
        if not self.files.history.exists():  # stopped before its first epoch ended (Ctrl-C, a failure)
            self.files.write_text(self.files.history, "epoch\n")
            self.files.append_log(f"{run.status} before the first epoch ended\n")


class Run:
    """One training run: its loop (`fit`, behind Model.fit) and, in a run directory, its whole lifecycle (`train`,
    behind dlcli.train and each K-fold fold). Callbacks get the live Run in `on_run_begin` and observe it;
    `dlcli.train` returns it (dir, status, history, test ...)."""

    def __init__(self, model, callbacks=(), verbose=1, rng: np.random.Generator | None = None, *,
                 files: run_files.RunDir | None = None, config=None, data=None, checkpoint_every: int | None = None,
                 world: distributed.World | None = None, divergence_factor: float | None = DIVERGENCE_FACTOR,
                 init_from=None, resumed: str | None = None, config_changes=(), kfold_dir=None):
        self.model = model
        self.files = files  # the run directory (a NoRunDir on ranks other than 0); None: Model.fit, no directory
        self.dir: Path | None = None if files is None else files.path
        self.config = config  # the validated Config (dlcli.config); `.to_dict()` is what config.yaml holds
        self.data = data  # the run's Dataset, fitted to the model (dlcli.data.dataset.load_fitted)
        self.callbacks = list(callbacks or [])
        self.verbose = verbose
        self.rng = rng if rng is not None else np.random.default_rng()
        self.checkpoint = None if files is None else files.checkpoint  # resumable (a fold's own, in K-fold)
        self.checkpoint_every = checkpoint_every
        self.world = world or distributed.World()  # the ranks training it
        self.divergence_factor = divergence_factor
        self.init_from: Path | None = init_from  # the weights file a fine-tuning run started from
        self.resumed = resumed  # where a resumed run continues, for people
        self.config_changes = list(config_changes)  # lines naming what a resume changed
        self.kfold_dir: Path | None = kfold_dir  # a fold's K-fold run: the directory --resume continues
        # what the run has done: status is then "completed", "interrupted", "diverged", "failed" or the status given
        # to stop(); history the per-epoch rows as in history.csv (earlier ones on a resume); test the test split's
        # loss and metrics (completed runs with one); position the last checkpoint's (epoch, batch, step ...)
        self.status, self.history, self.test, self.seconds = "running", [], None, 0.0
        self.best_epoch: int | None = None
        self.position: dict | None = None
        self.stopping: str | None = None  # the status stop() asked for
        self.stop_agreed = False  # every rank's stop request, summed by the step's exchange
        self.exchange = self.bn_sync = None
        self.epoch, self.batch, self.samples_seen = 0, 0, 0
        self.rows = None  # the step's samples: (selection, training-set size); None: the whole batch given
        self.initial_loss: float | None = None  # the run's first batch loss (checkpointed)
        self.checkpoint_header: dict = {}  # what the run adds to each checkpoint's header (its config record)
        self.norms: deque = deque(maxlen=NORM_HISTORY)
        self.mix, self.mix_seed = None, 0  # train.mix (dlcli.mixing) and the seed of its draws
        self.step_layers = None  # fit's _step_layers(model), found once per fit (a step alone looks them up)

    @classmethod
    def in_dir(cls, files: run_files.RunDir, config, model, data, callbacks=(), verbose=1, world=None,
               **record) -> "Run":
        """A run writing the run directory `files` (created, config.yaml written): RunRecorder, the config's
        train.callbacks and a ModelCheckpoint writing weights/ (the default monitors val_loss, or loss without a
        validation split), then `callbacks`. `record`: init_from, resumed, config_changes, kfold_dir. A callback
        that cannot start fails here."""
        user = [CALLBACKS.create(spec) for spec in config.train.callbacks]
        if not any(isinstance(cb, ModelCheckpoint) for cb in user):
            user.append(ModelCheckpoint(monitor="val_loss" if data.x_val is not None else "loss"))
        savers = [cb for cb in user if isinstance(cb, ModelCheckpoint)]
        for cb in savers:
            cb.filepath = cb.filepath or str(files.weights)
        recorder = RunRecorder(files)
        run = cls(model, [recorder, *user, *callbacks], verbose, np.random.default_rng([config.seed, 2]),
                  files=files, config=config, data=data, checkpoint_every=config.train.checkpoint_every,
                  world=world, divergence_factor=config.train.divergence_factor, **record)
        run.recorder, run.saver = recorder, savers[0]  # history.csv's rows, best epoch
        run.mix = mixing.get(config.train.mix)
        run.mix_seed = config.seed if run.mix is None or run.mix.seed is None else run.mix.seed
        return run

    @property
    def sizes(self) -> dict:
        """Samples per split: train, validation, test."""
        return self.data.sizes()

    def stop(self, status: str = "stopped"):
        """End the run after the current batch, with a checkpoint it can resume from; `status` says why (meta.json,
        Run.status). Safe from a callback or a signal handler."""
        self.stopping = status

    def train(self, resume: dict | None = None) -> "Run":
        """The whole run: meta.json, on_run_begin, `fit` on the run's data, the test split evaluated, meta.json
        and curves.png completed, on_run_end. `resume` (dlcli.checkpoint.load of this run) continues exactly where
        the checkpoint stopped, appending to the same history.csv. A divergence writes divergence.json and
        re-raises the DivergenceError. With several ranks every rank calls this; rank 0 writes the run directory,
        and a failure on any rank stops them all."""
        from dlcli import fingerprint
        from dlcli.divergence import DivergenceError

        with self.world.guard():
            world, data, settings, files = self.world, self.data, self.config.train, self.files
            # what evaluate/predict/export/--resume check config.yaml against
            self.checkpoint_header = fingerprint.record(self.config.to_dict())
            meta = start_meta(self.config, self.model, data)
            if resume is not None and files.meta.exists():
                meta = {**run_files.read_json(files.meta), "status": "running", **self.checkpoint_header}
                meta.setdefault("resumed", []).append(
                    {"at": run_files.utc_now(), "position": checkpoint.describe_position(resume["header"]["position"])})
            files.write_json(files.meta, meta)
            if data.extra.get("vocabulary"):  # lets `dlcli predict` encode raw text the way the training data was
                files.write_json(files.vocabulary, data.extra["vocabulary"])
            if data.extra.get("feature_space"):  # a table's preprocessing: evaluate, predict, --resume reuse it
                files.write_json(files.feature_space, data.extra["feature_space"])
            if resume is not None and world.is_root:
                done = resume["header"]["position"]["epoch"]
                self.recorder.rows = [r for r in run_files.read_history(self.dir) if (r.get("epoch") or 0) <= done]
            self.history = self.recorder.rows
            for cb in self.callbacks:
                cb.on_run_begin(self)
            if resume is None:
                from dlcli.layers.normalization import adapt_to_inputs

                adapt_to_inputs(self.model, data.x_train)  # Normalization layers with adapt: true, before epoch 1
            start = time.perf_counter()
            try:
                self.fit(data, epochs=settings.epochs, batch_size=settings.batch_size, shuffle=settings.shuffle,
                         class_weight=settings.class_weight, resume=resume)
            except DivergenceError as e:
                files.write_json(files.divergence, e.report)
                meta.update({"status": "diverged", "end": run_files.utc_now(), "hint": e.report["hint"],
                             "diverged_at": {k: e.report[k] for k in ("epoch", "batch", "step")}})
                files.write_json(files.meta, meta)
                e.message += f" Details: {files.divergence}"
                self._run_ended("diverged", failing=True)
                raise
            except BaseException as e:  # keep meta.json honest when anything else stops the run
                self._run_ended(files.mark_failed(meta, e), failing=True)
                raise
            self.status = (self.stopping or "interrupted") if self.stopped() else "completed"
            self.seconds = time.perf_counter() - start
            if data.x_test is not None and self.status == "completed":
                self.test = self.evaluate_on_ranks(data.x_test, data.y_test, settings.batch_size)
            self.best_epoch, saver = self.saver.best_epoch, self.saver
            if data.x_train.describe():  # decode rate, cache, mapped file: where the input time went
                meta["input"] = data.x_train.describe()
            meta.update({"status": self.status, "end": run_files.utc_now(),
                         "seconds": round(self.seconds + meta.get("seconds", 0) if resume else self.seconds, 3),
                         "epochs_run": len(self.history), "best_epoch": saver.best_epoch,
                         "best": {saver.monitor: saver.best}, "test": self.test})
            files.write_json(files.meta, meta)
            plots.write_curves(files, self.history)
            self._run_ended(self.status)
            world.barrier()  # a failure in rank 0's last writes reaches the ranks that are done
        return self

    def _run_ended(self, status: str, failing: bool = False):
        """Tell the callbacks the run directory is final; while an error propagates, theirs must not replace it."""
        self.status = status
        for cb in self.callbacks:
            try:
                cb.on_run_end(self)
            except Exception:
                if not failing:
                    raise

    def fit(self, data, epochs=1, batch_size=32, shuffle=True, class_weight=None, sample_weight=None,
            initial_epoch=0, resume: dict | None = None) -> History:
        """Train on a Dataset's training split (arrays or Sources), validating on its validation split when it has
        one (Model.fit's loop); `resume` is a loaded checkpoint (dlcli.checkpoint.load) to continue from exactly (on
        rank 0: it reaches the other ranks from there)."""
        with self.world.guard():
            model, world = self.model, self.world
            xs, ys = as_source(data.x_train), data.y_train
            n = len(xs)
            history = History()
            verbose = self.verbose and world.is_root
            callbacks = [history] + ([ProgressLogger(epochs, n)] if verbose else []) + self.callbacks
            cbs = CallbackList(callbacks)
            cbs.set_model(model)
            cbs.set_params({"epochs": epochs, "samples": n, "batch_size": batch_size})
            model.stop_training = False
            model.history = history
            weights = _sample_weights(data, n, class_weight, sample_weight)
            self.logs = RunningLogs(model)
            self.step_layers = _step_layers(model)
            self.bn_sync = distributed.attach_batch_sync(model, world)
            if world.size > 1:
                self.exchange = distributed.GradientExchange(world, model.trainable_weights,
                                                             2 * len(self.logs.trackers))
                resume = distributed.share_checkpoint(world, resume)
                if resume is None:
                    distributed.share_initial_state(world, model)
                    distributed.rank_streams(world, model)
            position = None
            if resume is not None:
                position = checkpoint.restore(resume, model, self.callbacks)
                distributed.rank_streams(world, model, resume["header"].get("rank_rngs"))
                if (position["samples"], position["batch_size"]) != (n, batch_size):
                    raise DlcliError(f"{resume['path']} was written for {position['samples']:,} training samples in "
                                     f"batches of {position['batch_size']}; this run has {n:,} in batches of "
                                     f"{batch_size}: the data and train.batch_size must not change to resume")
                initial_epoch, self.samples_seen = position["epoch"], position["samples_seen"]
                self.position = position
                self.norms.extend(position.get("norms", []))
                self.initial_loss = position.get("initial_loss")
            # inputs in memory: each batch's targets are gathered with them, ahead of the step by the same thread (a
            # gather of their own took ~1.3 us of the training thread's CPU a batch of the book MLP)
            inputs_count = len(xs.arrays) if type(xs) is ArraySource else 0
            gathered = ArraySource(xs.arrays + list(ys)) if inputs_count else xs
            cbs.on_train_begin()
            batch_logs_wanted = cbs.listens("on_train_batch_end")
            batch_begin = cbs.on_train_batch_begin if cbs.listens("on_train_batch_begin") else None
            logs = {}
            for epoch in range(initial_epoch, epochs):
                self.epoch = epoch
                start = time.perf_counter()
                skip = 0
                if position is not None and epoch == position["epoch"]:
                    self.rng.bit_generator.state = position["rng"]
                    skip = position["batch"]
                    if skip:
                        self.logs.set_sums(position["sums"])
                if not skip:
                    self.logs.reset()
                self.epoch_rng_state = self.rng.bit_generator.state
                cbs.on_epoch_begin(epoch)
                # Permutation drawn even without shuffling, so the RNG stream is the same either way.
                order = self.rng.permutation(n)
                # the global batches' indices, and this rank's part of each (all of it on one rank)
                chunks = [self._rank_slice(c, n) for c in
                          batch_indices(n, batch_size, order if shuffle else None, first=skip)]
                with gathered.batches([sel for sel, _, _ in chunks]) as inputs:
                    for batch, ((sel, size, share), xb) in enumerate(zip(chunks, inputs), start=skip):
                        self.batch, self.rows = batch, (sel, n)
                        if self.bn_sync is not None:
                            self.bn_sync.ghost = share == 0.0
                        if inputs_count:
                            xb, yb = xb[:inputs_count], xb[inputs_count:]
                        else:
                            yb = [a[sel] for a in ys]
                        wb = None if weights is None else weights[sel]
                        partner = None
                        if self.mix is not None:
                            xb, yb, partner = self._mix(xb, yb, epoch, batch)
                        if batch_begin is not None:
                            batch_begin(batch)
                        self.step(xb, yb, wb, share, partner, self.logs)
                        self.samples_seen += size
                        if batch_logs_wanted:
                            cbs.on_train_batch_end(batch, {"batch": batch, "size": size, **self.logs.results()})
                        every = self.checkpoint_every
                        if self.stopped() or (every and (batch + 1) % every == 0 and batch + 1 < skip + len(chunks)):
                            self._check_weights(xb, yb, wb)
                            self.save_checkpoint(epoch, batch + 1, batch_size, n)
                        if model.stop_training or self.stopped():
                            break
                if self.stopped():
                    return history  # no epoch end: the checkpoint resumes inside this epoch
                if chunks:  # steps were taken: their weights are checked before validation or any callback sees them
                    self._check_weights(xb, yb, wb)
                logs = self.logs.results()
                if data.x_val is not None:
                    cbs.on_test_begin()
                    val = self.evaluate_on_ranks(data.x_val, data.y_val, batch_size)
                    cbs.on_test_end(val)
                    logs.update({f"val_{k}": v for k, v in val.items()})
                logs["learning_rate"] = float(model.optimizer.current_lr)
                logs["seconds"] = time.perf_counter() - start
                cbs.on_epoch_end(epoch, logs)
                self.save_checkpoint(epoch + 1, 0, batch_size, n)
                if model.stop_training or self.stopped():
                    break
            if not self.stopped():
                # use_ema: the weights become their averages, as Keras ends a fit; a resume from the last
                # checkpoint trains no epoch but ends the fit its run was killed in
                if epochs > initial_epoch or resume is not None:
                    model.optimizer.finalize_variable_values(model.trainable_weights)
                cbs.on_train_end(logs)
            return history

    def stopped(self) -> bool:
        """A stop request (run.stop: Ctrl-C, SIGTERM, a pruner) counts once every rank knows of it, so all stop at
        the same batch."""
        return self.stopping is not None if self.exchange is None else self.stop_agreed

    def _rank_slice(self, chunk, n):
        """(this rank's indices of the global batch `chunk`, the global batch's size, this rank's share of it).
        One rank takes the chunk as it is (a slice stays a view). A rank left without a sample (a global batch
        smaller than the rank count) runs one stand-in sample with share 0: collectives inside the step
        (BatchNormalization's) need every rank, and it adds nothing."""
        world = self.world
        if world.size == 1:
            return chunk, (len(range(n)[chunk]) if isinstance(chunk, slice) else len(chunk)), 1.0
        idx = index_array(chunk, n)
        size = len(idx)
        a, b = distributed.rank_share(size, world.rank, world.size)
        return (idx[-1:], size, 0.0) if a == b else (idx[a:b], size, (b - a) / size)

    def evaluate_on_ranks(self, xs, ys, batch_size) -> dict:
        """Loss and metrics over (xs, ys) (validation, the test split): with several ranks each takes a contiguous
        share and the sums are added."""
        world, model = self.world, self.model
        if world.size > 1:
            xs = as_source(xs)
            a, b = distributed.rank_share(len(xs), world.rank, world.size)
            xs, ys = xs.subset(slice(a, b)), [y[a:b] for y in ys]
        logs = model.evaluation_sums(xs, ys, batch_size)
        if world.size > 1:
            logs.set_sums(world.allreduce(np.asarray(logs.sums(), np.float64)).tolist())
        return logs.results(extra_loss=model.regularization_loss())

    def _mix(self, xb, yb, epoch, batch):
        """train.mix on one batch: (mixed inputs, targets, None) or, for a loss taking class labels, (mixed inputs,
        labels, (partner labels, each sample's share of its own, the labels metrics count)). Its draws are keyed by
        seed, epoch, batch and rank, so a resumed run mixes its batches as the uninterrupted one did."""
        rng = np.random.default_rng([self.mix_seed, 3, epoch, batch, self.world.rank])
        sparse = any(getattr(loss, "name", "").startswith("sparse_") for loss in self.model.losses)
        xs, ys, partner, own = self.mix.mix(list(xb), yb, rng, sparse)
        if partner is None:
            return xs, ys, None
        larger = [np.where(own.reshape((-1,) + (1,) * (y.ndim - 1)) >= 0.5, y, p) for y, p in zip(ys, partner)]
        return xs, ys, (partner, own, larger)

    def step(self, xb, yb, wb=None, share=1.0, partner=None, logs: RunningLogs | None = None):
        """One optimizer step, behind fit and Model.train_step: forward, loss, backward, gradient exchange (several
        ranks), divergence gate, update. The gate comes before the update, so a batch that diverges leaves the
        weights that produced it untouched (it can be re-run with checks); the gradients are cleared however the
        step ends. `partner` (train.mix on class labels) makes the loss w * loss(labels) + (1 - w) * loss(partner's
        labels) per sample. `logs` (fit's running sums) take the batch's loss and metrics (on several ranks: the
        global batch's, after the exchange) right after the loss, while its code and the outputs are still in the
        caches: after the backward pass and the update each of the metrics' NumPy calls cost 5-10 us more. Returns
        (loss plus regularisation, each output's loss, the outputs)."""
        model = self.model
        params, penalised, decayed, threads = self.step_layers or _step_layers(model)
        with lanes.spread(threads) if threads else _ONE_PASS:
            try:
                outs = model.graph.forward(xb, training=True)
                loss, parts, grads, yb = self._loss(yb, outs, wb, partner)
                if self.exchange is None and not math.isfinite(loss):  # stop before a backward pass on NaN
                    self._divergence_gate(loss, params, xb, yb, wb)
                if penalised:  # the penalties follow from the forward pass and the weights
                    loss += float(sum(layer.regularization_loss() for layer in penalised))
                if logs is not None and self.exchange is None:
                    logs.update(loss, parts, yb, outs, wb)
                if share != 1.0:  # this rank's part of the global batch
                    for g in grads:
                        g *= g.dtype.type(share)
                model.graph.backward(grads)
                if self.exchange is not None:
                    loss, parts = self._exchange(loss, parts, outs, yb, wb, share)
                for layer in decayed:  # after the exchange: each rank holds the weights, so add them once
                    layer.add_regularization_grads()
                self._divergence_gate(loss, params, xb, yb, wb)
                model.optimizer.apply(params)
            finally:
                for p in params:
                    p.zero_grad()
        return loss, parts, outs

    def _loss(self, yb, outs, wb, partner):
        """(loss, each output's loss, d(loss)/d(outputs), the targets metrics count) of one batch."""
        if partner is None:
            return (*self.model.compute_loss(yb, outs, wb), yb)
        labels, own, larger = partner
        weight = np.ones(len(own)) if wb is None else wb
        loss, parts, grads = self.model.compute_loss(yb, outs, weight * own)
        loss_b, parts_b, grads_b = self.model.compute_loss(labels, outs, weight * (1 - own))
        return loss + loss_b, [a + b for a, b in zip(parts, parts_b)], [a + b for a, b in zip(grads, grads_b)], larger

    def _divergence_gate(self, loss, params, xb, yb, wb):
        """A non-finite loss or a rise above divergence_factor times the initial loss (every step), a non-finite
        gradient norm (every NORM_EVERY steps): DivergenceError."""
        if not math.isfinite(loss):
            self._diverged("loss", loss, xb, yb, wb)
        if self.initial_loss is None:
            self.initial_loss = float(loss)
        elif self.divergence_factor is not None and loss > self.divergence_factor * self.rise_base():
            self._diverged("rise", loss, xb, yb, wb)
        if self.model.optimizer.iterations % NORM_EVERY:
            return
        weight_norm, grad_norm = _norms(params)
        self.norms.append((weight_norm, grad_norm))
        if not math.isfinite(grad_norm):
            self._diverged("gradient", loss, xb, yb, wb)

    def _exchange(self, loss, parts, outs, yb, wb, share):
        """Sum the gradients (in place) and the epoch's running sums over the ranks: each rank's sums move by its
        batch, the exchange adds every rank's move. Returns the global batch's loss (and each output's)."""
        before = np.asarray(self.logs.sums(), np.float64)
        if share:
            self.logs.update(loss, parts, yb, outs, wb)
        moved = np.asarray(self.logs.sums(), np.float64) - before
        moved, self.stop_agreed = self.exchange(moved.reshape(-1), self.stopping is not None)
        moved = moved.reshape(before.shape)
        self.logs.set_sums((before + moved).tolist())
        batch = self.logs.batch_losses(moved)
        return float(batch[0]), [float(v) for v in batch[1:len(parts) + 1]] if len(parts) > 1 else parts

    def _check_weights(self, xb, yb, wb):
        """Gradient norms are taken every NORM_EVERY steps, so a non-finite gradient under a finite loss on a step in
        between reaches the weights. One pass over them before they are validated or saved keeps NaN/inf out of
        every checkpoint: the last good one stays the last one written."""
        if not all(np.isfinite(p.value).all() for p in self.model.trainable_weights):
            self._diverged("weights", float("nan"), xb, yb, wb)

    def rise_base(self) -> float:
        return max(self.initial_loss, 1.0)

    def _diverged(self, what, value, xb, yb, wb):
        from dlcli.divergence import DivergenceError, hint

        lr = float(self.model.optimizer.current_lr)
        report = {"epoch": self.epoch + 1, "batch": self.batch, "step": int(self.model.optimizer.iterations),
                  "non_finite": what if what != "rise" else None, "loss": str(value), "learning_rate": lr,
                  "sample_indices": [int(i) for i in index_array(*self.rows or (slice(None), len(xb[0])))],
                  "recent_norms": [{"weights": w, "gradients": g} for w, g in self.norms], "norms_every": NORM_EVERY,
                  "last_checkpoint": self._checkpoint_text(), "diagnosis": self._diagnose(xb, yb, wb)}
        if what == "rise":
            report["rule"] = {"divergence_factor": self.divergence_factor, "initial_loss": self.initial_loss,
                              "threshold": self.divergence_factor * self.rise_base()}
        report["hint"] = hint(report)
        d = report["diagnosis"]
        if what == "rise":
            raise DivergenceError(
                f"training diverged: the loss rose to {value:.4g} at epoch {self.epoch + 1}, batch {self.batch} "
                f"(step {report['step']}), more than train.divergence_factor ({self.divergence_factor:g}) times "
                f"its initial value {self.rise_base():.4g} (the first batch's loss, at least 1). Last good "
                f"checkpoint: {report['last_checkpoint']}. Likely cause: {report['hint']}.", report)
        if what == "weights":
            raise DivergenceError(
                f"training diverged: the weights became non-finite by epoch {self.epoch + 1}, batch {self.batch} "
                f"(step {report['step']}): a gradient held NaN/inf under a finite loss on a step since the last "
                f"gradient-norm check (taken every {NORM_EVERY} steps). Nothing was saved with these weights. Last good "
                f"checkpoint: {report['last_checkpoint']}. Likely cause: {report['hint']}.", report)
        where = d["first_nonfinite_forward"] and f"first non-finite values in the forward pass of layer " \
                                                 f"'{d['first_nonfinite_forward']}'" \
            or d["first_nonfinite_backward"] and f"first non-finite gradient in layer '{d['first_nonfinite_backward']}'" \
            or ("the loss itself" if what == "loss" else "no layer made NaN/inf: the gradients are finite but so "
                                                          "large their norm overflows")
        raise DivergenceError(
            f"training diverged: the {'gradient norm' if what == 'gradient' else 'loss'} became "
            f"{'non-finite' if what == 'gradient' else value} at epoch "
            f"{self.epoch + 1}, batch {self.batch} (step {report['step']}); {where}. Last good checkpoint: "
            f"{report['last_checkpoint']}. Likely cause: {report['hint']}.", report)

    def _diagnose(self, xb, yb, wb):
        from dlcli.divergence import diagnose

        if self.bn_sync is None:
            return diagnose(self.model, xb, yb, wb)
        with self.bn_sync.pause():  # each rank looks at its own slice, without collectives
            return diagnose(self.model, xb, yb, wb)

    def _checkpoint_text(self) -> str:
        c = self.position
        if c is None:
            return "none (the run diverged before its first checkpoint)"
        return f"{self.checkpoint or 'checkpoint'}, at {checkpoint.describe_position(c)}"

    def save_checkpoint(self, epoch, batch, batch_size, n):
        """Position (epoch, next batch) plus everything else needed to continue bit-identically."""
        if self.files is None:
            return
        position = {"epoch": epoch, "batch": batch, "step": int(self.model.optimizer.iterations),
                    "samples_seen": self.samples_seen, "samples": n, "batch_size": batch_size,
                    # the state this epoch's permutation is drawn from (the current one at an epoch boundary)
                    "rng": self.epoch_rng_state if batch else self.rng.bit_generator.state,
                    "sums": self.logs.sums() if batch else None, "norms": [list(x) for x in self.norms],
                    "initial_loss": self.initial_loss,
                    "learning_rate": float(self.model.optimizer.current_lr)}
        rank_rngs = None
        if self.world.size > 1:  # each rank's dropout/augmentation streams, so the same rank count resumes exactly
            states = {k: g.bit_generator.state for k, g in checkpoint.layer_rngs(self.model).items()}
            rank_rngs = self.world.gather_json(states)
        checkpoint.save(self.files, self.model, self.callbacks, position, rank_rngs, self.checkpoint_header)
        self.position = position


def start_meta(config, model, data) -> dict:
    """meta.json as a run starts: versions, sizes, data source and directories, the config's fingerprint record."""
    from dlcli import fingerprint
    from dlcli.data import paths

    return {**run_files.versions_meta(config.seed), "name": config.name, "status": "running",
            "start": run_files.utc_now(),
            "sizes": data.sizes(), "source": data.source, "params": model.count_params(),
            "classes": data.classes, "data_dirs": paths.recorded_dirs(),
            **({"files": data.extra["folder"]} if data.extra.get("folder") else {}),
            **fingerprint.record(config.to_dict())}


def _norms(params) -> tuple[float, float]:
    """(the weights' norm, the gradients' norm): each weight's and its gradient's sums of squares in float64, one
    compiled pass over both (kernels/norms.py). A sum beyond float32's largest value counts as overflowed (inf), as in
    the float32 np.dot passes that took the norms before: a gradient whose norm overflows still stops the run. The
    book MLP's norm step in its fit: 72-81 -> 50-53 us median (README's Benchmarks)."""
    compiled = kernels.compiled("norms")
    squares = _squares if compiled is None else compiled.squares
    weights = grads = 0.0
    for p in params:
        w, g = squares(p.value.reshape(-1), p.grad.reshape(-1))
        weights += _capped(w, p.value.dtype)
        grads += _capped(g, p.grad.dtype)
    return math.sqrt(weights), math.sqrt(grads)


def _squares(value, grad):
    """kernels/norms.squares' NumPy twin, summed by BLAS in float32 as before (within float32's rounding of the
    kernel's): float64 copies to sum made the NumPy path's norm step ~120 us longer, its fixed cost 49 -> 83 us."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the divergence being detected
        return float(np.dot(value, value)), float(np.dot(grad, grad))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _capped(total: float, dtype) -> float:
    """total, or inf beyond dtype's largest value (NaN stays NaN)."""
    largest = _FLOAT32_MAX if dtype == np.float32 else float(np.finfo(dtype).max)
    return math.inf if total > largest else total


def _step_layers(model) -> tuple[list, list, list, int]:
    """(the weights to train, the layers whose regularization_loss can be non-zero, those with a regularized
    trainable weight, the lanes where a layer splits its batch over lanes, else 0): what a step updates, and clears
    the gradients of, the layers it asks for penalties and their gradients (the book MLP: none), and whether the
    step runs every GEMM on one BLAS thread so its lanes have the cores (engine/lanes.py). fit finds them once; as
    in Keras, a change of `trainable` takes effect at the next fit (Keras: at the next compile), and so does one of
    BLAS's threads (a threadpool_limits block around fit applies to it): asking BLAS at every step took 5-10 us of
    the training thread's CPU a step. A frozen weight has no gradient (Model.weights_to_train): its layer's backward
    skips it, as Keras computes none."""
    from dlcli.engine.layer import Layer

    layers = model.layers
    return (model.weights_to_train(),
            [layer for layer in layers if type(layer).regularization_loss is not Layer.regularization_loss
             or any(p.regularizer is not None for p in layer.params.values())],
            [layer for layer in layers if any(p.regularizer is not None for p in layer.trainable_weights)],
            lanes.count() if any(getattr(layer, "splits_batch", False) for layer in layers) else 0)


def balanced_class_weight(labels: np.ndarray) -> dict:
    """scikit-learn's compute_class_weight("balanced"), which Keras' imbalanced-data examples feed to fit:
    n_samples / (n_classes * count of the class), over the classes present."""
    classes, counts = np.unique(labels, return_counts=True)
    return {int(c): float(len(labels) / (len(classes) * k)) for c, k in zip(classes, counts)}


def _sample_weights(data, n, class_weight, sample_weight):
    """Per-sample weights from Keras' `class_weight` ({class: weight}, or "balanced" computed from the training
    labels) and/or `sample_weight`."""
    weights = None if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(n)
    if class_weight:
        labels = data.labels().astype(int)
        if class_weight == "balanced":
            class_weight = balanced_class_weight(labels)
        table = np.ones(int(max(max(class_weight), labels.max())) + 1)
        for k, v in class_weight.items():
            table[int(k)] = v
        cw = table[labels]
        weights = cw if weights is None else weights * cw
    return weights
