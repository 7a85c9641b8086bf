"""Dense's products on lanes where the AVX-512 block product runs them (engine/blas.block_products: OpenBLAS on other
kernels, as under this workplace's forced Haswell ones): the same bits on 1, 2 and 3 lanes, the forward pass and every
gradient within float32 rounding of the float64 products, and np.matmul's path everywhere else."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dlcli import kernels, layers, models
from dlcli.engine import blas, lanes
from dlcli.kernels import gemm
from dlcli.layers import core

needs_avx512 = pytest.mark.skipif(not gemm.AVX512, reason="the block product runs on AVX-512 CPUs only")


@pytest.fixture
def block(monkeypatch):
    """The compiled path with the block product taken (as under this workplace's forced Haswell OpenBLAS)."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(blas, "avx512_kernels", lambda: False)


def dense_step(shape, units, activation="relu", dtype=np.float32):
    """A Dense layer's forward and backward on fixed data: [output, input gradient, kernel's, bias'], the inputs."""
    layer = layers.Dense(units, activation=activation)
    layer.build(shape[1:])
    rng = np.random.default_rng(1)
    for p in layer.params.values():
        p.value = rng.uniform(-1, 1, p.value.shape).astype(dtype)
        p.grad = np.zeros_like(p.value)
        p.zero_grad()
    layer.input_grad_needed = True
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    y = layer.forward(x, training=True)
    g = np.random.default_rng(3).standard_normal(y.shape).astype(dtype)
    dx = layer.backward(g)
    return [y, dx, layer.kernel.grad.copy(), layer.bias.grad.copy()], (x, g, layer)


@needs_avx512
@pytest.mark.parametrize("shape,units", [((37, 40), 24), ((5, 6, 33), 17), ((128, 784), 512), ((9, 300), 12)])
def test_dense_on_lanes_gives_the_same_bits_on_one_two_and_three_lanes(block, monkeypatch, shape, units):
    monkeypatch.setattr(core, "SPLIT_FLOPS", 0)  # parts at any size, a few columns or rows each
    monkeypatch.setattr(core, "COLUMNS", 16)
    monkeypatch.setattr(core, "ROWS", 7)
    results = []
    for count in (1, 2, 3):  # lanes: BLAS's threads (one in each lane)
        with threadpool_limits(count, user_api="blas"):
            assert lanes.count() == count
            got, (_, _, layer) = dense_step(shape, units)
        assert layer.splits_batch
        results.append(got)
    for one, two, three in zip(*results):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)
    monkeypatch.setattr(core, "SPLIT_FLOPS", 1 << 62)  # one part: the block product's bits again (the output, the
    y, _, dw, db = results[0]  # kernel's gradient; the input gradient is np.matmul's, fixed by the parts' sizes)
    whole = dense_step(shape, units)[0]
    for one, whole in zip((y, dw, db), whole[:1] + whole[2:]):
        np.testing.assert_array_equal(one, whole)


@needs_avx512
@pytest.mark.parametrize("activation", ["relu", None])
def test_dense_on_lanes_and_its_gradients_are_the_float64_products_to_rounding(block, activation):
    """The forward pass and the three gradients against the same formulas in float64 (a float32 gradient check:
    float64 layers stay with np.matmul), and against the NumPy twins' path."""
    (y, dx, dw, db), (x, g, layer) = dense_step((50, 6, 40), 33, activation)
    w, b = (p.value.astype(np.float64) for p in (layer.kernel, layer.bias))
    x64, g64 = x.astype(np.float64).reshape(-1, 40), g.astype(np.float64).reshape(-1, 33)
    z = x64 @ w + b
    if activation == "relu":
        g64 = g64 * (z > 0)
        z = np.maximum(z, 0)
    tol = 8 * 40 * np.finfo(np.float32).eps
    for got, want in ((y.reshape(-1, 33), z), (dx.reshape(-1, 40), g64 @ w.T), (dw, x64.T @ g64), (db, g64.sum(0))):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    twin, _ = dense_step((50, 6, 40), 33, activation)  # still the block product: the same bits
    for got, want in zip((y, dx, dw, db), twin):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("setting", ["numpy", "avx512_openblas", "float64"])
def test_dense_keeps_matmul_off_the_block_path(monkeypatch, setting):
    """DLCLI_KERNELS=numpy, OpenBLAS's own AVX-512 kernels and float64 layers: np.matmul, no lanes, main's bits."""
    monkeypatch.setenv("DLCLI_KERNELS", "numpy" if setting == "numpy" else "numba")
    monkeypatch.setattr(blas, "avx512_kernels", lambda: setting == "avx512_openblas")
    dtype = np.float64 if setting == "float64" else np.float32
    (y, dx, dw, db), (x, g, layer) = dense_step((20, 30), 12, dtype=dtype)
    assert not layer.splits_batch
    w = layer.kernel.value
    gz = g * (y > 0)
    np.testing.assert_array_equal(dw, x.T @ gz)
    np.testing.assert_array_equal(dx, gz @ w.T)


@needs_avx512
def test_a_training_step_with_dense_on_lanes_spreads_and_matches_one_lane(block, monkeypatch):
    """The trainer's step keeps BLAS on one thread around a model whose Dense layers run on lanes; two lanes give
    one lane's weights."""
    def trained(threads):
        model = models.Sequential([layers.Flatten(input_shape=(6, 7)), layers.Dense(300, activation="relu"),
                                   layers.Dense(5, activation="softmax")])
        model.build(rng=np.random.default_rng(0))
        model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy")
        rng = np.random.default_rng(1)
        x, y = rng.standard_normal((64, 6, 7)).astype(np.float32), rng.integers(0, 5, 64)
        with threadpool_limits(threads, user_api="blas"):
            for _ in range(3):
                model.train_step([x], [y])
        return model.get_weights()

    monkeypatch.setattr(core, "SPLIT_FLOPS", 0)
    spread = []
    monkeypatch.setattr(lanes, "spread", lambda *threads, original=lanes.spread: (spread.append(1),
                                                                                  original(*threads))[1])
    one = trained(1)
    for a, b in zip(one, trained(2)):
        np.testing.assert_array_equal(a, b)
    assert spread
    monkeypatch.setenv("DLCLI_KERNELS", "numpy")
    assert kernels.compiled("gemm") is None
    for a, b in zip(one, trained(2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
