"""Lanes: a layer's work split over the batch, one part per BLAS thread, each part on one BLAS thread.

OpenBLAS parallelises a GEMM, but the work around it (im2col's gather, col2im's scatter, max pooling) runs on the
caller's core, and after each two-thread GEMM OpenBLAS's idle thread busy-waits (a nop loop, no yield, for about
2^28 cycles in the scipy-openblas build NumPy ships), so the second core is taken while that work runs, and a
Numba prange started there waits for it (measured by the last session: 30-45 ms for a 2.6 ms scatter). Lanes go
the other way: the samples are split into one contiguous part per thread, each part runs the layer's whole chunk
loop (gather, GEMM on one BLAS thread, scatter) in its own thread, and OpenBLAS's own threads stay asleep. The
parts are fixed by the chunks, never by the lane count, so a result is bit for bit the same on 1 or 2 lanes.
The book convnet's training step on 2 BLAS threads, AMD EPYC shared by 8 jobs (load 13-15), best of 40 steps:
205-208 ms wall and 69-73 ms CPU before (OpenBLAS's threads spinning against the load), 17-32 ms and 17-18 ms on lanes.

The lane count is BLAS's thread count (threadpoolctl, as inference_passes uses it): `OMP_NUM_THREADS=1` or a
`threadpool_limits(1)` block gives one lane and runs everything in the caller. Work inside a lane sees one BLAS
thread, so a lane's layer never starts lanes of its own.
"""
import collections
import os
import queue
import threading
import time
from contextlib import contextmanager, nullcontext

import numpy as np

from dlcli import kernels
from dlcli.engine import blas

# A lane asleep on its queue took 22 us to start after a hand-over back to back, 57 us after 1 ms idle, 121 us after
# 5 ms (a quiet AMD EPYC; a median 1 ms at load 5, the woken thread queued behind its caller on the caller's core),
# while an LSTM(32) step's part runs ~1 ms. So a lane, and a caller waiting for its lanes, first polls for SPIN_NS
# with the GIL released (kernels/lanes.wait_for_change) and sleeps only then: 200 us of a core at most per wait, and
# only while the machine has a core to spare (_waiter).
SPIN_NS = 200_000
_workers: list = []  # the _Lane of each started worker thread
_start = threading.Lock()
_busy = threading.Lock()  # one caller at a time hands work to the workers


_granted = 0  # the lanes of a `spread` block (BLAS's threads at its start, then down to one); 0 outside


class spread:
    """BLAS on one thread inside the block, its threads lanes instead: a training step whose layers split their
    batch runs all of its GEMMs on one thread, so no two-thread GEMM (a Dense layer's) leaves OpenBLAS's thread
    spinning on the second core through the lanes that follow. With one BLAS thread the block keeps that one lane,
    so `count` inside answers without asking BLAS again. A class, not a @contextmanager generator: the book MLP's
    step enters it every batch, and the generator and the three lane counts asking threadpoolctl took ~5 us of
    fit's fixed cost a batch. `threads`: BLAS's thread count where the caller has asked already (fit, once per fit:
    asking at each step took 5-10 us of the training thread's CPU, blas.threads), else asked here."""
    __slots__ = ("threads", "took", "one")

    def __init__(self, threads: int = 0):
        self.threads = threads

    def __enter__(self):
        global _granted
        self.took = 0
        if _granted:  # inside another block: it holds the lanes
            return
        threads = self.threads or blas.threads()
        if threads >= 2:
            self.one = blas.one_thread()
            self.one.__enter__()
        _granted = self.took = threads

    def __exit__(self, *exc):
        global _granted
        if self.took:
            _granted = 0
            if self.took >= 2:
                self.one.__exit__(*exc)


def count() -> int:
    """Lanes a layer may use now: BLAS's thread count, or what an enclosing `spread` took from it."""
    return _granted or blas.threads()


