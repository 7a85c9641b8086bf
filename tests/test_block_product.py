"""engine/blas.product, which product runs the layers' float32 products: the AVX-512 block product
(kernels/gemm.product) on an AVX-512 CPU whose OpenBLAS runs other kernels, else np.matmul; equal to np.matmul to
float32 rounding at edge shapes, a transpose read in place with the same bits, np.matmul's results elsewhere."""
import numpy as np
import pytest

from dlcli import kernels
from dlcli.engine import blas
from dlcli.kernels import gemm

needs_avx512 = pytest.mark.skipif(not gemm.AVX512, reason="the block product runs on AVX-512 CPUs only")


@pytest.fixture
def block(monkeypatch):
    """The compiled path with the block product taken (as under this workplace's forced Haswell OpenBLAS)."""
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    monkeypatch.setattr(blas, "avx512_kernels", lambda: False)


def within_rounding(got, a, b):
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    k = a.shape[-1]
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max(initial=0) <= 4 * k * np.finfo(np.float32).eps * np.abs(want).max(initial=0)


# around the blocks' edges (8 rows, 2 vectors of 16 float32), k = 0 (BLAS refuses its leading dimension; here zeros),
# empty outputs, Dense's and the Winograd taps' shapes
SHAPES = [(1, 1, 1), (7, 3, 17), (8, 16, 32), (9, 5, 33), (17, 8, 1), (33, 65, 31), (0, 5, 3), (5, 0, 3), (5, 3, 0),
          (129, 32, 32), (65, 64, 64), (128, 784, 512)]


@needs_avx512
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_the_block_product_equals_matmul_to_rounding_and_reads_a_transpose_in_place(block, m, k, n):
    assert blas.block_products() is kernels.compiled("gemm")
    rng = np.random.default_rng(m + k + n)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    got = blas.product(a, b)
    within_rounding(got, a, b)
    np.testing.assert_array_equal(blas.product(np.ascontiguousarray(a.T).T, b), got)  # a transpose read in place
    np.testing.assert_array_equal(blas.product(np.repeat(a, 3, axis=1)[:, ::3], b), got)  # a strided view
    out = np.full((m, n + 3), np.nan, np.float32)[:, 1:n + 1]  # rows contiguous, a wider row stride
    assert blas.product(a, b, out) is out
    np.testing.assert_array_equal(out, got)
    taps = np.stack([a, a[::-1]]), np.stack([b, b[:, ::-1].copy()])  # a stack: each product on its own
    stacked = blas.product(*taps)
    np.testing.assert_array_equal(stacked[0], got)
    within_rounding(stacked[1], taps[0][1], taps[1][1])
    np.testing.assert_array_equal(blas.product(np.ascontiguousarray(taps[0].transpose(0, 2, 1)).transpose(0, 2, 1),
                                               taps[1]), stacked)


@needs_avx512
@pytest.mark.parametrize("rows", [1, 8, 129])
def test_a_part_of_the_rows_gives_the_bits_of_the_whole(block, rows):
    """Each element sums its k products in order whatever the blocks, so a caller may split rows over lanes."""
    rng = np.random.default_rng(rows)
    a, b = rng.standard_normal((rows, 40)).astype(np.float32), rng.standard_normal((40, 50)).astype(np.float32)
    whole = blas.product(a, b)
    for start in range(0, rows, 3):
        np.testing.assert_array_equal(blas.product(a[start:start + 3], b), whole[start:start + 3])


def test_other_products_are_matmuls(block, monkeypatch):
    """float64, mixed dtypes, b's rows strided, another out dtype, broadcasting and mismatched shapes are np.matmul's,
    with its results and its errors; so is every product on the NumPy path and where OpenBLAS runs AVX-512 kernels."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((5, 4))
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    for x, y in [(a, b), (a32, b), (a32, np.asfortranarray(b32)), (a32[None].repeat(3, 0), b32),
                 (a32[None].repeat(3, 0), b32[None].repeat(2, 0)[:1])]:
        np.testing.assert_array_equal(blas.product(x, y), np.matmul(x, y))
    out = np.empty((6, 4))
    assert blas.product(a32, b32, out) is out
    np.testing.assert_array_equal(out, np.matmul(a32, b32, out=np.empty((6, 4))))
    with pytest.raises(ValueError):
        blas.product(a32, a32)
    with pytest.raises(ValueError):
        blas.product(a32, b32, np.empty((6, 5), np.float32))
    for setting in ("numpy", "avx512"):
        if setting == "numpy":
            monkeypatch.setenv("DLCLI_KERNELS", "numpy")
        else:
            monkeypatch.setenv("DLCLI_KERNELS", "numba")
            monkeypatch.setattr(blas, "avx512_kernels", lambda: True)
        assert blas.block_products() is None
        np.testing.assert_array_equal(blas.product(a32, b32), np.matmul(a32, b32))

