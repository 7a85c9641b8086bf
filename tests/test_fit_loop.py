"""The per-batch machinery around the model's step (issue 26: its fixed cost): shuffled in-memory batches gathered a group
of batches ahead by a thread, callbacks called only for the hooks they define, accuracies counted in one call, and the
regularised layers looked up once per fit. Each must leave what fit computes unchanged."""
import threading

import numpy as np
import pytest

from dlcli import callbacks as cb
from dlcli import metrics
from dlcli.data.source import ArraySource, batch_indices, index_array
from dlcli.layers import ActivityRegularization, Dense
from dlcli.models import Sequential
from dlcli.trainer import Run, _step_layers


def test_array_batches_gathered_ahead_by_a_thread_in_order():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    source = ArraySource([x])
    chunks = batch_indices(100, 7, np.random.default_rng(0).permutation(100))
    seen = set()
    real_take = source.take

    def take(index):
        seen.add(threading.current_thread().name)
        return real_take(index)
    source.take = take
    got = []
    with source.batches(chunks) as batches:
        assert len(batches.threads) == 1
        for b in batches:
            got.append(b[0])
            threading.Event().wait(0.02)  # a training step, during which the thread gathers the next batch
    assert len(got) == len(chunks) and all(np.array_equal(g, x[c]) for g, c in zip(got, chunks))
    assert "dlcli-data-0" in seen  # (the caller takes a batch the thread has not started: test_source.py)
    seen.clear()
    with source.batches(batch_indices(100, 7)) as batches:  # slices are views: taken inline, no thread
        assert all(np.shares_memory(b[0], x) for b in batches)
    assert seen == {threading.current_thread().name}


def test_array_batches_handed_over_a_group_at_a_time(monkeypatch):
    """One take (and one hand-off) per group of batches, the groups doubling from one batch (the caller's) up to
    GROUP_BATCHES and about GROUP_BYTES a group."""
    from dlcli.data import source as source_module

    x = np.arange(400, dtype=np.float32).reshape(100, 4)  # 16 bytes a sample
    chunks = batch_indices(100, 6, np.random.default_rng(1).permutation(100))  # 17 batches, the last of 4
    for group_bytes, group in ((1 << 20, source_module.GROUP_BATCHES), (6 * 16 * 3, 3), (8, 1)):
        monkeypatch.setattr(source_module, "GROUP_BYTES", group_bytes)
        source = ArraySource([x])
        taken = []
        real_take = source.take
        source.take = lambda index: taken.append(len(index_array(index, 100))) or real_take(index)
        with source.batches(chunks) as batches:
            got = [b[0] for b in batches]
        assert all(np.array_equal(g, x[c]) for g, c in zip(got, chunks)) and len(got) == len(chunks)
        groups, start = [], 0  # batches per group: 1, 2, 4 ... up to `group`
        while start < len(chunks):
            groups.append(chunks[start:start + min(group, 2 ** len(groups))])
            start += len(groups[-1])
        assert sorted(taken) == sorted(sum(map(len, g)) for g in groups) and sum(taken) == 100


def test_the_caller_takes_the_first_batch_and_a_single_group_starts_no_thread():
    """The first batch is needed at once: the caller takes it even when a worker had time to (handing it over only
    added a thread's start to the wait), and a fit of one group (the LSTM bench's 2 batches) starts no thread."""
    x = np.arange(400, dtype=np.float32).reshape(100, 4)
    taken_by = []

    class Recorded(ArraySource):
        def take(self, index):
            taken_by.append((int(index_array(index, len(self))[0]), threading.current_thread().name))
            return super().take(index)

    for chunks, threads in ((batch_indices(100, 10, np.random.default_rng(2).permutation(100)), 1),
                            (batch_indices(20, 10, np.random.default_rng(2).permutation(20)), 0)):
        taken_by.clear()
        source = Recorded([x[:len(chunks) * 10]])
        with source.batches(chunks) as batches:
            assert len(batches.threads) == threads
            threading.Event().wait(0.05)  # time enough for a worker to take the first group, were it its to take
            got = [b[0] for b in batches]
        assert all(np.array_equal(g, x[c]) for g, c in zip(got, chunks)) and len(got) == len(chunks)
        by = dict(taken_by)
        main = threading.current_thread().name
        assert by.pop(int(chunks[0][0])) == main
        # the thread takes a group it has time for (the caller takes one it has not started: test_source.py)
        assert ("dlcli-data-0" in by.values()) == bool(threads) and set(by.values()) <= {"dlcli-data-0", main}