def split(n: int, count: int) -> list[tuple[int, int]]:
    """[(start, stop)]: range(n) in `count` contiguous parts, sizes differing by one at most (empty where n < count)."""
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def run(work, parts: list, short: bool = False, halfway=None) -> list:
    """work(run) for contiguous runs of `parts`, one run per lane, the first in the caller, BLAS on one thread
    meanwhile; the results concatenated in order (work returns a list per run, one item per part is usual). One
    run of every part when one lane is free: with one BLAS thread, inside another lane, or while another thread of
    the process uses the workers. `short`: parts of a few tens of microseconds, worth handing over only to lanes that
    poll (_waiter: a core to spare), not to sleeping ones, which take longer than that to wake; else all run here.
    `halfway` = (between, then): a barrier in the run: once every lane's work(run) is done, between() runs on the
    calling thread alone, then then(run) on each lane's same run, whose results are returned. BatchNormalization's
    passes need the whole batch's sums halfway; so each is one run (one decision, one split, the lanes held),
    where two runs paid the caller's setup twice."""
    lanes = min(count(), len(parts)) if len(parts) > 1 else 1  # one part: no need to ask BLAS (a ReLU's backward)
    if lanes < 2 or not _busy.acquire(blocking=False):
        return _alone(work, parts, halfway)
    try:
        wait = _waiter()
        if short and wait is None:
            return _alone(work, parts, halfway)
        runs = [parts[a:b] for a, b in split(len(parts), lanes)]
        workers = _ensure(lanes - 1)[:lanes - 1]
        # inside `spread` BLAS is on one thread already: threadpoolctl's switch and its restore cost the caller ~8
        # us of CPU a run, and a resnet training step makes 23 runs
        with nullcontext() if _granted else blas.one_thread():
            results = _handed(work, runs, workers, wait)
            if halfway is not None:
                halfway[0]()
                results = _handed(halfway[1], runs, workers, wait)
        return results
    finally:
        _busy.release()


def _alone(work, parts, halfway):
    """run's work (and halfway) on this thread alone."""
    results = list(work(parts))
    if halfway is None:
        return results
    halfway[0]()
    return list(halfway[1](parts))


def _handed(work, runs, workers, wait):
    """work(run) for each of `runs`: the first here, the others on `workers`, each waited for; the results in order."""
    for lane, own in zip(workers, runs[1:]):
        lane.hand(work, own, wait)
    try:
        results = list(work(runs[0]))
        _while_waiting(workers)
    finally:  # every worker is waited for, so none still writes when the caller moves on
        outcomes = [lane.result(wait) for lane in workers]
    for ok, value in outcomes:
        if not ok:
            raise value
        results.extend(value)
    return results


# Deferred work (defer): the calling thread's own, done while it waits for its lanes, where it only waited. On two
# lanes the resnet's training step had the caller wait 2.3-3.9 ms (its polls, a quiet AMD EPYC), and run ~0.7 ms of
# its Winograd convs' kernel gradients alone between runs while the lanes waited for it.
_local = threading.local()


@contextmanager
def deferring():
    """Inside the block, this thread's defer(fn) keeps fn for its waits in a run, or for the block's end, where what
    is left runs in order (dropped where the block raised). Nested blocks are the outer one."""
    if getattr(_local, "deferred", None) is not None:
        yield
        return
    _local.deferred = deferred = collections.deque()
    try:
        yield
        while deferred:
            deferred.popleft()()
    finally:
        _local.deferred = None


def defer(fn):
    """fn() now, or inside a `deferring` block with lanes to wait for later, in order with the other deferred work.
    On one lane it runs now: kept for the block's end, the resnet's five kernel gradients read their dU (9.6 MB)
    back from memory and the caller's step took 1.3-2.5 ms longer."""
    deferred = getattr(_local, "deferred", None)
    if deferred is None or count() < 2:
        fn()
    else:
        deferred.append(fn)


def _while_waiting(workers):
    """This thread's deferred work, a piece at a time, while any of `workers` still runs its part."""
    deferred = getattr(_local, "deferred", None)
    while deferred and any(lane.finished[0] == lane.taken for lane in workers):
        deferred.popleft()()


# Passes over fewer than SHORT_FLOATS floats in all (BatchNormalization's, flat_parts') make `short` parts (run):
# tens of microseconds each, less than a sleeping lane takes to wake. Element-wise passes (flat_parts) over arrays
# of FLAT_FLOATS or more run in FLAT_PARTS ranges.
SHORT_FLOATS, FLAT_PARTS, FLAT_FLOATS = 1 << 20, 4, 1 << 17


