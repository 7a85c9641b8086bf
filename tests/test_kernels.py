"""The Numba kernels against their NumPy twins (bit for bit), and the selector: DLCLI_KERNELS, the fallback when
numba cannot be imported, and no numba at `import dlcli`."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from dlcli import kernels
from dlcli.errors import ConfigError
from dlcli.layers import conv_math as cm

# (input shape, pool, strides): 2D disjoint and tiled, disjoint with a ragged edge, overlapping, rectangular;
# 1D (run as 2D of height 1); a pool of 256 offsets, whose argmax is int32
POOL_CASES = [((4, 8, 8, 3), (2, 2), (2, 2)), ((3, 7, 9, 2), (2, 2), (2, 2)), ((3, 7, 6, 2), (3, 3), (1, 1)),
              ((2, 7, 8, 5), (2, 3), (1, 2)), ((3, 9, 4), (3,), (2,)), ((2, 10, 3), (2,), (2,)),
              ((2, 16, 17, 2), (16, 16), (1, 1))]


def both_paths(monkeypatch, fn, *args):
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    assert kernels.compiled("pooling") is not None
    compiled = fn(*args)
    monkeypatch.setenv("DLCLI_KERNELS", "numpy")
    return compiled, fn(*args)


@pytest.mark.parametrize("shape,pool,strides", POOL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_max_pool_kernels_equal_their_numpy_twins(monkeypatch, shape, pool, strides, dtype, relu):
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, shape).astype(dtype)  # small integers: many ties, so the first-maximum rule matters
    x.flat[::11] = rng.standard_normal(x.flat[::11].size)
    x.flat[7] = np.nan  # NaN propagates as np.maximum does
    x.flat[3] = -np.inf  # as 'same' padding
    x.flat[5] = -0.0
    out, _ = cm.geometry(x.shape[1:-1], pool, strides, "valid", (1,) * len(pool))
    (y, arg), (y_ref, arg_ref) = both_paths(monkeypatch, cm.max_pool, x, pool, out, strides, relu)
    assert arg.dtype == arg_ref.dtype == (np.int32 if np.prod(pool) >= 256 else np.uint8)
    np.testing.assert_array_equal(arg, arg_ref)
    np.testing.assert_array_equal(y, y_ref)
    if relu:  # np.maximum(-0.0, 0) is 0.0
        assert not np.signbit(y_ref[y_ref == 0]).any()
    if not relu:
        w, w_ref = both_paths(monkeypatch, cm.window_max, x, pool, out, strides)
        np.testing.assert_array_equal(w, w_ref)
    grad = rng.standard_normal(y.shape).astype(dtype)
    relu_y = y_ref if relu else None
    dx, dx_ref = both_paths(monkeypatch, cm.max_pool_backward, grad, arg_ref, x.shape, pool, out, strides, relu_y)
    np.testing.assert_array_equal(dx, dx_ref)  # overlapping windows sum in the same order: equal, not close
    assert dx.dtype == dtype
    if relu:  # the mask is the ReLU's backward: no gradient where the pooled output is not above 0
        masked = grad * (y_ref > 0)
        np.testing.assert_array_equal(dx_ref, cm.max_pool_backward_numpy(masked, arg_ref, x.shape, pool, out, strides))
    # the kernel overwrites every element itself, those no window covers included (the caller no longer zeroes)
    from dlcli.kernels import pooling
    (ph, pw, sh, sw, _, _), (g2, a2, d2) = cm._as_2d(pool, out, strides, grad, arg_ref, np.full(x.shape, np.nan, dtype))
    r2 = cm._as_2d(pool, out, strides, y_ref if relu else np.empty((0,) * grad.ndim, dtype))[1][0]
    pooling.max_pool_backward(g2, a2, r2, d2, ph, pw, sh, sw)
    np.testing.assert_array_equal(d2.reshape(x.shape), dx_ref)


def test_a_moved_relu_runs_inside_the_max_pooling_in_training(monkeypatch):
    """The conv's ReLU moved after its pooling (graph.py) is applied by max_pool's pass and masks the gradient in
    max_pool_backward's: the same output and input gradient as the ReLU layer before a plain pooling."""
    from dlcli import layers
    from dlcli.engine import activations
    rng = np.random.default_rng(2)
    z = rng.integers(-2, 3, (4, 9, 9, 3)).astype(np.float32)
    z.flat[::5] = rng.standard_normal(z.flat[::5].size)
    g = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        pool = layers.MaxPooling2D(2)
        pool.post_activation = activations.get("relu")
        y = pool.forward(z.copy(), training=True)
        dz = pool.backward(g)
        assert pool.relu_y is y and not hasattr(pool.post_activation, "y")  # no pass of the ReLU's own
        relu, plain = activations.get("relu"), layers.MaxPooling2D(2)
        np.testing.assert_array_equal(y, plain.forward(relu.forward(z.copy()), training=True))
        np.testing.assert_array_equal(dz, relu.backward(plain.backward(g)))


def test_a_layer_trains_the_same_on_both_paths(monkeypatch):
    from dlcli import layers
    x = np.random.default_rng(1).standard_normal((4, 9, 9, 3)).astype(np.float32)
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        pool = layers.MaxPooling2D(3, strides=2, padding="same")
        y = pool.forward(x, training=True)
        results.append((y, pool.backward(y * 2)))
    for compiled, reference in zip(*results):
        np.testing.assert_array_equal(compiled, reference)


