"""Each training-control callback on crafted epoch histories (Keras 3 semantics), and its state surviving a
get_state/set_state round trip through the checkpoint format."""
import math

import numpy as np
import pytest

from dlcli import callbacks as cb
from dlcli import checkpoint
from dlcli.errors import ConfigError, DlcliError


class FakeOptimizer:
    def __init__(self, lr):
        self.learning_rate = lr

    def ema_averages(self, params):
        return [None] * len(params)  # no use_ema


class FakeModel:
    """Just what callbacks touch: stop_training, weights, the optimizer's learning rate and averages."""

    def __init__(self, lr=1.0):
        self.stop_training = False
        self.w = [np.zeros(2)]
        self.optimizer = FakeOptimizer(lr)
        self.trainable_weights = []

    def get_weights(self):
        return [a.copy() for a in self.w]

    def set_weights(self, values):
        self.w = [np.array(v) for v in values]

    def weights_dict(self):
        return {"weights/w": self.w[0]}


def drive(callback, values, key="val_loss", model=None, on_step=None):
    """Feed one monitored value per epoch; returns the epoch index training stopped at (None if it did not)."""
    model = model or FakeModel()
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, v in enumerate(values):
        callback.on_epoch_begin(epoch)
        if on_step:
            on_step(model, epoch)
        callback.on_epoch_end(epoch, {"loss": 0.0, key: v})
        if model.stop_training:
            callback.on_train_end()
            return epoch
    callback.on_train_end()
    return None


def test_early_stopping_patience_counts_epochs_without_improvement():
    assert drive(cb.EarlyStopping(patience=2), [1.0, 0.9, 0.95, 0.96, 0.97]) == 3
    assert drive(cb.EarlyStopping(patience=0), [1.0, 0.9, 0.95]) == 2
    assert drive(cb.EarlyStopping(patience=2), [1.0, 0.9, 0.8, 0.7]) is None


def test_early_stopping_min_delta_mode_and_auto_direction():
    assert drive(cb.EarlyStopping(min_delta=0.1, patience=1), [1.0, 0.95, 0.92]) == 1
    assert drive(cb.EarlyStopping(monitor="val_accuracy", patience=1), [0.5, 0.6, 0.55], "val_accuracy") == 2
    assert drive(cb.EarlyStopping(monitor="score", mode="max", patience=1), [1, 2, 3, 2], "score") == 3
    with pytest.raises(ConfigError, match="mode: min or mode: max"):
        cb.EarlyStopping(monitor="score")


def test_early_stopping_baseline_and_start_from_epoch():
    # improvements that do not beat the baseline do not reset the wait counter (Keras 3)
    assert drive(cb.EarlyStopping(monitor="val_accuracy", baseline=0.9, patience=2),
                 [0.5, 0.5, 0.5], "val_accuracy") == 1
    assert drive(cb.EarlyStopping(patience=1, start_from_epoch=3), [1.0, 2.0, 3.0, 4.0, 5.0]) == 4


def test_early_stopping_restores_best_weights():
    def step(model, epoch):
        model.w = [np.full(2, float(epoch))]

    model = FakeModel()
    es = cb.EarlyStopping(patience=2, restore_best_weights=True)
    assert drive(es, [1.0, 0.5, 0.7, 0.8], model=model, on_step=step) == 3
    np.testing.assert_array_equal(model.w[0], [1.0, 1.0])  # the weights of epoch 1, the best
    assert es.best_epoch == 1


