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
import queue
import threading
from contextlib import contextmanager, nullcontext

from dlcli.engine import blas

_workers: list = []  # (tasks, results) queues of each started worker thread
_start = threading.Lock()
_busy = threading.Lock()  # one caller at a time hands work to the workers


_granted = 0  # the BLAS threads a `spread` block took down to one, now lanes


@contextmanager
def spread():
    """BLAS on one thread inside the block, its threads lanes instead: a training step whose layers split their
    batch runs all of its GEMMs on one thread, so no two-thread GEMM (a Dense layer's) leaves OpenBLAS's thread
    spinning on the second core through the lanes that follow."""
    global _granted
    threads = blas.threads()
    if threads < 2 or _granted:
        yield
        return
    with blas.one_thread():
        _granted = threads
        try:
            yield
        finally:
            _granted = 0


def count() -> int:
    """Lanes a layer may use now: BLAS's thread count, or what an enclosing `spread` took from it."""
    return _granted or blas.threads()


def split(n: int, count: int) -> list[tuple[int, int]]:
    """[(start, stop)]: range(n) in `count` contiguous parts, sizes differing by one at most (empty where n < count)."""
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def run(work, parts: list) -> list:
    """work(run) for contiguous runs of `parts`, one run per lane, the first in the caller, BLAS on one thread
    meanwhile; the results concatenated in order (work returns a list per run, one item per part is usual). One
    run of every part when one lane is free: with one BLAS thread, inside another lane, or while another thread of
    the process uses the workers."""
    lanes = min(count(), len(parts))
    if lanes < 2 or not _busy.acquire(blocking=False):
        return list(work(parts))
    try:
        runs = [parts[a:b] for a, b in split(len(parts), lanes)]
        workers = _ensure(lanes - 1)
        # inside `spread` BLAS is on one thread already: threadpoolctl's switch and its restore cost the caller ~8
        # us of CPU a run, and a resnet training step makes 23 runs
        with nullcontext() if _granted else blas.one_thread():
            for (tasks, _), own in zip(workers, runs[1:]):
                tasks.put((work, own))
            try:
                results = list(work(runs[0]))
            finally:  # every worker is waited for, so none still writes when the caller moves on
                outcomes = [done.get() for _, done in workers[:lanes - 1]]
        for ok, value in outcomes:
            if not ok:
                raise value
            results.extend(value)
        return results
    finally:
        _busy.release()


def _ensure(n: int) -> list:
    with _start:
        while len(_workers) < n:
            tasks, done = queue.SimpleQueue(), queue.SimpleQueue()
            threading.Thread(target=_serve, args=(tasks, done), daemon=True, name="dlcli-lane").start()
            _workers.append((tasks, done))
    return _workers


def _serve(tasks, done):
    while True:
        work, parts = tasks.get()
        try:
            done.put((True, list(work(parts))))
        except BaseException as e:  # handed to the caller, which raises it
            done.put((False, e))