def test_an_unknown_choice_is_one_config_error(monkeypatch):
    monkeypatch.setenv("DLCLI_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="DLCLI_KERNELS must be one of numba, numpy; got 'cuda'"):
        kernels.compiled("pooling")


def test_every_change_of_the_variable_is_seen(monkeypatch):
    """choice() answers from a cache while os.environ keeps the same value; each set or removal is read again."""
    for value, path in [("numpy", "numpy"), (" NumPy ", "numpy"), ("numba", "numba"), ("", "numba"),
                        ("numpy", "numpy")]:
        monkeypatch.setenv("DLCLI_KERNELS", value)
        assert kernels.choice() == kernels.choice() == path
    monkeypatch.delenv("DLCLI_KERNELS")
    assert kernels.choice() == "numba"
    monkeypatch.setenv("DLCLI_KERNELS", "cuda")
    for _ in range(2):  # a bad value is never cached as a choice
        with pytest.raises(ConfigError):
            kernels.choice()


def test_without_numba_the_numpy_twins_run_after_one_warning(monkeypatch):
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "dlcli.kernels.pooling", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.compiled("pooling") is None
        assert kernels.compiled("pooling") is None
        x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
        y, _ = cm.max_pool(x, (2, 2), (2, 2), (2, 2))
    assert [str(w.message).split(" (")[0] for w in caught] == ["numba could not be imported"]
    np.testing.assert_array_equal(y.ravel(), [5, 7, 13, 15])


def test_threads_asking_for_a_kernel_module_at_once_load_it_once_and_one_at_a_time(monkeypatch):
    """numba's set-up run by two threads at once fails ("generator already executing"): inference passes on
    graph replicas reach kernels.compiled together."""
    import threading
    import time

    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(kernels, "_loaded", {})
    inside, most, calls = [0], [0], []

    def slow_load(name):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        calls.append(name)
        inside[0] -= 1
        return object()

    monkeypatch.setattr(kernels, "_load", slow_load)
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(kernels.compiled(n)))
               for n in ["pooling", "pooling", "attention", "pooling"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and sorted(calls) == ["attention", "pooling"]
    assert len({id(r) for r in results}) == 2


def test_import_dlcli_does_not_import_numba():
    code = "import sys, dlcli, dlcli.cli, dlcli.layers; print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_loading_kernels_does_not_import_scipy_linalg_and_leaves_it_importable():
    """numba's CPU target asks for scipy.linalg (0.2 s of CPU a process) for a BLAS no kernel of ours calls
    through numba: kernels._load refuses that import while numba sets up, and allows it again after."""
    pytest.importorskip("scipy.linalg")
    code = ("import sys; from dlcli import kernels; kernels.compiled('activations'); "
            "print('scipy.linalg' in sys.modules, 'scipy.linalg.cython_blas' in sys.modules); "
            "import scipy.linalg.cython_blas; print('numba.np.arraymath' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "DLCLI_KERNELS": "numba"})
    assert done.stdout == "False False\nTrue\n"


def test_a_process_that_loaded_kernels_collects_once_then_freezes_at_exit():
    """Interpreter exit's collections would walk numba's objects several times (0.2 s of CPU): an exit hook
    collects once, so garbage is still finalized, and freezes the rest."""
    code = ("import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
            "from dlcli import kernels; kernels.compiled('activations')\n"
            "class Cycle:\n    def __del__(self): print('finalized')\n"
            "c = Cycle(); c.me = c; del c")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "DLCLI_KERNELS": "numba"})
    assert done.stdout == "finalized\nfrozen True\n"


