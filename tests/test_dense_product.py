"""Dense's products (layers/conv_math.product): the AVX-512 block product where OpenBLAS runs other kernels, equal
to np.matmul to float32 rounding at edge shapes, a transpose read in place, the same bits on 1, 2 and 3 lanes."""
import numpy as np
import pytest

from dlcli import kernels, layers
from dlcli.engine import blas, lanes
from dlcli.kernels import gemm
from dlcli.layers import conv_math as cm

pytestmark = pytest.mark.skipif(not gemm.AVX512, reason="the block product runs on AVX-512 CPUs only")


@pytest.fixture
def block(monkeypatch):
    """The compiled path with the block product taken (as under this workplace's forced Haswell OpenBLAS)."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(blas, "avx512_kernels", lambda: False)


@pytest.mark.parametrize("m,k,n", [(128, 784, 512), (784, 128, 512), (128, 512, 10), (1, 1, 1), (7, 3, 17),
                                   (0, 5, 3), (5, 0, 3), (33, 65, 31), (9, 16, 48), (17, 8, 1)])
def test_the_product_equals_matmul_to_rounding_and_reads_a_transpose_in_place(block, m, k, n):
    rng = np.random.default_rng(m + k + n)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    want = a.astype(np.float64) @ b
    got = cm.product(a, b)
    assert got.shape == (m, n) and got.dtype == np.float32
    assert np.abs(got - want).max(initial=0) <= 4 * k * np.finfo(np.float32).eps * np.abs(want).max(initial=0)
    np.testing.assert_array_equal(cm.product(np.ascontiguousarray(a.T).T, b), got)  # a strided view: same bits
    out = np.full((m, n), np.nan, np.float32)
    assert cm.product(a, b, out=out) is out
    np.testing.assert_array_equal(out, got)


def test_float64_and_strided_right_operands_stay_with_matmul(block):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((5, 4))
    np.testing.assert_array_equal(cm.product(a, b), a @ b)
    a32, b32 = a.astype(np.float32), np.asfortranarray(b.astype(np.float32))
    np.testing.assert_array_equal(cm.product(a32, b32), a32 @ b32)


def dense_results(shape, units):
    layer = layers.Dense(units, activation="relu")
    layer.build(shape[1:])
    for p in layer.params.values():
        p.value[...] = np.random.default_rng(1).uniform(-1, 1, p.value.shape)
        p.grad = np.zeros_like(p.value)
    layer.input_grad_needed = True
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = layer.forward(x, training=True)
    dx = layer.backward(np.random.default_rng(3).standard_normal(y.shape).astype(np.float32))
    return [y, dx] + [p.grad.copy() for p in layer.params.values()]


@pytest.mark.parametrize("shape,units", [((37, 40), 24), ((5, 6, 33), 17), ((128, 784), 512)])
def test_dense_gives_the_same_bits_on_one_two_and_three_lanes_and_its_twins_values(block, monkeypatch, shape, units):
    monkeypatch.setattr(cm, "PRODUCT_FLOPS", 0)  # parts at any size
    monkeypatch.setattr(lanes, "SHORT_FLOATS", 0)
    results = []
    for count in (1, 2, 3):
        monkeypatch.setattr(lanes, "count", lambda count=count: count)
        results.append(dense_results(shape, units))
    for one, two, three in zip(*results):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)
    monkeypatch.setenv("DLCLI_KERNELS", "numpy")
    assert kernels.compiled("gemm") is None
    for got, want in zip(results[0], dense_results(shape, units)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