def test_early_stopping_state_round_trips_through_checkpoint_format():
    es = cb.EarlyStopping(patience=3, restore_best_weights=True)
    drive(es, [1.0, 0.5, 0.6])
    arrays = {}
    state = checkpoint._join(checkpoint._split(es.get_state(), "callback/0", arrays), arrays)
    fresh = cb.EarlyStopping(patience=3, restore_best_weights=True)
    fresh.set_state(state)
    fresh.set_model(FakeModel())
    fresh.on_train_begin()  # a resumed run must not reset the counters
    assert (fresh.wait, fresh.best, fresh.best_epoch) == (1, 0.5, 1)
    np.testing.assert_array_equal(fresh.best_weights[0], es.best_weights[0])
    fresh.on_epoch_end(3, {"val_loss": 0.7})
    fresh.on_epoch_end(4, {"val_loss": 0.7})
    assert fresh.model.stop_training  # the wait carried over: 1 + 2 = patience


def test_reduce_lr_on_plateau_factor_patience_cooldown_min_lr():
    model = FakeModel(lr=1.0)
    lrs = []
    rl = cb.ReduceLROnPlateau(factor=0.5, patience=2, cooldown=1)
    drive(rl, [1.0] * 6, model=model, on_step=lambda m, e: lrs.append(m.optimizer.learning_rate))
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    floor = FakeModel(lr=1.0)
    drive(cb.ReduceLROnPlateau(factor=0.1, patience=1, min_lr=0.05), [1.0] * 5, model=floor)
    assert floor.optimizer.learning_rate == 0.05
    with pytest.raises(ConfigError, match="factor"):
        cb.ReduceLROnPlateau(factor=1.5)


def test_reduce_lr_state_round_trip_keeps_counters():
    rl = cb.ReduceLROnPlateau(patience=3)
    drive(rl, [1.0, 1.0, 1.0])
    fresh = cb.ReduceLROnPlateau(patience=3)
    fresh.set_state(rl.get_state())
    fresh.set_model(FakeModel(lr=1.0))
    fresh.on_train_begin()
    fresh.on_epoch_end(3, {"val_loss": 1.0})
    assert fresh.model.optimizer.learning_rate == pytest.approx(0.1)


def test_learning_rate_scheduler_callable_and_builtin_and_resume_safe():
    model = FakeModel(lr=1.0)
    sched = cb.LearningRateScheduler(lambda epoch, lr: lr * 0.5)
    sched.set_model(model)
    for epoch in range(3):
        sched.on_epoch_begin(epoch)
    assert model.optimizer.learning_rate == 0.125
    sched.on_epoch_begin(2)  # resumed inside epoch 2: not halved again
    assert model.optimizer.learning_rate == 0.125
    builtin = cb.LearningRateScheduler({"type": "exponential_decay", "initial_learning_rate": 0.1,
                                        "decay_steps": 1, "decay_rate": 0.5})
    builtin.set_model(model)
    builtin.on_epoch_begin(3)
    assert model.optimizer.learning_rate == pytest.approx(0.1 * 0.5 ** 3)
    one_arg = cb.LearningRateScheduler(lambda epoch: 0.01 * (epoch + 1))
    one_arg.set_model(model)
    one_arg.on_epoch_begin(1)
    assert model.optimizer.learning_rate == pytest.approx(0.02)


def test_terminate_on_nan():
    model = FakeModel()
    t = cb.TerminateOnNaN()
    t.set_model(model)
    t.on_train_batch_end(0, {"loss": 1.0})
    assert not model.stop_training
    t.on_train_batch_end(1, {"loss": math.nan})
    assert model.stop_training


def test_csv_logger_writes_and_appends(tmp_path):
    path = str(tmp_path / "log.csv")
    drive(cb.CSVLogger(path), [1.0, 0.5])
    drive(cb.CSVLogger(path, append=True), [0.25])
    lines = open(path).read().splitlines()
    assert lines[0] == "epoch,loss,val_loss" and len(lines) == 4 and lines[-1].endswith(",0.25")