def test_an_unknown_choice_stops_train_before_the_run_directory_exists(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dlcli.cli import app
    from tests.runs_fixture import write_tiny_config

    monkeypatch.setenv("DLCLI_KERNELS", "cuda")
    config = write_tiny_config(tmp_path)
    done = CliRunner().invoke(app, ["train", config, "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert done.exit_code == 2 and "DLCLI_KERNELS must be one of numba, numpy" in done.output, done.output
    assert not (tmp_path / "runs").exists()


# (input shape, kernel taps, strides, dilation): the input gradient's scatter, 2D and 1D (run as 2D of height 1)
COL2IM_CASES = [((6, 13, 13, 5), (3, 3), (1, 1), (1, 1)), ((5, 9, 8, 3), (3, 2), (2, 1), (1, 1)),
                ((4, 9, 9, 2), (3, 3), (1, 1), (2, 2)), ((3, 7, 7, 4), (2, 2), (3, 3), (1, 1)),
                ((5, 11, 3), (3,), (2,), (1,)), ((4, 9, 2), (2,), (1,), (3,))]


@pytest.mark.parametrize("shape,taps,strides,dilation", COL2IM_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_matmul_equals_its_numpy_twin(monkeypatch, shape, taps, strides, dilation, dtype):
    rng = np.random.default_rng(0)
    out, _ = cm.geometry(shape[1:-1], taps, strides, "valid", dilation)
    a2 = rng.standard_normal((shape[0] * int(np.prod(out)), 7)).astype(dtype)
    kernel = rng.standard_normal((*taps, shape[-1], 7)).astype(dtype)
    monkeypatch.setattr(cm, "CHUNK_FLOATS", a2.shape[0] // 2)  # a few samples per chunk: the chunk seams too
    dx, dx_ref = both_paths(monkeypatch, cm.col2im_matmul, a2, kernel, shape, out, strides, dilation)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=0)
    # a non-contiguous gradient and kernel slice, as ConvLSTM2D passes them
    wide = np.concatenate([a2, a2], axis=1)
    wide_kernel = np.concatenate([kernel, kernel], -1)
    dx, dx_ref = both_paths(monkeypatch, cm.col2im_matmul, wide[:, 3:10], wide_kernel[..., 3:10], shape, out, strides,
                            dilation)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=0)


# (input shape, kernel taps, strides, dilation, padding): the padded gather of patches, 2D and 1D, 'same' with the odd
# pad at the end, 'valid', 'causal'
PATCH_CASES = [((5, 14, 14, 32), (3, 3), (2, 2), (1, 1), "same"), ((4, 9, 8, 8), (3, 2), (1, 2), (2, 1), "same"),
               ((3, 11, 10, 9), (3, 3), (1, 1), (1, 1), "valid"), ((4, 20, 12), (5,), (1,), (1,), "causal"),
               ((4, 20, 12), (3,), (2,), (2,), "same")]


@pytest.mark.parametrize("shape,taps,strides,dilation,padding", PATCH_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ones", [0, 1])
def test_padded_patches_equal_their_numpy_twin(monkeypatch, shape, taps, strides, dilation, padding, dtype, ones):
    """kernels/conv.im2col reads the unpadded input, the twin a padded copy: the same patches, the padding's zeros
    included, into a conv's patch rows; beside a column of ones (`ones`, the bias's: a strided view) or with no
    padding the twin runs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    out, pads = cm.geometry(shape[1:-1], taps, strides, padding, dilation)
    patch_shape = (shape[0], *out, *taps, shape[-1])
    k = int(np.prod(taps)) * shape[-1]
    compiled_calls, real = [], kernels.compiled("conv").im2col
    monkeypatch.setattr(kernels.compiled("conv"), "im2col", lambda *a: compiled_calls.append(1) or real(*a))

    def gather():
        cols = np.full((int(np.prod(patch_shape[:-len(taps) - 1])), k + ones), np.nan, dtype)
        cm.padded_patches(x, pads, taps, out, strides, dilation, cols[:, :k].reshape(patch_shape))
        return cols
    compiled, twin = both_paths(monkeypatch, gather)
    np.testing.assert_array_equal(compiled, twin)
    assert not np.isnan(twin[:, :k]).any() and np.isnan(twin[:, k:]).all()
    assert len(compiled_calls) == (not ones and any(a or b for a, b in pads))


# few channels (below BLOCK_CHANNELS): the stem's 1 channel, 3 channels strided and dilated, 1D 'same' and 'causal'
TAP_MAJOR_CASES = [((5, 12, 11, 1), (3, 3), (1, 1), (1, 1), "same"), ((4, 9, 10, 3), (3, 2), (2, 1), (1, 2), "same"),
                   ((3, 13, 2), (5,), (1,), (1,), "causal"), ((4, 17, 1), (3,), (2,), (2,), "same"),
                   ((2, 7, 7, 2), (3, 3), (1, 1), (1, 1), "valid")]


@pytest.mark.parametrize("shape,taps,strides,dilation,padding", TAP_MAJOR_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ones", [0, 1])
def test_tap_major_patches_equal_their_numpy_twin(monkeypatch, shape, taps, strides, dilation, padding, dtype, ones):
    """kernels/conv.im2col_taps fills Conv._patch_buffer's few-channel layout, (taps [+ ones], positions) in memory,
    as the twin does, the padding's zeros included: the whole buffer, and a smaller chunk's first positions in it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    out, pads = cm.geometry(shape[1:-1], taps, strides, padding, dilation)
    k, per_sample, rank = int(np.prod(taps)) * shape[-1], int(np.prod(out)), len(taps)
    calls, real = [], kernels.compiled("conv").im2col_taps
    monkeypatch.setattr(kernels.compiled("conv"), "im2col_taps", lambda *a: calls.append(1) or real(*a))

    def gather(samples):
        cols = np.full((k + ones, len(x) * per_sample), np.nan, dtype).T[:samples * per_sample]
        patches = cols[:, :k].T.reshape(*taps, shape[-1], samples, *out, copy=False)
        patches = patches.transpose(rank + 1, *range(rank + 2, 2 * rank + 2), *range(rank), rank)
        cm.padded_patches(x[:samples], pads, taps, out, strides, dilation, patches)
        return cols.base.copy()
    for samples in (len(x), len(x) - 1):
        compiled, twin = both_paths(monkeypatch, gather, samples)
        np.testing.assert_array_equal(compiled, twin)
        assert not np.isnan(twin[:k, :samples * per_sample]).any() and np.isnan(twin[:k, samples * per_sample:]).all()
    assert len(calls) == 2 * any(a or b for a, b in pads)


OPTIMIZER_CASES = [{"type": "sgd", "learning_rate": 0.1}, {"type": "sgd", "momentum": 0.9},
                   {"type": "sgd", "momentum": 0.9, "nesterov": True}, {"type": "rmsprop"},
                   {"type": "rmsprop", "momentum": 0.5, "centered": True}, {"type": "rmsprop", "centered": True},
                   {"type": "adam"}, {"type": "adam", "amsgrad": True}, {"type": "adamw", "learning_rate": 0.01},
                   {"type": "sgd", "momentum": 0.9, "clipnorm": 0.1}]


@pytest.mark.parametrize("config", OPTIMIZER_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_updates_equal_their_numpy_twins(monkeypatch, config, dtype):
    from dlcli import optimizers
    from dlcli.engine.layer import Param

    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        rng = np.random.default_rng(3)
        shapes = [(7, 5), (5,), (2, 3, 4)]
        params = [Param(f"w{i}", rng.standard_normal(shape).astype(dtype)) for i, shape in enumerate(shapes)]
        optimizer = optimizers.get(dict(config))
        for _ in range(4):
            for p in params:
                p.grad = rng.standard_normal(p.value.shape).astype(dtype)
            params[1].grad[0] = 0  # a zero gradient: RMSprop's and Adam's sqrt(0) + epsilon
            optimizer.apply(params)
        results.append(([p.value for p in params], optimizer.get_state()))
    (values, state), (values_ref, state_ref) = results
    for v, v_ref in zip(values, values_ref):
        assert v.dtype == dtype
        np.testing.assert_array_equal(v, v_ref)
    assert state.keys() == state_ref.keys()
    for key in state:
        np.testing.assert_array_equal(state[key], state_ref[key])


@pytest.mark.parametrize("shape,args", [((6, 5, 4, 3), {}), ((7, 4), {"center": False}), ((5, 3, 6), {"scale": False}),
                                        ((4, 2, 2, 2), {"center": False, "scale": False})])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lane_floats", [1 << 20, 1])  # the passes over one range of rows, or over four
@pytest.mark.parametrize("relu", [False, True])  # a ReLU layer after it, moved in by the graph
def test_batch_norm_passes_equal_their_numpy_twins_to_rounding(monkeypatch, shape, args, dtype, lane_floats, relu):
    from dlcli import layers
    from dlcli.engine import activations

    monkeypatch.setattr("dlcli.layers.normalization.LANE_FLOATS", lane_floats)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    grad = rng.standard_normal(shape).astype(dtype)
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        assert (kernels.compiled("normalization") is None) == (path == "numpy")
        bn = layers.BatchNormalization(momentum=0.5, dtype=np.dtype(dtype).name, **args)
        bn.ensure_built(shape[1:])
        weights = np.random.default_rng(9)
        for p in bn.weights:  # gamma and beta away from 1 and 0, the same on both paths
            if p.trainable:
                p.value = weights.uniform(0.5, 1.5, p.value.shape).astype(p.value.dtype)
        bn.post_activation = activations.get("relu") if relu else None
        y = bn.forward(x, training=True)
        assert (y.min() >= 0) == relu
        dx = bn.backward(grad)
        results.append([y, dx] + [p.value for p in bn.weights] + [p.grad for p in bn.weights if p.trainable])
    tol = 2e-6 if dtype == np.float32 else 1e-12
    for compiled, reference in zip(*results):
        assert compiled.dtype == reference.dtype
        np.testing.assert_allclose(compiled, reference, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_equals_its_numpy_twin(monkeypatch, dtype):
    from dlcli.engine import activations

    rng = np.random.default_rng(7)
    z = rng.standard_normal((4, 6, 5, 3)).astype(dtype)
    z.flat[::7] = 0  # relu'(0) = 0, as in Keras
    grad = rng.standard_normal(z.shape).astype(dtype)
    grad.flat[1:4] = [np.nan, -np.inf, np.inf]
    grad.flat[5] = -0.0
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        assert (kernels.compiled("activations") is None) == (path == "numpy")
        relu = activations.get("relu")
        relu.forward(z)
        with np.errstate(invalid="ignore"):  # the twin's inf * 0
            results.append(relu.backward(grad))
    compiled, reference = results
    assert compiled.dtype == reference.dtype == dtype
    np.testing.assert_array_equal(compiled, reference)
    np.testing.assert_array_equal(np.signbit(compiled), np.signbit(reference))  # -0.0 where NumPy has it


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_bias_relu_pass_equals_its_numpy_twin(monkeypatch, dtype):
    """Dense + ReLU adds its bias and clamps in one compiled pass: outputs, the kept output backward reads and the
    gradients equal the twin's two passes bit for bit (NaN kept, -0.0 + -0.0 clamped to +0.0 as np.maximum)."""
    from dlcli import layers
    from dlcli.engine import activations

    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5, 4)).astype(dtype)
    x[0, 0] = np.nan
    x[1, :2] = 0.0
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        dense = layers.Dense(7, activation="relu", dtype=np.dtype(dtype).name)
        dense.ensure_built((5, 4))
        dense.kernel.value = np.random.default_rng(4).standard_normal((4, 7)).astype(dtype)
        dense.bias.value = np.random.default_rng(5).standard_normal(7).astype(dtype)
        y = dense.forward(x, training=True)
        dx = dense.backward(np.random.default_rng(6).standard_normal(y.shape).astype(dtype))
        results.append([y, dense.activation.y, dx, dense.kernel.grad, dense.bias.grad])
    z = np.array([[-0.0, 0.0, np.nan, -1.0, 2.0], [1.0, -0.0, 3.0, -np.inf, np.inf]], dtype)
    bias = np.array([-0.0, -0.0, 1.0, 1.0, -2.0], dtype)
    for path in ("numba", "numpy"):  # the sums -0.0, NaN, 0.0 and infinities straight into the pass
        monkeypatch.setenv("DLCLI_KERNELS", path)
        results.append([activations.get("relu").forward_(z.copy(), bias)])
    assert np.isnan(results[1][0][0, 0]).all() and (results[1][0] == 0).any()
    np.testing.assert_array_equal(results[3][0], [[0, 0, np.nan, 0, 0], [1, 0, 4, 0, np.inf]])
    results = [results[0] + results[2], results[1] + results[3]]
    for compiled, reference in zip(*results):
        assert compiled.dtype == reference.dtype == dtype
        np.testing.assert_array_equal(compiled, reference)
        np.testing.assert_array_equal(np.signbit(compiled), np.signbit(reference))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 10), (4, 6, 7)])
def test_sparse_softmax_crossentropy_equals_its_numpy_twin(monkeypatch, dtype, shape):
    """The compiled softmax + crossentropy: values within rounding of the twin's (libm's exp and log, a row sum
    in order); the fused path's gradient is the forward's softmax minus the one-hot labels, the twin's bits."""
    from dlcli import losses
    from dlcli.engine.activations import softmax

    rng = np.random.default_rng(11)
    z = (rng.standard_normal(shape) * 4).astype(dtype)
    z[0, ..., 1] = 60  # a near-certain class: exp underflows elsewhere, log-softmax stays finite
    labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.uint8)
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        assert (kernels.compiled("classification") is None) == (path == "numpy")
        fused = losses.SparseCategoricalCrossentropy().compute(labels, softmax(z), logits=z)
        plain = losses.SparseCategoricalCrossentropy(from_logits=True).compute(labels, z)
        results.append((fused, plain))
    ((fused, plain), (fused_ref, plain_ref)) = results
    tol = 4 * np.finfo(dtype).eps
    for (per_sample, grad), (per_sample_ref, grad_ref) in [(fused, fused_ref), (plain, plain_ref)]:
        assert grad.dtype == grad_ref.dtype == dtype and per_sample.dtype == per_sample_ref.dtype == np.float64
        assert np.isfinite(per_sample).all()
        np.testing.assert_allclose(per_sample, per_sample_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(grad, grad_ref, rtol=0, atol=tol)
    np.testing.assert_array_equal(fused[1], fused_ref[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_accuracy_hits_equal_the_numpy_twin(monkeypatch, dtype):
    """The compiled count of hits is np.argmax's: the first of tied maxima, the first NaN, a row of -inf."""
    from dlcli import metrics

    rng = np.random.default_rng(12)
    y = rng.integers(0, 3, (200, 7)).astype(dtype)  # small integers: ties in most rows
    y[:5] = [[np.nan, 1, 2, 0, 0, 0, 0], [0, 2, np.nan, 2, np.nan, 0, 0], [1, 1, 1, 1, 1, 1, 1],
             [-np.inf] * 7, [0, 0, 0, 0, 0, 0, np.nan]]
    labels = y.argmax(-1).astype(np.int64)
    labels[::3] = rng.integers(0, 7, labels[::3].size)  # misses (and some hits) among the hits
    counts = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        assert (kernels.compiled("classification") is None) == (path == "numpy")
        accuracy = metrics.get("sparse_categorical_accuracy")
        accuracy.update(labels, y)
        accuracy.update(labels[:50, None].astype(np.uint8), y[:50])  # (batch, 1) labels, another dtype
        counts.append(accuracy.state())
    assert counts[0] == counts[1] == [float(np.count_nonzero(labels == y.argmax(-1)) +
                                            np.count_nonzero(labels[:50] == y[:50].argmax(-1))), 250.0]
    assert 0 < counts[0][0] < 250


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ranges", [1, 4])
def test_batch_norm_statistics_kernel_equals_its_twin(dtype, ranges):
    """kernels/normalization.statistics against the layer's twin (_statistics without the kernels): the mean,
    1 / sqrt(var + epsilon) and the moving mean and variance bit for bit, a negative variance clamped to 0 and NaN
    kept as np.maximum does; the moving ones are new arrays, as _update_moving makes them."""
    from dlcli import layers

    rng = np.random.default_rng(3)
    sums = rng.standard_normal((ranges, 2, 6)) * 10
    sums[:, 1] = np.abs(sums[:, 1])
    sums[0, 1, 2] = -50.0
    sums[0, 0, 3] = np.nan
    shift = rng.standard_normal(6)
    bn = layers.BatchNormalization(momentum=0.7, dtype=np.dtype(dtype).name)
    bn.ensure_built((6,))
    moving = (rng.standard_normal(6).astype(dtype), rng.random(6).astype(dtype))
    results = []
    for compiled in (kernels.compiled("normalization"), None):
        bn.moving_mean.value, bn.moving_variance.value = moving
        mean, inv_std = bn._statistics(compiled, sums, shift, 37, np.dtype(dtype))
        results.append((mean, inv_std, bn.moving_mean.value, bn.moving_variance.value))
        assert bn.moving_mean.value is not moving[0] and bn.moving_variance.value is not moving[1]
    for compiled, twin in zip(*results):
        assert compiled.dtype == twin.dtype == dtype
        np.testing.assert_array_equal(compiled, twin)
    assert np.isnan(results[0][0][3]) and results[0][1][2] == 1 / np.sqrt(dtype(bn.epsilon))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ranges", [1, 4])
@pytest.mark.parametrize("scale", [True, False])
def test_batch_norm_gradient_statistics_kernel_equals_its_twin(dtype, ranges, scale):
    """kernels/normalization.gradient_statistics against the layer's twin (_gradient_statistics without the
    kernels): beta's and gamma's gradients, the scale and the input gradient's a and b, bit for bit."""
    from dlcli import layers

    rng = np.random.default_rng(4)
    sums = rng.standard_normal((ranges, 2, 6)) * 10
    bn = layers.BatchNormalization(scale=scale, dtype=np.dtype(dtype).name)
    bn.ensure_built((6,))
    if scale:
        bn.gamma.value = rng.uniform(0.5, 1.5, 6).astype(dtype)
    bn.inv_std = rng.uniform(0.1, 3, (1, 6)).astype(dtype)
    compiled = bn._gradient_statistics(kernels.compiled("normalization"), sums, 37, np.dtype(dtype))
    for got, twin in zip(compiled, bn._gradient_statistics(None, sums, 37, np.dtype(dtype)), strict=True):
        assert got.dtype == twin.dtype == dtype
        np.testing.assert_array_equal(got, twin)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 30])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_sums_add_each_channels_rows_one_by_one_in_order(dtype, rows, affine):
    """shifted_sums and gradient_sums, which read four rows at a time, against each channel's rows added one by one
    in row order in float64 (np.add.accumulate), bit for bit: with and without the ReLU's mask, scale and center
    on or off, any row count (the rows past the last four)."""
    compiled = kernels.compiled("normalization")
    rng = np.random.default_rng(rows)
    x, grad = (rng.standard_normal((rows, 5)) * 3 + 2).astype(dtype), rng.standard_normal((rows, 5)).astype(dtype)
    grad.flat[:3] = [np.inf, -0.0, np.nan][:grad.size]
    shift, mean, inv_std = x[0].astype(np.float64), rng.standard_normal(5).astype(dtype), rng.random(5).astype(dtype)
    gamma, beta = (rng.uniform(0.5, 1.5, 5).astype(dtype), rng.standard_normal(5).astype(dtype)) if affine else \
        (np.empty(0, dtype), np.empty(0, dtype))
    in_order = lambda a: np.add.accumulate(a.astype(np.float64), axis=0)[-1]
    sums = np.empty((2, 5))
    compiled.shifted_sums(x, shift, *sums)
    d = x - shift
    np.testing.assert_array_equal(sums, [in_order(d), in_order(d * d)])
    xhat = (x - mean) * inv_std
    y = xhat * gamma + beta if affine else xhat
    for relu in (False, True):
        with np.errstate(invalid="ignore"):  # inf * 0, as the kernel makes it
            g = np.where(y > 0, grad, grad * dtype(0)) if relu else grad
            expected = [in_order(g), in_order(g * xhat)]
        compiled.gradient_sums(grad, x, mean, inv_std, gamma, beta, relu, *sums)
        np.testing.assert_array_equal(sums, expected)


def test_batch_norm_compiled_variance_holds_far_from_zero(monkeypatch):
    """The compiled forward sums x and x^2 in one pass, shifted by the batch's first row: an unshifted
    E[x^2] - E[x]^2 in float64 would lose the variance of integers near 1e7 (their squares near 1e14)."""
    from dlcli import layers

    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    rng = np.random.default_rng(8)
    x = (np.round(rng.standard_normal((64, 7, 7, 4)) * 4) + 1e7).astype(np.float32)  # integers: exact in float32
    bn = layers.BatchNormalization(momentum=0.0)
    bn.ensure_built(x.shape[1:])
    bn.forward(x, training=True)
    rows = x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(bn.moving_variance.value, rows.var(0), rtol=1e-6)
    np.testing.assert_allclose(bn.moving_mean.value, rows.mean(0), rtol=1e-7)


def test_batch_norm_relu_clamps_negative_zero_as_numpy(monkeypatch):
    """The ReLU fused into BatchNormalization's compiled forward is np.maximum(y, 0) bit for bit: an exact -0.0
    (here 0 * a negative gamma, no beta) comes out +0.0, NaN stays NaN; so does the residual an Add hands it."""
    from dlcli import layers
    from dlcli.engine import activations
    from dlcli.kernels import normalization

    x = np.array([[-1, 0, 2], [0, 1, 0], [0, -1, -2], [1, 0, 0]], np.float32)  # every channel's mean exactly 0
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        bn = layers.BatchNormalization(center=False)
        bn.ensure_built(x.shape[1:])
        bn.gamma.value = np.array([-1.0, -2.0, 0.5], np.float32)
        bn.post_activation = activations.get("relu")
        results.append(bn.forward(x, training=True))
    compiled, reference = results
    assert not np.signbit(reference).any()  # x's five zeros as +0.0 (np.maximum(-0.0, 0) is 0.0)
    np.testing.assert_array_equal(compiled.view(np.uint32), reference.view(np.uint32))
    mean, inv_std, gamma, empty = (np.zeros(3, np.float32), np.ones(3, np.float32), -np.ones(3, np.float32),
                                   np.zeros(0, np.float32))
    rows, residual = np.array([[0, 1, np.nan]], np.float32), np.array([[-0.0, -1, 0]], np.float32)
    y = np.empty_like(rows)
    normalization.normalise(rows, mean, inv_std, gamma, empty, True, residual, y)
    with np.errstate(invalid="ignore"):
        expected = np.maximum(rows * gamma + residual, 0)  # -0.0 + -0.0, -1 - 1 and NaN
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))