def flat_parts(fn, out, *arrays):
    """fn(out's range, each array's same range) over ranges of the flat, C-contiguous arrays, all of out's size; out.
    Each element on its own, so the same bits on any lanes: a fan-out's gradient sum, a ReLU's backward."""
    flats = [a.reshape(-1) for a in (out, *arrays)]
    parts = split(out.size, FLAT_PARTS if out.size >= FLAT_FLOATS else 1)
    run(lambda ranges: [fn(*(f[a:b] for f in flats)) for a, b in ranges], parts, out.size < SHORT_FLOATS)
    return out


class _Lane:
    """A worker thread and its hand-over: task and result queues, and the counters a waiting side polls (`posted`
    bumped by callers after each task, `finished` by the worker after each result)."""

    def __init__(self):
        self.tasks, self.done = queue.SimpleQueue(), queue.SimpleQueue()
        self.posted, self.finished = np.zeros(1, np.int64), np.zeros(1, np.int64)
        self.taken = 0  # results the callers took
        threading.Thread(target=self._serve, daemon=True, name="dlcli-lane").start()

    def hand(self, work, parts, wait):
        self.tasks.put((work, parts, wait))
        self.posted[0] += 1

    def result(self, wait):
        if wait is not None:
            wait(self.finished, self.taken)
        self.taken += 1
        return self.done.get()

    def _serve(self):
        wait, seen = None, 0
        while True:
            if wait is not None:  # as its last task's caller chose
                wait(self.posted, seen)
            work, parts, wait = self.tasks.get()
            seen += 1
            try:
                outcome = (True, list(work(parts)))
            except BaseException as e:  # handed to the caller, which raises it
                outcome = (False, e)
            self.done.put(outcome)
            self.finished[0] += 1


def _waiter():
    """wait(counter, seen): up to SPIN_NS, the GIL released, until counter[0] moves past `seen`; None (sleep at
    once) on the NumPy path, or while the machine runs more threads than it has cores: there the awaited thread
    runs late and a poll only takes CPU from it or from other jobs (AMD EPYC at load 10, two 0.5 ms parts a run:
    polling cost ~280 us of CPU a run and its wall time rose, 126-180 -> 185-1,200 us over the longer part)."""
    compiled, libc = kernels.compiled("lanes"), _libc()
    if compiled is None or libc is None or not spare_core():
        return None
    return lambda counter, seen: compiled.wait_for_change(*libc, counter, seen, SPIN_NS, np.empty(2, np.int64))


_loadavg = None  # a descriptor of /proc/loadavg, False where there is none
# /proc/loadavg's runnable count is read at most every RUNNABLE_NS: a read took 2.1-2.3 us of the calling thread's
# CPU (AMD EPYC, load 14) and the resnet's training step asks before each of its ~55 lanes runs
RUNNABLE_NS = 1_000_000
_runnable = (-RUNNABLE_NS, None)  # (time.monotonic_ns() of the last read, its count or None where unknown)


def spare_core() -> bool:
    """Whether the threads running or runnable now (Linux's /proc/loadavg, read at most every RUNNABLE_NS), the
    lanes' own not counted (a lane still polling after its last task is one), are no more than the process' cores;
    True where the count is unknown."""
    global _runnable
    now = time.monotonic_ns()
    if now - _runnable[0] >= RUNNABLE_NS:
        _runnable = (now, _runnable_count())
    runnable = _runnable[1]
    return runnable is None or runnable - len(_workers) <= _CORES


def _runnable_count():
    """/proc/loadavg's threads running or runnable now, or None where there is no such count."""
    global _loadavg
    if _loadavg is None:
        try:
            _loadavg = os.open("/proc/loadavg", os.O_RDONLY)
        except OSError:
            _loadavg = False
    if _loadavg is False:
        return None
    try:
        return int(os.pread(_loadavg, 80, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None


_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _libc():
    """(clock_gettime's address, sched_yield's) in the C library, or None where there are none."""
    return kernels.libc("clock_gettime", "sched_yield")


def _ensure(n: int) -> list:
    with _start:
        while len(_workers) < n:
            _workers.append(_Lane())
    return _workers


def _forget_workers():
    """In a forked child: fork copies only the forking thread, so the parent's lanes are not there to serve (a run
    would wait for them forever) and a lock another thread held stays held; the child starts lanes of its own."""
    global _start, _busy
    _workers.clear()
    _start, _busy = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)