def test_model_checkpoint_writes_best_and_last(tmp_path):
    model = FakeModel()
    saver = cb.ModelCheckpoint(str(tmp_path))

    def step(m, epoch):
        m.w = [np.full(2, float(epoch))]

    drive(saver, [1.0, 0.5, 0.7], model=model, on_step=step)
    with np.load(tmp_path / "best.npz") as best, np.load(tmp_path / "last.npz") as last:
        assert best["weights/w"][0] == 1.0 and last["weights/w"][0] == 2.0
    assert (saver.best, saver.best_epoch) == (0.5, 2)
    only_best = tmp_path / "only"
    drive(cb.ModelCheckpoint(str(only_best), monitor="val_accuracy", save_best_only=True), [0.1], "val_accuracy")
    assert sorted(p.name for p in only_best.iterdir()) == ["best.npz"]


def test_missing_monitor_names_what_is_available():
    es = cb.EarlyStopping()
    es.set_model(FakeModel())
    with pytest.raises(DlcliError, match="validation_split.*available: loss, accuracy"):
        es.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.5})


def test_the_registry_builds_callbacks_from_specs_and_checks_arguments():
    built = [cb.CALLBACKS.create(spec) for spec in ["TerminateOnNaN", {"type": "EarlyStopping", "patience": 3}]]
    assert isinstance(built[1], cb.EarlyStopping) and built[1].patience == 3
    with pytest.raises(ConfigError, match="did you mean 'patience'"):
        cb.CALLBACKS.create({"type": "EarlyStopping", "patiense": 3})


def test_callbacks_in_real_fit_stop_training():
    from dlcli.layers import Dense
    from dlcli.models import Sequential

    model = Sequential([Dense(2, activation="softmax", input_shape=(3,))])
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = np.ones((8, 3), np.float32), np.zeros(8, np.int64)
    es = cb.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)
    history = model.fit(x, y, epochs=10, batch_size=4, verbose=0, callbacks=[es], seed=0)
    assert len(history.epoch) == 2 and es.stopped_epoch == 1


def _ema_fit(callbacks, epochs=3, use_ema=True):
    """A small regression fit with Adam(use_ema) and a validation set; (model, history, x_val, y_val)."""
    from dlcli import layers, models

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (120, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], np.float32) + rng.normal(0, 0.1, (120, 1))).astype(np.float32)
    model = models.Sequential([layers.Dense(8, activation="tanh", input_shape=(4,)), layers.Dense(1)])
    model.build(rng=np.random.default_rng(1))
    model.compile(optimizer={"type": "adam", "learning_rate": 0.05, "use_ema": use_ema, "ema_momentum": 0.8},
                  loss="mse")
    history = model.fit(x[:90], y[:90], epochs=epochs, batch_size=16, validation_data=(x[90:], y[90:]), verbose=0,
                        seed=0, callbacks=callbacks)
    return model, history, x[90:], y[90:]


def test_swap_ema_weights_validates_on_the_averages_and_training_goes_on_with_the_weights():
    plain, plain_history, x_val, y_val = _ema_fit([])
    for swap_on_epoch in (False, True):
        model, history, _, _ = _ema_fit([cb.SwapEMAWeights(swap_on_epoch=swap_on_epoch)])
        # training (the loss column) is untouched; validation sees other weights
        assert history.history["loss"] == plain_history.history["loss"]
        assert history.history["val_loss"] != plain_history.history["val_loss"]
        # Keras' end of fit: the model holds the averages, which the last validation measured
        assert model.evaluate(x_val, y_val, verbose=0) == pytest.approx(history.history["val_loss"][-1], rel=1e-6)
        for a, b in zip(model.get_weights(), plain.get_weights()):
            np.testing.assert_array_equal(a, b)
    # use_ema alone trains the same weights; only the end of fit puts the averages in their place
    without_ema, history, _, _ = _ema_fit([], use_ema=False)
    assert history.history["loss"] == plain_history.history["loss"]
    assert not np.allclose(without_ema.get_weights()[0], plain.get_weights()[0])