def test_closing_array_batches_early_stops_the_gather_thread():
    source = ArraySource([np.zeros((50, 3), np.float32)])
    batches = source.batches(batch_indices(50, 5, np.arange(50)))
    next(batches)
    (thread,) = batches.threads
    batches.close()
    assert not batches.threads and not thread.is_alive()
    with pytest.raises(StopIteration):
        next(batches)


def test_callback_list_skips_hooks_left_as_no_ops_but_sets_every_model():
    calls = []

    class Ends(cb.Callback):
        def on_train_batch_end(self, batch, logs=None):
            calls.append(("end", batch))

    class Begins(cb.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            calls.append(("begin", batch))

    plain, ends, begins = cb.Callback(), Ends(), Begins()
    hooks = cb.CallbackList([plain, ends, begins])
    hooks.set_model("m")
    hooks.on_train_batch_begin(0)
    hooks.on_train_batch_end(0)
    hooks.on_epoch_end(0, {})  # nobody defines it
    assert calls == [("begin", 0), ("end", 0)] and plain.model == ends.model == begins.model == "m"


@pytest.mark.parametrize("weights", [None, np.array([1.0, 0.0, 2.0, 1.0, 0.5])])
def test_accuracy_counted_in_one_call_matches_the_per_sample_mean(weights):
    y = np.array([0, 1, 2, 1, 0])
    out = np.eye(3, dtype=np.float32)[[0, 2, 2, 1, 1]]
    fast = metrics.SparseCategoricalAccuracy()
    fast.update(y, out, weights)
    fast.update(y[:2], out[:2], None if weights is None else weights[:2])
    hits = np.array([1, 0, 1, 1, 0, 1, 0], np.float64)
    w = np.ones(7) if weights is None else np.concatenate([weights, weights[:2]])
    assert fast.state() == [float(hits @ w), float(w.sum())] and isinstance(fast.state()[0], float)


def test_regularised_layers_found_once_per_fit_still_add_their_penalties():
    def model(regularise):
        m = Sequential([Dense(4, input_shape=(3,), kernel_regularizer={"l2": 0.1} if regularise else None),
                        ActivityRegularization(l2=0.01 if regularise else 0.0), Dense(2, activation="softmax")])
        m.build(rng=np.random.default_rng(0))
        m.compile("sgd", "sparse_categorical_crossentropy")
        return m

    x = np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32)
    y = np.arange(16) % 2
    plain, penalised = model(False), model(True)
    losses = [m.fit(x, y, epochs=1, batch_size=8, verbose=0, seed=0).history["loss"][0] for m in (plain, penalised)]
    assert losses[1] > losses[0]  # the penalties enter the loss and move the weights
    assert not all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), penalised.get_weights()))
    for found in (None, _step_layers(penalised)):  # a step alone (train_step) looks them up itself
        run = Run(penalised, verbose=0)
        run.step_layers = found
        penalised.graph.forward([x[:8]], training=True)
        expected = penalised.regularization_loss()  # the kernel's and the activity's, before the update
        assert expected > 0.01
        loss, parts, _ = run.step([x[:8]], [y[:8]])
        assert loss - parts[0] == pytest.approx(expected, rel=1e-6)


def test_targets_gathered_with_in_memory_inputs_train_as_targets_gathered_apart():
    """Inputs in memory take each batch's targets (and nothing else) along in their gather; a source of another kind
    leaves them to the loop. Both fits see the same batches: the same weights, bit for bit."""
    from dlcli.data import Dataset
    from dlcli.data.source import Subset

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(100, 3)).astype(np.float32), rng.integers(0, 2, 100)
    fitted = []
    for inputs in (ArraySource([x]), Subset(ArraySource([x]), np.arange(100))):
        m = Sequential([Dense(4, input_shape=(3,), activation="relu"), Dense(2, activation="softmax")])
        m.build(rng=np.random.default_rng(0))
        m.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
        history = Run(m, verbose=0, rng=np.random.default_rng(4)).fit(Dataset(inputs, [y]), epochs=2, batch_size=8)
        fitted.append(({k: v for k, v in history.history.items() if k != "seconds"}, m.get_weights()))
    assert fitted[0][0] == fitted[1][0]
    assert all(np.array_equal(a, b) for a, b in zip(fitted[0][1], fitted[1][1]))
