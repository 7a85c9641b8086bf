"""Lanes (engine/lanes.py): a layer's batch split over threads gives the same bits on any number of lanes, on both
kernel paths; errors in any lane reach the caller; a training step with such layers runs BLAS on one thread."""
import os
import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dlcli import layers
from dlcli.engine import blas, lanes
from dlcli.models import Sequential


def lane_threads(monkeypatch) -> set:
    """The names of the threads lanes.run runs work on from now on (filled as it runs)."""
    workers, real_run = set(), lanes.run

    def watch(work):
        return lambda run: workers.add(threading.current_thread().name) or work(run)

    def watched(work, parts, short=False, halfway=None):
        return real_run(watch(work), parts, short, halfway and (halfway[0], watch(halfway[1])))
    monkeypatch.setattr(lanes, "run", watched)
    return workers


def run_layer(layer, x, grad_seed=3):
    layer.input_grad_needed = True
    for param in layer.params.values():
        param.grad = np.zeros_like(param.value)
    y = layer.forward(x, training=True)
    dx = layer.backward(np.random.default_rng(grad_seed).standard_normal(y.shape).astype(x.dtype))
    return [y, dx] + [p.grad.copy() for p in layer.params.values()]


LAYERS = [  # (constructor, input shape): several chunks per call (the conv cases) or one part per lane (pooling)
    (lambda: layers.Conv2D(16, 3, padding="same"), (24, 12, 12, 8)),
    (lambda: layers.Conv2D(8, 3, strides=2, dilation_rate=1, padding="valid"), (9, 15, 11, 12)),
    (lambda: layers.Conv1D(12, 5, padding="causal"), (40, 30, 16)),
    (lambda: layers.Conv2DTranspose(6, 3, strides=2, padding="same"), (20, 10, 10, 16)),
    (lambda: layers.Conv2D(5, 3, padding="same"), (9, 8, 8, 1)),  # few channels: patches kept for backward
    (lambda: layers.Conv2D(7, 3, strides=2, padding="same", use_bias=False), (11, 13, 10, 8)),  # compiled gather
    (lambda: layers.Conv2D(6, 3, padding="same"), (13, 9, 7, 16)),  # Winograd F(4x4), tiles kept for backward
    (lambda: layers.Conv2D(6, 3), (13, 4, 6, 16)),  # Winograd F(2x2) (2x4 outputs)
    (lambda: layers.MaxPooling2D(2), (7, 12, 10, 5)),
    (lambda: layers.BatchNormalization(), (6, 5, 5, 7)),
    (lambda: layers.MaxPooling2D(3, strides=2, padding="same"), (5, 9, 9, 3)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_a_layer_gives_the_same_bits_on_one_two_and_three_lanes(monkeypatch, make, shape, path):
    monkeypatch.setenv("DLCLI_KERNELS", path)
    monkeypatch.setattr("dlcli.layers.conv_math.CHUNK_FLOATS", 1 << 12)  # many chunks at these small shapes
    monkeypatch.setattr("dlcli.layers.normalization.LANE_FLOATS", 1)  # BN's passes on lanes at any size
    monkeypatch.setattr(lanes, "SHORT_FLOATS", 0)  # handed to the lanes, polling or not
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    workers = lane_threads(monkeypatch)
    results = []
    for count in (1, 2, 3):
        monkeypatch.setattr(lanes, "count", lambda count=count: count)
        layer = make()
        layer.build(shape[1:])
        for p in layer.params.values():
            p.value[...] = np.random.default_rng(1).uniform(0.5, 1.5, p.value.shape)
        results.append(run_layer(layer, x))
    # the split really ran on another thread (the NumPy twins of the transposed conv, pooling and BN run whole)
    assert ("dlcli-lane" in workers) == (path == "numba" or type(layer).__name__ in ("Conv1D", "Conv2D"))
    assert len(results[0]) == 2 + len(layer.params)
    for one, two, three in zip(*results):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)


RECURRENT_FLAGS = [{}, {"return_sequences": True, "return_state": True, "go_backwards": True},
                   {"dropout": 0.3, "recurrent_dropout": 0.2, "return_sequences": True}]


@pytest.mark.parametrize("name", ["LSTM", "GRU", "SimpleRNN"])
@pytest.mark.parametrize("flags", RECURRENT_FLAGS)
@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_a_recurrent_layer_gives_the_same_bits_on_one_two_and_three_lanes(monkeypatch, name, flags, path):
    """A recurrent layer's batch parts (layers/recurrent.batch_parts) run on lanes, masked, with every return flag
    and dropout: outputs, states and all gradients equal bit for bit on 1, 2 and 3 lanes, and to rounding with the
    batch in one part."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    rng = np.random.default_rng(0)
    x, mask = rng.standard_normal((10, 7, 4)), rng.random((10, 7)) > 0.3
    workers = lane_threads(monkeypatch)
    results = []
    for count, part_samples in ((1, 3), (2, 3), (3, 3), (1, 10)):  # three parts (3, 3, 4 samples), then one
        monkeypatch.setattr(lanes, "count", lambda count=count: count)
        monkeypatch.setattr("dlcli.layers.recurrent.PART_SAMPLES", part_samples)
        layer = layers.LAYERS.get(name)(5, dtype="float64", **flags)
        layer.ensure_built((7, 4), np.random.default_rng(1))
        layer.rng, layer.input_mask, layer.input_grad_needed = np.random.default_rng(2), mask, True
        for p in layer.params.values():
            p.grad = np.zeros_like(p.value)
        ys = layer.forward(x, training=True)
        ys = ys if isinstance(ys, list) else [ys]
        dx = layer.backward([np.random.default_rng(3).standard_normal(y.shape) for y in ys])
        results.append([*ys, dx] + [p.grad.copy() for p in layer.params.values()])
    assert "dlcli-lane" in workers
    for one, two, three in zip(*results[:3]):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)
    for parts, whole in zip(results[0], results[3]):
        np.testing.assert_allclose(parts, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_a_residual_block_summed_by_its_batch_norm_gives_the_same_bits_on_one_two_and_three_lanes(monkeypatch, path):
    """The graph runs BN -> Add -> ReLU as one pass in training (engine/graph.py): its row ranges on any lanes."""
    from tests.test_moved_activations import Watcher, _pass, _residual_net

    monkeypatch.setenv("DLCLI_KERNELS", path)
    monkeypatch.setattr("dlcli.layers.normalization.LANE_FLOATS", 1)  # BN's passes on lanes at any size
    monkeypatch.setattr(lanes, "SHORT_FLOATS", 0)  # handed to the lanes, polling or not
    model = _residual_net()
    assert len(model.graph.summed) == 1
    start = [p.value.copy() for p in model.weights]
    x = np.random.default_rng(2).standard_normal((7, 6, 6, 3)).astype(np.float32)
    results = []
    for count, observer in ((1, None), (2, None), (3, None), (2, Watcher())):  # the last: the layers as written
        monkeypatch.setattr(lanes, "count", lambda count=count: count)
        for p, value in zip(model.weights, start):
            p.value = value.copy()
        results.append(_pass(model, [x], observer))
    for result in results[1:]:
        for one, other in zip(results[0], result):
            np.testing.assert_array_equal(one, other)


def test_an_error_in_any_lane_reaches_the_caller_and_the_lanes_stay_usable(monkeypatch):
    monkeypatch.setattr(lanes, "count", lambda: 2)

    def work(run):
        if (1, 2) in run:
            raise ValueError("lane failed")
        return [a * 10 for a, _ in run]
    with pytest.raises(ValueError, match="lane failed"):
        lanes.run(work, [(0, 1), (1, 2)])  # the second part is the worker's
    with pytest.raises(ValueError, match="lane failed"):
        lanes.run(work, [(1, 2), (2, 3)])  # the caller's own
    assert lanes.run(work, [(0, 1), (2, 3), (3, 4), (5, 6)]) == [0, 20, 30, 50]  # in order of the parts


@pytest.mark.parametrize("count", [1, 2, 3])
def test_a_run_with_a_halfway_barrier_runs_between_once_after_every_first_half_and_before_any_second(monkeypatch,
                                                                                                 count):
    """lanes.run's `halfway` (between, then): every lane's first half is done before between() runs, once, on the
    calling thread, and no second half starts before it ends; each lane's second half gets its first half's run;
    then's results come back in the order of the parts."""
    monkeypatch.setattr(lanes, "count", lambda: count)
    caller, events, lock = threading.current_thread(), [], threading.Lock()

    def log(event):
        with lock:
            events.append(event)

    def first(run):
        time.sleep(0.01 * (run[0] == 0))  # the caller's own half last: the others wait at the barrier
        log(("first", tuple(run), threading.current_thread().name))
        return ["dropped"]

    def between():
        assert threading.current_thread() is caller
        log(("between",))

    def then(run):
        log(("then", tuple(run), threading.current_thread().name))
        return [p * 10 for p in run]
    assert lanes.run(first, list(range(5)), halfway=(between, then)) == [0, 10, 20, 30, 40]
    middle = events.index(("between",))
    assert [e[0] for e in events] == ["first"] * (middle) + ["between"] + ["then"] * middle
    assert middle == count
    assert sorted(e[1:] for e in events[:middle]) == sorted(e[1:] for e in events[middle + 1:])  # same run, thread


def test_an_error_in_a_first_half_skips_between_and_the_second_and_the_lanes_stay_usable(monkeypatch):
    monkeypatch.setattr(lanes, "count", lambda: 2)
    called = []

    def first(run):
        if 1 in run:
            raise ValueError("lane failed")
        return []
    halfway = (lambda: called.append("between"), lambda run: called.append("then") or list(run))
    for parts in ([0, 1], [1, 2]):  # the worker's half fails, then the caller's own
        with pytest.raises(ValueError, match="lane failed"):
            lanes.run(first, parts, halfway=halfway)
    assert called == []
    assert lanes.run(first, [2, 3, 4], halfway=halfway) == [2, 3, 4]
    assert called == ["between", "then", "then"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_lanes_of_its_own(monkeypatch):
    monkeypatch.setattr(lanes, "count", lambda: 2)
    work = lambda run: [a * 10 for a, _ in run]
    assert lanes.run(work, [(0, 1), (1, 2)]) == [0, 10]  # the parent's lane is started
    pid = os.fork()
    if pid == 0:  # the child: the parent's lane thread is not here
        code = 1
        try:
            code = 0 if lanes.run(work, [(2, 3), (3, 4)]) == [20, 30] else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child waited for its parent's lanes")
    assert os.waitstatus_to_exitcode(status) == 0


def test_inside_a_lane_blas_has_one_thread_and_no_lanes_start(monkeypatch):
    monkeypatch.setattr(lanes, "count", lambda: 2)
    seen = lanes.run(lambda run: [(blas.threads(), lanes.run(lambda r: [len(r)], [(0, 1), (1, 2)]))
                                  for _ in run], [(0, 1), (1, 2)])
    assert seen == [(1, [2]), (1, [2])]  # a nested run is one run in its own thread


def test_spread_hands_the_blas_threads_to_the_lanes_and_back_and_a_nested_block_keeps_the_outer_ones():
    """lanes.spread: inside, BLAS runs on one thread and count() is the thread count the block began with (one lane
    with one thread); a nested block changes nothing, even at its end; after the block BLAS has its threads back."""
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            with lanes.spread():
                assert (lanes.count(), blas.threads()) == (threads, 1)
                with lanes.spread():
                    assert (lanes.count(), blas.threads()) == (threads, 1)
                assert (lanes.count(), blas.threads()) == (threads, 1)
            assert (lanes.count(), blas.threads()) == (threads, threads)
            with lanes.spread(threads):  # the count given, as fit gives its steps the one it asked as it started
                assert (lanes.count(), blas.threads()) == (threads, 1)
            assert (lanes.count(), blas.threads()) == (threads, threads)


def test_fit_asks_blas_its_threads_once_and_hands_them_to_each_step(monkeypatch):
    """fit's steps spread over the lanes BLAS had as fit started (a threadpool_limits block around fit), asked once
    (not at every step); BLAS has them back after each step."""
    model = Sequential([layers.LSTM(4, input_shape=(5, 3)), layers.Dense(2, activation="softmax")])
    model.build(rng=np.random.default_rng(0))
    model.compile("rmsprop", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((32, 5, 3)).astype(np.float32), rng.integers(0, 2, 32)
    given, asked, threads = [], [], blas.threads
    monkeypatch.setattr(lanes, "spread", lambda *a, original=lanes.spread: (given.append(a), original(*a))[1])
    monkeypatch.setattr(blas, "threads", lambda: (asked.append(1), threads())[1])
    with threadpool_limits(2, user_api="blas"):
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        assert threads() == 2
    assert given == [(2,)] * 8 and len(asked) == 1


def test_a_conv_training_step_runs_blas_on_one_thread_and_gives_the_same_weights_on_any_thread_count():
    def trained(threads):
        # the second conv reads 16 channels: Winograd on the compiled path
        model = Sequential([layers.Conv2D(16, 3, activation="relu", input_shape=(14, 14, 1)),
                            layers.MaxPooling2D(2), layers.Conv2D(16, 3, activation="relu"), layers.Flatten(),
                            layers.Dense(10, activation="softmax")])
        model.build(rng=np.random.default_rng(0))
        model.compile("rmsprop", "sparse_categorical_crossentropy")
        seen = []
        dense = model.layers[-1]
        forward = dense.forward
        dense.forward = lambda *a, **k: seen.append(blas.threads()) or forward(*a, **k)
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((64, 14, 14, 1)).astype(np.float32), rng.integers(0, 10, 64)
        with threadpool_limits(threads, user_api="blas"):
            for _ in range(3):
                model.train_step([x], [y])
            assert blas.threads() == threads  # restored after each step
        return seen, [w.copy() for w in model.get_weights()]
    seen, one = trained(1)
    seen_two, two = trained(2)
    assert seen == seen_two == [1, 1, 1]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_recurrent_layers_and_their_bidirectional_wrapper_ask_fit_for_lanes():
    """fit's step hands the lanes (lanes.spread) to layers that split their batch: the LSTM, GRU and SimpleRNN and a
    Bidirectional of them, not a ConvLSTM, which scans its batch whole."""
    assert all(layer.splits_batch for layer in (layers.LSTM(3), layers.GRU(3), layers.SimpleRNN(3),
                                                layers.Bidirectional(layers.GRU(3))))
    assert not layers.ConvLSTM1D(2, 3).splits_batch


def test_a_waiting_lane_sees_its_counter_move_and_gives_up_after_its_bound():
    """kernels/lanes.wait_for_change reads the counter again at every turn (a bump from another thread ends the wait
    long before its bound) and returns False once the bound has passed without one."""
    from dlcli import kernels

    compiled, libc = kernels.compiled("lanes"), lanes._libc()
    if compiled is None or libc is None:
        pytest.skip("no compiled kernels or no clock_gettime and sched_yield")
    counter, ts = np.zeros(1, np.int64), np.empty(2, np.int64)
    bump = threading.Timer(0.05, lambda: counter.__setitem__(0, 1))
    bump.start()
    start = time.perf_counter()
    assert compiled.wait_for_change(*libc, counter, 0, 20 * 10**9, ts)  # a bound of 20 s
    assert time.perf_counter() - start < 10
    start = time.perf_counter()
    assert not compiled.wait_for_change(*libc, counter, 1, 30 * 10**6, ts)
    assert 0.03 <= time.perf_counter() - start < 10
    assert compiled.wait_for_change(*libc, counter, 0, 0, ts)  # already moved: True at once


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_lanes_hand_over_after_their_wait_ran_out_as_back_to_back(monkeypatch, path):
    """A lane polls for its next task for lanes.SPIN_NS, then sleeps on its queue (the NumPy path sleeps at once):
    a run back to back and one after the lane slept both run on the lane and give their results in order."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    monkeypatch.setattr(lanes, "count", lambda: 2)
    monkeypatch.setattr(lanes, "SPIN_NS", 1_000_000)
    monkeypatch.setattr(lanes, "spare_core", lambda: True)  # poll even on a busy machine
    assert (lanes._waiter() is None) == (path == "numpy" or lanes._libc() is None)
    workers = lane_threads(monkeypatch)
    for pause in (0, 0, 0.01, 0, 0.01):
        time.sleep(pause)
        assert lanes.run(lambda run: [b * 10 for a, b in run], [(0, 1), (1, 2), (2, 3)]) == [10, 20, 30]
    assert "dlcli-lane" in workers
    assert all(lane.taken == lane.finished[0] == lane.posted[0] for lane in lanes._workers)


def test_lanes_sleep_at_once_while_the_machine_runs_more_threads_than_cores(monkeypatch):
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    if os.path.exists("/proc/loadavg"):  # Linux: the count of runnable threads, this one among them
        monkeypatch.setattr(lanes, "_CORES", -10**6)
        assert not lanes.spare_core()
        assert lanes._waiter() is None
        monkeypatch.setattr(lanes, "_CORES", 10**6)
        assert lanes.spare_core()
    monkeypatch.setattr(lanes, "spare_core", lambda: False)
    assert lanes._waiter() is None


def test_the_runnable_count_is_read_at_most_once_a_millisecond(monkeypatch):
    """spare_core, asked before every lanes run, reads /proc/loadavg again only after lanes.RUNNABLE_NS; the cores
    it compares with are taken at each call."""
    reads = []
    monkeypatch.setattr(lanes, "_runnable_count", lambda: reads.append(1) or 3 + len(lanes._workers))
    monkeypatch.setattr(lanes, "_runnable", (-lanes.RUNNABLE_NS, None))
    monkeypatch.setattr(lanes, "_CORES", 2)
    assert not lanes.spare_core() and len(reads) == 1
    monkeypatch.setattr(lanes, "_CORES", 3)
    assert lanes.spare_core() and len(reads) == 1  # the count read a moment ago
    monkeypatch.setattr(lanes, "_runnable", (lanes._runnable[0] - lanes.RUNNABLE_NS, lanes._runnable[1]))
    assert lanes.spare_core() and len(reads) == 2


@pytest.mark.parametrize("spare", [True, False])
def test_short_parts_go_to_polling_lanes_only(monkeypatch, spare):
    """lanes.run's `short` parts are handed to the lanes while they poll (a core to spare), else all run in the
    caller, with the same results in the same order; parts not short go to the lanes either way."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(lanes, "count", lambda: 2)
    monkeypatch.setattr(lanes, "spare_core", lambda: spare)
    polls = lanes._waiter() is not None
    if spare and not polls:
        pytest.skip("no compiled lanes kernel or C library to poll with")
    parts = [(0, 1), (1, 2), (2, 3), (3, 4)]
    for short in (True, False):
        workers = set()

        def work(run):
            workers.add(threading.current_thread().name)
            return [b * 10 for a, b in run]
        assert lanes.run(work, parts, short) == [10, 20, 30, 40]
        assert ("dlcli-lane" in workers) == (not short or spare)


@pytest.mark.parametrize("spare", [True, False])
def test_flat_parts_give_the_whole_arrays_pass_on_any_lanes(monkeypatch, spare):
    """lanes.flat_parts: an element-wise pass over ranges of the flat arrays, on the lanes while they poll (short
    parts) or in the caller, equal to the pass over the whole arrays; one range under FLAT_FLOATS."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(lanes, "count", lambda: 2)
    monkeypatch.setattr(lanes, "spare_core", lambda: spare)
    monkeypatch.setattr(lanes, "FLAT_FLOATS", 8)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5, 3)).astype(np.float32), rng.standard_normal((7, 5, 3)).astype(np.float32)
    workers, ranges = lane_threads(monkeypatch), []

    def add(out, x, y):
        ranges.append(out.size)
        np.add(x, y, out=out)
    out = lanes.flat_parts(add, np.empty_like(a), a, b)
    np.testing.assert_array_equal(out, a + b)
    assert sorted(ranges) == [26, 26, 26, 27]  # lanes.FLAT_PARTS, following the size alone
    assert ("dlcli-lane" in workers) == (spare and lanes._waiter() is not None)
    monkeypatch.setattr(lanes, "FLAT_FLOATS", 1 << 17)
    ranges.clear()
    np.testing.assert_array_equal(lanes.flat_parts(add, np.empty_like(a), a, b), a + b)
    assert ranges == [105]


def test_a_fan_outs_gradient_sum_and_a_relus_backward_run_on_the_lanes(monkeypatch):
    """graph._sum (two readers' gradients) and ReLU.backward (an Add's) over lanes.flat_parts: the same bits as
    a + b and grad * (y > 0); another shape or dtype sums whole."""
    from dlcli.engine import activations, graph

    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(lanes, "count", lambda: 2)
    monkeypatch.setattr(lanes, "spare_core", lambda: True)
    monkeypatch.setattr(lanes, "FLAT_FLOATS", 8)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 4, 4, 3)).astype(np.float32), rng.standard_normal((6, 4, 4, 3)).astype(np.float32)
    calls, real = [], lanes.flat_parts
    monkeypatch.setattr(lanes, "flat_parts", lambda *args: calls.append(len(args)) or real(*args))
    np.testing.assert_array_equal(graph._sum(a, b), a + b)
    relu = activations.get("relu")
    y = relu.forward(a.copy())
    np.testing.assert_array_equal(relu.backward(b), b * (y > 0))
    assert calls == [4, 4]
    np.testing.assert_array_equal(graph._sum(a, b.astype(np.float64)), a + b.astype(np.float64))
    assert calls == [4, 4]


def test_deferred_work_runs_in_order_while_the_caller_waits_or_at_the_blocks_end(monkeypatch):
    """lanes.defer: at once outside a `deferring` block or on one lane; inside one with lanes, kept and done in
    order while the caller waits for a lane that still runs its part, what is left at the block's end; a block that
    raises drops what is left."""
    monkeypatch.setattr(lanes, "count", lambda: 2)
    done = []
    lanes.defer(lambda: done.append("now"))
    assert done == ["now"]
    with lanes.deferring():
        for name in ("a", "b"):
            lanes.defer(lambda name=name: done.append(name))
        assert done == ["now"]
        finished = threading.Event()
        lanes.defer(lambda: done.append(("c", finished.is_set())))

        def slow_worker(run):
            if threading.current_thread().name == "dlcli-lane":
                time.sleep(0.05)  # the caller finds its lane busy and does the deferred work meanwhile
                finished.set()
            return run
        assert lanes.run(slow_worker, [0, 1]) == [0, 1]
        assert done == ["now", "a", "b", ("c", False)]
        lanes.defer(lambda: done.append("end"))
        assert done[-1] == ("c", False)
    assert done[-1] == "end"
    with pytest.raises(ValueError), lanes.deferring():
        lanes.defer(lambda: done.append("dropped"))
        raise ValueError
    assert "dropped" not in done
    monkeypatch.setattr(lanes, "count", lambda: 1)
    with lanes.deferring():
        lanes.defer(lambda: done.append("one lane"))
        assert done[-1] == "one lane"


def test_a_conv_called_twice_adds_its_deferred_kernel_gradients_in_call_order(monkeypatch):
    """A shared Winograd Conv2D (its kernel gradient deferred to the caller's waits for its lanes) in a graph: the
    same weight gradients on 1 and 2 lanes and with nothing deferred (an observer)."""
    from dlcli import models
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr("dlcli.layers.conv_math.CHUNK_FLOATS", 1 << 12)
    conv = layers.Conv2D(16, 3, padding="same", use_bias=False)
    first, second = layers.Input((8, 8, 16)), layers.Input((8, 8, 16))
    out = layers.Concatenate()([layers.GlobalAveragePooling2D()(conv(first)),
                                layers.GlobalAveragePooling2D()(conv(layers.ReLU()(conv(second))))])
    model = models.Model([first, second], out)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((12, 8, 8, 16)).astype(np.float32) for _ in range(2)]
    watcher = type("Watcher", (), {"backward": lambda *args: None})()
    grads, deferred, real_defer = [], [], lanes.defer
    monkeypatch.setattr(lanes, "defer", lambda fn: deferred.append(fn) or real_defer(fn))
    for count, observer in ((1, None), (2, None), (2, watcher)):
        monkeypatch.setattr(lanes, "count", lambda count=count: count)
        conv.kernel.grad = np.zeros_like(conv.kernel.value)
        outs = model.graph.forward(xs, training=True)
        model.graph.backward([np.ones_like(outs[0])], observer=observer)
        grads.append(conv.kernel.grad.copy())
    assert len(deferred) == 18  # three calls a pass, each deferring U's transposed taps and its kernel gradient
    np.testing.assert_array_equal(grads[0], grads[1])
    np.testing.assert_array_equal(grads[0], grads[2])


def test_a_winograd_convs_kernel_made_ahead_lives_for_its_pass_alone(monkeypatch):
    """A training pass over a graph makes its Winograd convs' U ahead (Conv.prepare_pass, in lanes.defer): the same
    weight gradients as each conv making its own in its forward, on 1 and 2 lanes; nothing made ahead outlives the
    pass, also where a layer after the conv raises."""
    from dlcli import models
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    x_in = layers.Input((8, 8, 16))
    first, second = layers.Conv2D(16, 3, padding="same"), layers.Conv2D(16, 3, padding="same")
    model = models.Model(x_in, layers.GlobalAveragePooling2D()(second(layers.ReLU()(first(x_in)))))
    x = np.random.default_rng(0).standard_normal((12, 8, 8, 16)).astype(np.float32)
    made = []
    real_prepare = type(first).prepare_pass
    monkeypatch.setattr(type(first), "prepare_pass", lambda conv, sizes: made.append(conv) or real_prepare(conv, sizes))
    grads = []
    for count, ahead in ((1, True), (2, True), (2, False)):
        monkeypatch.setattr(lanes, "count", lambda count=count: count)
        if not ahead:
            monkeypatch.setattr(type(first), "prepare_pass", lambda conv, sizes: None)
        for conv in (first, second):
            conv.kernel.grad = np.zeros_like(conv.kernel.value)
        outs = model.graph.forward([x], training=True)
        model.graph.backward([np.ones_like(outs[0])])
        grads.append([conv.kernel.grad.copy() for conv in (first, second)])
        assert first.u_ahead is None and second.u_ahead is None
    assert made == [first, second] * 2
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(type(second), "forward", lambda *args: (_ for _ in ()).throw(ValueError("stop")))
    monkeypatch.setattr(type(first), "prepare_pass", real_prepare)
    with pytest.raises(ValueError, match="stop"):
        model.graph.forward([x], training=True)
    assert second.u_ahead is None