def test_swap_ema_weights_needs_an_ema_optimizer_and_keeps_its_side_in_checkpoints():
    with pytest.raises(ConfigError, match="use_ema: true"):
        _ema_fit([cb.SwapEMAWeights()], use_ema=False)
    swap = cb.SwapEMAWeights(swap_on_epoch=True)
    swap.ema_weights_in_model = True
    again = cb.SwapEMAWeights(swap_on_epoch=True)
    again.set_state(swap.get_state())
    assert again.ema_weights_in_model


def test_backup_and_restore_continues_an_unfinished_run_as_resume_does(tmp_path):
    """Keras' BackupAndRestore through dlcli.train: a run stopped after its second epoch is continued by the next
    train of the same config (same directory, exactly the uninterrupted run's weights and history); once it
    completes the backup pointer goes and the next train starts a new run."""
    import dlcli
    from dlcli.callback import Callback
    from tests.runs_fixture import write_tiny_config

    class StopAfterSecondEpoch(Callback):
        def on_run_begin(self, run):
            self.run = run

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.run.stop("interrupted")

    backup = tmp_path / "backup"
    config = write_tiny_config(tmp_path, epochs=4, callbacks=[{"type": "BackupAndRestore",
                                                               "backup_dir": str(backup)}])
    reference = dlcli.train(config, runs_dir=tmp_path / "reference")
    assert reference.status == "completed" and not (backup / "run.json").exists()
    first = dlcli.train(config, runs_dir=tmp_path / "runs", callbacks=[StopAfterSecondEpoch()])
    assert first.status == "interrupted" and (backup / "run.json").exists()
    second = dlcli.train(config, runs_dir=tmp_path / "runs")
    assert second.dir == first.dir and second.status == "completed" and len(second.history) == 4
    for name, value in reference.model.weights_dict().items():
        np.testing.assert_array_equal(second.model.weights_dict()[name], value)
    assert not (backup / "run.json").exists()
    third = dlcli.train(config, runs_dir=tmp_path / "runs")
    assert third.dir != first.dir
    with pytest.raises(ConfigError, match="save_freq"):
        cb.BackupAndRestore(str(backup), save_freq="batch")


def test_remote_monitor_posts_each_epoch_to_a_local_server(tmp_path):
    """A real HTTP server on 127.0.0.1 receives one POST per epoch: Keras' form field holding JSON by default, a
    JSON body with send_as_json, the configured headers; an unreachable server is a warning, not a failure."""
    import json
    import threading
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import dlcli
    from tests.runs_fixture import write_tiny_config

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            received.append((self.path, self.headers.get("Content-Type"), self.headers.get("X-Token"), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_port}"
    try:
        config = write_tiny_config(tmp_path, epochs=2, callbacks=[
            {"type": "RemoteMonitor", "root": root},
            {"type": "RemoteMonitor", "root": root, "path": "/json", "send_as_json": True,
             "headers": {"X-Token": "abc"}}])
        run = dlcli.train(config, runs_dir=tmp_path / "runs")
    finally:
        server.shutdown()
        server.server_close()
    form = [r for r in received if r[0] == "/publish/epoch/end/"]
    as_json = [r for r in received if r[0] == "/json"]
    assert len(form) == len(as_json) == 2
    sent = [json.loads(urllib.parse.parse_qs(r[3])["data"][0]) for r in form]
    assert [s["epoch"] for s in sent] == [0, 1] and form[0][1] == "application/x-www-form-urlencoded"
    assert [s["val_loss"] for s in sent] == pytest.approx([row["val_loss"] for row in run.history])
    assert as_json[1][1] == "application/json" and as_json[1][2] == "abc" and json.loads(as_json[1][3]) == sent[1]
    unreachable = cb.RemoteMonitor(root=root, timeout=2)  # the server is shut down
    with pytest.warns(UserWarning, match="Could not reach RemoteMonitor root server"):
        unreachable.on_epoch_end(0, {"loss": 1.0})
    with pytest.raises(ConfigError, match="http"):
        cb.RemoteMonitor(root="localhost:9000")
