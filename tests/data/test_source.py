"""Sample sources: batches in the trainer's order whatever the source, prefetching bounded and stoppable, and a
run from a folder stopped mid-epoch and resumed ends bit-identical to an uninterrupted one."""
import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from dlcli import checkpoint
from dlcli.data import Dataset, load_dataset
from dlcli.data.source import ArraySource, Batches, Source, Subset, batch_indices, index_array
from dlcli.layers import Dense, Dropout, Flatten, Rescaling
from dlcli.models import Sequential
from dlcli.run_files import RunDir
from dlcli.trainer import Run
from tests.test_trainer import StopAfter


def test_batch_indices_are_sorted_chunks_of_the_order_or_slices():
    order = np.array([5, 0, 3, 1, 4, 2, 6])
    assert [c.tolist() for c in batch_indices(7, 3, order)] == [[0, 3, 5], [1, 2, 4], [6]]
    assert batch_indices(7, 3, order, first=2)[0].tolist() == [6]
    assert batch_indices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]


class Slow(Source):
    """Records which batches were taken and from how many threads at once."""

    prefetch, workers = 3, 2

    def __init__(self, n):
        self.n, self.taken, self.active, self.peak = n, [], 0, 0
        self.lock = threading.Lock()

    def __len__(self):
        return self.n

    @property
    def sample_shapes(self):
        return [(1,)]

    def take(self, index):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        threading.Event().wait(0.01)
        with self.lock:
            self.active -= 1
            self.taken.append(int(index_array(index, self.n)[0]))
        return [index_array(index, self.n).astype(np.float32)[:, None]]


def test_prefetch_keeps_order_stays_bounded_and_stops_when_closed():
    source = Slow(100)
    chunks = batch_indices(100, 10, np.random.default_rng(0).permutation(100))
    with source.batches(chunks) as batches:
        got = [b[0][:, 0].tolist() for b in batches]
    # the two workers at once, and the caller beside them when it reaches a batch neither has started
    assert got == [c.tolist() for c in chunks] and 2 <= source.peak <= 3
    source = Slow(100)
    batches = source.batches(chunks)
    next(batches)
    batches.close()  # an early stop (EarlyStopping, Ctrl-C) takes at most the batches already submitted
    assert len(source.taken) <= 1 + source.prefetch
    with pytest.raises(StopIteration):
        next(batches)


def test_caller_takes_the_batches_no_worker_has_started(monkeypatch):
    """On a busy machine a worker may wait for a core: the training thread then reads the batch itself."""
    from dlcli.data import source as source_module

    work = source_module.Batches._work

    def late(self, w, count):  # a worker that gets a core only after the caller has needed every batch
        threading.Event().wait(0.3)
        work(self, w, count)
    monkeypatch.setattr(source_module.Batches, "_work", late)
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    taken_by = []

    class Recorded(ArraySource):
        def take(self, index):
            taken_by.append(threading.current_thread().name)
            return super().take(index)

    chunks = batch_indices(20, 3, np.random.default_rng(0).permutation(20))
    with Recorded([x]).batches(chunks) as batches:
        got = [b[0] for b in batches]
    assert all(np.array_equal(g, x[c]) for g, c in zip(got, chunks))
    assert taken_by and set(taken_by) == {threading.current_thread().name}


def test_worker_errors_surface_in_order():
    class Broken(Slow):
        def take(self, index):
            if 30 in index_array(index, self.n):
                raise ValueError("bad sample 30")
            return super().take(index)

    with pytest.raises(ValueError, match="bad sample 30"):
        list(Broken(100).batches(batch_indices(100, 10)))


def test_array_source_subsets_copy_like_the_old_split():
    a = np.arange(20, dtype=np.float32).reshape(10, 2)
    sub = ArraySource([a]).subset(np.array([3, 1]))
    assert isinstance(sub, ArraySource) and sub.arrays[0].tolist() == [[6, 7], [2, 3]]


@pytest.fixture
def tiny_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(15):
            img = rng.integers(0, 80, (6, 6), dtype=np.uint8) + np.uint8(60 * c)
            Image.fromarray(img).save(tmp_path / f"c{c}" / f"{i}.png")
    return tmp_path


def _model():
    model = Sequential([Rescaling(1 / 255, input_shape=(6, 6, 1), name="scale"), Flatten(name="flat"),
                        Dense(8, activation="relu", name="h"), Dropout(0.2, name="drop"),
                        Dense(3, activation="softmax", name="out")])
    model.build(rng=np.random.default_rng(5))
    model.compile({"type": "adam", "learning_rate": 0.01}, "sparse_categorical_crossentropy", ["accuracy"])
    return model


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_stop_mid_epoch_and_resume_from_a_folder_is_bit_identical(tiny_folder, tmp_path, cache):
    d = load_dataset({"type": "image_folder", "directory": str(tiny_folder), "image_size": [6, 6],
                      "color_mode": "grayscale", "cache": cache, "workers": 2, "prefetch": 3})
    x, y = d.x_train.subset(np.random.default_rng(1).permutation(45)[:40]), d.y_train  # a split, as train does
    y = y[np.random.default_rng(1).permutation(45)[:40]]

    def trainer_for(model, path):
        return Run(model, verbose=0, rng=np.random.default_rng(7), files=RunDir(path), checkpoint_every=2)

    ref = _model()
    trainer_for(ref, tmp_path / "ref").fit(Dataset(x, [y]), epochs=3, batch_size=6)
    first = _model()
    t = trainer_for(first, tmp_path / "run")
    t.callbacks.append(StopAfter(t, 10))
    t.fit(Dataset(x, [y]), epochs=3, batch_size=6)
    assert (t.position["epoch"], t.position["batch"]) == (1, 3)
    resumed = _model()
    trainer_for(resumed, tmp_path / "run").fit(Dataset(x, [y]), epochs=3, batch_size=6,
                                                   resume=checkpoint.load(tmp_path / "run"))
    for u, v in zip(ref.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(u, v)
    arrays = ArraySource(x.take(np.arange(len(x))))  # the same samples in memory train to the same weights
    again = _model()
    Run(again, verbose=0, rng=np.random.default_rng(7)).fit(Dataset(arrays, [y]), epochs=3, batch_size=6)
    for u, v in zip(ref.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(u, v)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_a_background_sources_threads_lower_their_own_priority_only():
    """An image folder's decoding threads run at niceness 10 (through a subset too), so the step's lanes keep the
    cores; the training thread's priority is unchanged, and a thread already nicer stays so."""
    from dlcli.data.image_folder import ImageFolderSource

    seen = []

    class Decoding(ArraySource):
        background = ImageFolderSource.background

        def take(self, index):
            seen.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            return super().take(index)

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    source = Subset(Decoding([np.arange(40, dtype=np.float32).reshape(20, 2)]), np.arange(20))
    assert source.background == 10
    with Batches(source, batch_indices(20, 4), workers=1, prefetch=2) as batches:
        for _ in batches:
            threading.Event().wait(0.01)
    workers = {nice for name, nice in seen if name.startswith("dlcli-data")}
    assert workers == {max(10, before)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
