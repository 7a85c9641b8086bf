"""Sample sources: the model inputs of N samples, addressed by index.

The trainer decides which samples form each batch (its seeded per-epoch permutation, cut into chunks by
`batch_indices`); a source only answers "the inputs of samples [i, j, ...]". Arrays in memory answer by fancy
indexing; folders of files, memory-mapped arrays and token lists answer by reading or building just those samples,
ahead of the step in a bounded pool. Because the order never depends on the source, a resumed run and a run whose
batches are split across processes see exactly the samples an uninterrupted single-process run would.

Targets stay in memory as arrays (labels are small, and class weights, stratified splits and confusion matrices
need all of them); only inputs come from a source.
"""
import os
import queue
import sys
import threading

import numpy as np

from dlcli.errors import ShapeError


def batch_indices(n: int, batch_size: int, order: np.ndarray | None = None, first: int = 0) -> list:
    """Each batch's sample indices, from batch `first` on: sorted chunks of `order` (sorted gathers read memory
    and files in order), or without an order consecutive slices (views of arrays, no copy). The whole chunks are
    sorted in one call, as rows of one array: an np.sort a chunk took 1.3 us of the training thread's CPU per batch
    of the book MLP's epoch (0.6 ms for its 469 batches), one call 0.7 us."""
    start = first * batch_size
    if order is None:
        return [slice(s, min(n, s + batch_size)) for s in range(start, n, batch_size)]
    whole = max(0, n - start) // batch_size
    end = start + whole * batch_size
    chunks = list(np.sort(order[start:end].reshape(whole, batch_size), axis=1))
    return chunks + [np.sort(order[end:])] if end < n else chunks


def index_array(index, n: int) -> np.ndarray:
    """A batch index (slice or integer array) as an integer array."""
    return np.arange(n)[index] if isinstance(index, slice) else np.asarray(index)


class Source:
    """Model inputs of `len(self)` samples. Subclasses implement `__len__`, `take` and `sample_shapes`."""

    prefetch = 0  # batches prepared ahead by `batches` (0: each batch is read when the step asks for it)
    workers = 1
    background = 0  # a niceness for `batches`' threads (Linux), so that decoding yields the cores to the step's lanes

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def sample_shapes(self) -> list[tuple]:
        """Per-sample shape of each input (no batch axis)."""
        raise NotImplementedError

    def take(self, index) -> list[np.ndarray]:
        """The inputs of the samples at `index` (an integer array or a slice), one array per model input, in the
        order given."""
        raise NotImplementedError

    def subset(self, index) -> "Source":
        """The samples at `index` as a source of their own (a validation split, a `limit`)."""
        return Subset(self, index_array(index, len(self)))

    def reshaped(self, shapes: list[tuple]) -> "Source":
        """The same samples with per-sample shapes `shapes` (same sizes), e.g. (28, 28) read as (28, 28, 1)."""
        return Reshaped(self, shapes)

    def describe(self) -> dict:
        """Facts for the banner and meta.json (files per class, bad files skipped, cache ...)."""
        return {}

    def batches(self, indices) -> "Batches":
        """An iterator over `take(index)` for each index in `indices`, prepared `prefetch` batches ahead by
        `workers` threads. Close it (or exhaust it) to stop the pool."""
        return Batches(self, list(indices))