def test_batch_norm_relu_backward_after_the_kernel_path_changed(monkeypatch):
    """A forward on the compiled passes (the ReLU applied inside) and a backward after DLCLI_KERNELS=numpy: the
    twin masks the gradient itself, from the forward's xhat, and agrees with the compiled backward to rounding."""
    from dlcli import layers
    from dlcli.engine import activations

    rng = np.random.default_rng(6)
    x, grad = (rng.standard_normal((2, 6, 5, 3)).astype(np.float32) for _ in range(2))
    results = []
    for backward_path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", "numba")
        bn = layers.BatchNormalization()
        bn.ensure_built(x.shape[1:])
        bn.post_activation = activations.get("relu")
        bn.forward(x, training=True)
        monkeypatch.setenv("DLCLI_KERNELS", backward_path)
        results.append([bn.backward(grad)] + [p.grad for p in bn.weights if p.trainable])
    for compiled, reference in zip(*results):
        np.testing.assert_allclose(compiled, reference, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("bad", [7, -1])
def test_sparse_accuracy_refuses_a_label_out_of_range_on_both_paths(monkeypatch, bad):
    """The compiled count checks the range in its pass (where the labels are already intp); the error is
    sparse_labels' on both paths, and nothing is counted."""
    from dlcli import metrics
    from dlcli.errors import DlcliError

    y = np.eye(7, dtype=np.float32)[[0, 1, 2]]
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        accuracy = metrics.get("sparse_categorical_accuracy")
        for labels in (np.array([0, bad, 2]), np.array([[0], [bad], [2]], np.int32)):
            with pytest.raises(DlcliError, match=f"got class label {bad}, but the output has 7 units"):
                accuracy.update(labels, y)
        assert accuracy.state() == [0.0, 0.0]


@pytest.mark.parametrize("bad, message", [(7, "got class label 7, but the output has 7 units"),
                                          (-1, "got class label -1, but the output has 7 units"),
                                          (np.nan, "non-integer values"), (1.5, "non-integer values")])
def test_sparse_crossentropy_refuses_a_label_not_a_class_on_both_paths(monkeypatch, bad, message):
    """The compiled loss checks its labels in its pass (no NumPy check before it): a label out of range, NaN or with
    a fraction raises sparse_labels' error on both paths, fused with the softmax or from logits, whatever the
    labels' type or shape; the error names the label whichever row holds it."""
    from dlcli import losses
    from dlcli.engine.activations import softmax
    from dlcli.errors import DlcliError

    z = np.random.default_rng(13).standard_normal((3, 7)).astype(np.float32)
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        for row in (0, 2):
            labels = np.array([0, 1, 2], np.float64)
            labels[row] = bad
            given = [labels, labels[:, None].astype(np.float32)]
            if float(bad).is_integer():
                given += [labels.astype(np.int64), labels[:, None].astype(np.int32)]
            for y in given:
                for loss, args in ((losses.SparseCategoricalCrossentropy(), (softmax(z), z)),
                                   (losses.SparseCategoricalCrossentropy(from_logits=True), (z,))):
                    with pytest.raises(DlcliError, match=message):
                        loss.compute(y, *args)
    monkeypatch.setenv("DLCLI_KERNELS", "numba")  # float-typed integer labels are the integers' loss, bit for bit
    loss = losses.SparseCategoricalCrossentropy()
    for a, b in zip(loss.compute(np.array([0.0, 6.0, 2.0]), softmax(z), z), loss.compute(np.array([0, 6, 2]),
                                                                                           softmax(z), z)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_compiled_forward_keeps_its_input_not_xhat(monkeypatch, relu):
    """The compiled forward writes y alone and keeps its input: the backward recomputes xhat with the forward's own
    float32 operations, so the gradients are those from the xhat the NumPy forward keeps, bit for bit (the NumPy
    backward after each forward: the same arithmetic on the same xhat)."""
    from dlcli import layers
    from dlcli.engine import activations

    rng = np.random.default_rng(11)
    x, grad = (rng.standard_normal((3, 5, 4, 6)).astype(np.float32) for _ in range(2))
    results = []
    for forward_path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", forward_path)
        bn = layers.BatchNormalization()
        bn.ensure_built(x.shape[1:])
        bn.post_activation = activations.get("relu") if relu else None
        bn.forward(x, training=True)
        if forward_path == "numba":
            assert bn.xhat is None and bn.x is x
            mean, inv_std = bn.mean, bn.inv_std  # the compiled statistics, given to the NumPy forward's xhat below
        else:
            bn.xhat, bn.inv_std, bn.relu_fused = (x - mean) * inv_std, inv_std, relu
        monkeypatch.setenv("DLCLI_KERNELS", "numpy")
        results.append([bn.backward(grad)] + [p.grad for p in bn.weights if p.trainable])
    for recomputed, kept in zip(*results):
        np.testing.assert_array_equal(recomputed, kept)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_recurrent_step_product_equals_matmul_at_every_edge(dtype):
    """kernels/gemm.matmul (the block product on AVX-512, else BLAS) on shapes around its blocks' edges (8 rows,
    2 vectors of 64 bytes), C a view with a row stride wider than its row, beta 0 (whatever C held) and 1."""
    import numba

    from dlcli.engine import blas
    from dlcli.kernels import gemm

    product = numba.njit(lambda address, a, b, c, beta: gemm.matmul(address, a, b, c, beta))
    rng = np.random.default_rng(0)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    for m, k, n in [(1, 1, 1), (7, 3, 8), (8, 16, 9), (9, 0, 16), (17, 5, 17), (16, 32, 31), (8, 65, 33),
                    (3, 4, 48), (5, 2, 49), (128, 65, 32), (32, 128, 32), (128, 32, 64)]:
        a, b = rng.normal(size=(m, k)).astype(dtype), rng.normal(size=(k, n)).astype(dtype)
        wide = np.full((m, n + 5), np.nan, dtype)
        c = wide[:, 2:n + 2]
        product(blas.gemm_address(dtype), a, b, c, 0.0)
        np.testing.assert_allclose(c, a @ b, rtol=tol, atol=tol * max(k, 1))
        start = c.copy()
        product(blas.gemm_address(dtype), a, b, c, 1.0)
        np.testing.assert_allclose(c, start + a @ b, rtol=tol, atol=tol * max(k, 1))
        assert np.isnan(wide[:, :2]).all() and np.isnan(wide[:, n + 2:]).all()


def test_the_products_take_blas_where_numba_does_not_compile_for_avx512(tmp_path):
    """Without AVX-512 (here: NUMBA_CPU_NAME, numba compiling for a generic CPU) the recurrent step products go
    through BLAS, as on every CPU without it: edges as above but k >= 1 (a layer has a feature or a unit; BLAS refuses
    k = 0's leading dimension); the layers' products (engine/blas.product) are np.matmul's even where OpenBLAS runs
    AVX2 kernels. In a process of its own."""
    code = ("import numba, numpy as np\n"
            "from dlcli.engine import blas\nfrom dlcli.kernels import gemm\n"
            "assert not gemm.AVX512\n"
            "blas.avx512_kernels = lambda: False\n"
            "assert blas.block_products() is None\n"
            "product = numba.njit(lambda address, a, b, c, beta: gemm.matmul(address, a, b, c, beta))\n"
            "rng = np.random.default_rng(0)\n"
            "for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-13)):\n"
            "    for m, k, n in ((1, 1, 1), (7, 3, 8), (17, 5, 17), (128, 65, 32), (32, 128, 32)):\n"
            "        a, b = rng.normal(size=(m, k)).astype(dtype), rng.normal(size=(k, n)).astype(dtype)\n"
            "        c = np.full((m, n + 5), np.nan, dtype)[:, 2:n + 2]\n"
            "        product(blas.gemm_address(dtype), a, b, c, 0.0)\n"
            "        np.testing.assert_allclose(c, a @ b, rtol=tol, atol=tol * max(k, 1))\n"
            "        start = c.copy()\n"
            "        product(blas.gemm_address(dtype), a, b, c, 1.0)\n"
            "        np.testing.assert_allclose(c, start + a @ b, rtol=tol, atol=tol * max(k, 1))\n"
            "        assert (blas.product(a, b) == a @ b).all() and (blas.product(a.T.copy().T, b) == a @ b).all()\n"
            "print('blas')\n")
    env = {**os.environ, "DLCLI_KERNELS": "numba", "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout == "blas\n", done.stderr


@pytest.mark.parametrize("shape", [(6, 7, 7, 5), (3, 4, 2), (2, 3, 4, 5, 3), (4, 9, 9, 1), (3, 1, 1, 2), (0, 3, 3, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("keepdims", [False, True])
def test_global_average_pooling_equals_its_numpy_twin(monkeypatch, shape, dtype, keepdims):
    """The compiled global mean and its backward give the twin's bits (NumPy adds the steps in order, channel by
    channel; with one channel its pairwise sum runs, on both paths), NaN and inf included."""
    from dlcli import layers

    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    x.flat[:3] = [np.nan, np.inf, -0.0][:x.size]
    layer = getattr(layers, f"GlobalAveragePooling{len(shape) - 2}D")(keepdims=keepdims)
    grad = rng.standard_normal((shape[0], *(1,) * (len(shape) - 2) * keepdims, shape[-1])).astype(dtype)

    def run():
        with np.errstate(invalid="ignore"):
            return layer.forward(x, training=True), layer.backward(grad)
    (y, dx), (y_twin, dx_twin) = both_paths(monkeypatch, run)
    for compiled, reference in ((y, y_twin), (dx, dx_twin)):
        assert compiled.dtype == reference.dtype == dtype and compiled.shape == reference.shape
        np.testing.assert_array_equal(compiled, reference)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("lane_floats", [1 << 17, 1])  # the flat ranges (or samples) whole, or in parts
def test_relu_backward_of_a_gradient_sum_equals_adding_then_masking(monkeypatch, dtype, strided, lane_floats):
    """ReLU.backward_sum(a, b) is backward(a + b) bit for bit on both paths (the graph's sum then the mask), b
    contiguous or a strided view (a conv's input gradient cut from its padded one), on the lanes' parts."""
    from dlcli.engine import activations, lanes

    monkeypatch.setattr(lanes, "FLAT_FLOATS", lane_floats)
    rng = np.random.default_rng(11)
    z = rng.standard_normal((5, 6, 7, 3)).astype(dtype)
    z.flat[::7] = 0
    a = rng.standard_normal(z.shape).astype(dtype)
    a.flat[1:4] = [np.nan, -np.inf, np.inf]
    padded = rng.standard_normal((5, 8, 9, 3)).astype(dtype)
    padded[0, 1, 1, :] = -0.0
    a[0, 0, 0, :] = -0.0
    b = padded[:, 1:-1, 1:-1] if strided else np.ascontiguousarray(padded[:, 1:-1, 1:-1])
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        relu = activations.get("relu")
        relu.forward(z)
        with np.errstate(invalid="ignore"):
            results += [relu.backward_sum(a, b), relu.backward(a + b)]
    for result in results[1:]:
        assert result.dtype == dtype
        np.testing.assert_array_equal(result, results[0])
        np.testing.assert_array_equal(np.signbit(result), np.signbit(results[0]))