class Batches:
    """`take` of each batch in order, prepared ahead by `workers` threads (default: the source's settings): worker w
    takes batches 1 + w, 1 + w + workers, ... and holds at most its share of `prefetch` of them (bounded memory);
    batches and errors reach the caller in order. Decoders and gathers release the GIL (Pillow, zlib, NumPy, the PNG
    kernel), so the threads overlap reading with the training step. Batches pass through SimpleQueues: ~15 us of
    the training thread per batch, where a ThreadPoolExecutor's futures took ~60 (the book MLP's step is ~2 ms).
    A batch no worker has started when the caller needs it is taken by the caller itself: on a busy machine a
    worker can wait milliseconds for a core (the book convnet's training thread waited 16 ms a batch at load 15).
    The first batch is needed at once, so the caller always takes it and the workers start at the second: handing
    it over would only add a worker's start to the wait (and no thread starts for a single batch, or an in-memory
    fit of a single group: the LSTM bench's fit of 2 batches)."""

    def __init__(self, source: Source, indices: list, workers: int | None = None, prefetch: int | None = None):
        self.source, self.indices, self.next = source, indices, 0
        prefetch = source.prefetch if prefetch is None else prefetch
        self.threads, self.closed = [], False
        if not prefetch or len(indices) < 2:
            return
        self.claimed, self.lock = bytearray(len(indices)), threading.Lock()  # batches a worker or the caller took
        count = max(1, min(workers or source.workers, prefetch, len(indices) - 1))
        self.ready = [queue.SimpleQueue() for _ in range(count)]  # (True, batch) or (False, the error)
        self.free = [queue.SimpleQueue() for _ in range(count)]  # a worker's permits to take one more batch
        for w in range(count):
            for _ in range(prefetch // count + (w < prefetch % count)):
                self.free[w].put(True)
            thread = threading.Thread(target=self._work, args=(w, count), name=f"dlcli-data-{w}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _work(self, w: int, count: int):
        if getattr(self.source, "background", 0):
            _lower_priority(self.source.background)
        for k in range(1 + w, len(self.indices), count):  # the caller takes batch 0
            if not self.free[w].get() or self.closed:
                return
            if not self._claim(k):  # the caller took it: the permit is still this worker's
                self.free[w].put(True)
                continue
            try:
                batch = (True, self.source.take(self.indices[k]))
            except BaseException as e:  # raised in the caller, at this batch's turn
                batch = (False, e)
            self.ready[w].put(batch)
            if not batch[0]:
                return

    def _claim(self, k: int) -> bool:
        with self.lock:
            first = not self.claimed[k]
            self.claimed[k] = 1
        return first

    def __iter__(self):
        return self

    def __next__(self) -> list[np.ndarray]:
        if self.next >= len(self.indices):
            self.close()
            raise StopIteration
        k, self.next = self.next, self.next + 1
        if not self.threads or self._claim(k):
            return self.source.take(self.indices[k])
        w = (k - 1) % len(self.threads)
        ok, batch = self.ready[w].get()
        if not ok:
            self.close()
            raise batch
        self.free[w].put(True)
        return batch

    def close(self):
        """Stop the workers (each finishes the batch it is taking) and end the iteration."""
        if self.threads:
            self.closed = True
            for q in self.free:
                q.put(False)
            for thread in self.threads:
                thread.join()
            self.threads = []
        self.next = len(self.indices)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _lower_priority(niceness: int):
    """This thread's niceness at least `niceness` (Linux: setpriority takes a thread's id; elsewhere it would set
    the process')."""
    if sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, thread, max(niceness, os.getpriority(os.PRIO_PROCESS, thread)))
        except OSError:  # not allowed: run as before
            pass


GROUP_BATCHES, GROUP_BYTES = 32, 16 << 20  # a group of in-memory batches: at most 32, ~16 MB unless one is larger


class GroupedBatches:
    """Batches of `source` taken a group at a time (one take of their indices together, split into views) one group
    ahead by a thread (Batches): the caller hands off once a group. The groups double from one batch up to `group`:
    the caller takes the first itself (Batches), so it gathers one batch and not a whole group before its first step,
    and the thread stays ahead (a group takes it ~0.1 ms a batch, the step ~1.3 ms). The book MLP's epoch, 469
    batches: 20 hand-overs where groups of 8 made 59 (each ~30-45 us of the training thread: the queues' wake-ups, the
    GIL) and the caller's own first group 8 gathers, ~0.8 ms. The batches and their order are Batches'."""

    def __init__(self, source: Source, indices: list, group: int):
        self.source = source
        # two batches are one group, no thread (the LSTM bench's fit): starting one costs more than a batch's gather
        groups, start, size = [], 0, 1 if len(indices) > 2 else 2
        while start < len(indices):
            groups.append(indices[start:start + size])
            start, size = start + size, min(2 * size, group)
        self.groups = Batches(self, groups, 1, 1)
        self.ready: list = []  # the current group's batches not yet returned, last first

    @property
    def threads(self):
        return self.groups.threads

    def take(self, group: list) -> list[list[np.ndarray]]:
        """Each batch of `group`, views of one take of them all."""
        if len(group) == 1:
            return [self.source.take(group[0])]
        parts = [index_array(i, len(self.source)) for i in group]
        joined = self.source.take(np.concatenate(parts))
        ends = np.cumsum([len(p) for p in parts])
        return [[a[end - len(p):end] for a in joined] for p, end in zip(parts, ends)]

    def __iter__(self):
        return self

    def __next__(self) -> list[np.ndarray]:
        if not self.ready:
            self.ready = next(self.groups)[::-1]
        return self.ready.pop()

    def close(self):
        self.groups.close()
        self.ready = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource(Source):
    """Arrays in memory (or np.memmap), one per model input, batch on axis 0."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = list(arrays)

    def __len__(self):
        return len(self.arrays[0])

    @property
    def sample_shapes(self):
        return [a.shape[1:] for a in self.arrays]

    def take(self, index):
        return [a[index] for a in self.arrays]

    def batches(self, indices):
        """Shuffled batches are gathered ahead by a thread while the step trains: a gather is bound by memory
        (~0.1 ms for the book MLP's 128 x 784 floats out of a 188 MB array, 4% of its step on one core). The thread
        gathers a group of batches at a time, one group ahead (GroupedBatches): each hand-off wakes it and passes
        the GIL back and forth, ~10-15 us of the training thread, now paid once a group. Slices are views, nothing
        to prepare."""
        indices = list(indices)
        if all(isinstance(i, slice) for i in indices):
            return Batches(self, indices, 1, 0)
        batch_bytes = sum(a[:1].nbytes for a in self.arrays) * max(map(len, indices))
        return GroupedBatches(self, indices, max(1, min(GROUP_BATCHES, GROUP_BYTES // max(batch_bytes, 1))))

    def subset(self, index):
        return ArraySource(self.take(index))  # a contiguous copy: later gathers stay as fast as before

    def reshaped(self, shapes):
        return ArraySource([a.reshape((len(a), *s)) for a, s in zip(self.arrays, shapes)])


class _Wrapper(Source):
    """A view of another source: its pool settings follow the base's (which may change as a cache fills)."""

    base: Source

    @property
    def prefetch(self):
        return self.base.prefetch

    @property
    def workers(self):
        return self.base.workers

    @property
    def background(self):
        return self.base.background

    def describe(self):
        return self.base.describe()


class Subset(_Wrapper):
    """Samples `index` of another source, read through it (nothing is copied or decoded up front)."""

    def __init__(self, base: Source, index: np.ndarray):
        self.base, self.index = base, index

    def __len__(self):
        return len(self.index)

    @property
    def sample_shapes(self):
        return self.base.sample_shapes

    def take(self, index):
        return self.base.take(self.index[index])

    def subset(self, index):
        return Subset(self.base, self.index[index])


class Reshaped(_Wrapper):
    def __init__(self, base: Source, shapes: list[tuple]):
        self.base, self.shapes = base, [tuple(s) for s in shapes]

    def __len__(self):
        return len(self.base)

    @property
    def sample_shapes(self):
        return self.shapes

    def take(self, index):
        return [a.reshape((len(a), *s)) for a, s in zip(self.base.take(index), self.shapes)]

    def subset(self, index):
        return Reshaped(self.base.subset(index), self.shapes)


def as_source(x) -> Source:
    """A Source as is; an array or a list of arrays (one per model input) as an ArraySource."""
    if isinstance(x, Source):
        return x
    return ArraySource(list(x) if isinstance(x, (list, tuple)) else [x])


def fit_inputs(x, model) -> list | Source:
    """Arrays for each model input (or a Source, reshaped); (N, 28, 28) data feeds an input of shape (28, 28, 1)
    as a free reshape."""
    def fits(have, want):
        return have != want and int(np.prod(have)) == int(np.prod(want)) \
            and [d for d in have if d != 1] == [d for d in want if d != 1]

    if isinstance(x, Source):
        if getattr(x, "input_names", None):  # a table's output_mode dict: its blocks by the model's input names
            x = x.for_inputs(model.input_names)
        shapes = [tuple(t.shape) for t in model.inputs]
        have = [tuple(s) for s in x.sample_shapes]
        if len(have) != len(shapes):
            raise ShapeError(f"the data has {len(have)} input(s); model '{model.name}' has {len(shapes)} "
                             f"({', '.join(model.input_names)})")
        for h, s, name in zip(have, shapes, model.input_names):
            if h != s and not fits(h, s):
                raise ShapeError(f"input '{name}' expects samples of shape {s}; the data has {h}")
        return x if have == shapes else x.reshaped(shapes)
    xs = [x[n] for n in model.input_names] if isinstance(x, dict) else (list(x) if isinstance(x, list) else [x])
    out = []
    for a, t in zip(xs, model.inputs):
        if fits(a.shape[1:], t.shape):
            a = a.reshape((len(a), *t.shape))
        out.append(a)
    return model._inputs_list(out)
