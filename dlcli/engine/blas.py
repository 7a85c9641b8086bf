"""BLAS threads for small products: a recurrent time loop runs hundreds of tiny GEMMs ((64, 32) @ (32, 128) for an
LSTM(32) at batch 64), each too small to split, yet OpenBLAS splits it over all its threads (it keeps one thread
only below m*n*k = 262,144, and this one is exactly that), and waking and joining the second thread costs more than
it saves. On this 2-core machine shared with other jobs (load average 5-8) the LSTM(32) bench step went from 273 to
203 ms (best of 4 alternating rounds) with its time loops on one thread; the recurrent layers now run wholly on one
thread (layers/recurrent.py says why), the other layers' GEMMs keep every thread.

threadpoolctl (a dependency) switches OpenBLAS' threads around the loop; without it this is a no-op. Inference uses
the same switch the other way round (engine/graph.py): one BLAS thread per pass, a pass per core.

Which product runs the layers' float32 products has its home here too (product): OpenBLAS, or where it runs AVX2
kernels on an AVX-512 CPU the compiled block product (kernels/gemm)."""
import os
from contextlib import nullcontext

import numpy as np  # loaded before the first lookup: threadpoolctl only finds BLAS libraries in memory

from dlcli import kernels

_controller = None


def _blas():
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
        else:
            found = ThreadpoolController().select(user_api="blas")
            # NumPy's own library where a process has several (SciPy's wheels bring another OpenBLAS, listed first):
            # the one np.matmul calls, whose threads one_thread limits and whose cblas_?gemm gemm_address finds
            own = [lib.filepath for lib in found.lib_controllers
                   if lib.filepath.startswith(os.path.dirname(np.__file__))]  # numpy.libs/ or numpy/.dylibs/
            _controller = found.select(filepath=own) if own else found
    return _controller if _controller and _controller.lib_controllers else None


def one_thread():
    """A context manager that runs BLAS on one thread inside it (restoring the previous count after). Where BLAS is
    on one thread already (inside lanes.spread, or in a lane) it does nothing: the switch and restore cost even then,
    and an LSTM training step asks 6 times."""
    counts = [count() for count in _thread_counters()]
    if max(counts, default=1) == 1:
        return nullcontext()
    return _OneThread(_blas().lib_controllers, counts)


class _OneThread:
    """BLAS on one thread inside, each library's count restored after: its set_num_threads directly, where
    threadpoolctl's limit() builds a limiter and reads every library's state each time."""

    def __init__(self, libs, counts):
        self.libs, self.counts = libs, counts

    def __enter__(self):
        for lib in self.libs:
            lib.set_num_threads(1)

    def __exit__(self, *exc):
        for lib, count in zip(self.libs, self.counts):
            lib.set_num_threads(count)


def threads() -> int:
    """BLAS threads now: the cores a process may keep busy (1 when threadpoolctl cannot tell)."""
    counters = _thread_counters()
    return counters[0]() if len(counters) == 1 else max((count() for count in counters), default=1)


_counters: list | None = None  # _thread_counters()


def _thread_counters() -> list:
    """Each BLAS library's get_num_threads, bound once, asked at each call (a threadpool_limits block changes the
    count). A training step asks once or more (lanes.spread, lanes.run, one_thread): through _blas(), a generator
    and threadpoolctl's num_threads property a call took 8-11 us of the training thread's CPU inside fit (0.6 us
    warm), 5-7 so."""
    global _counters
    if _counters is None:
        controller = _blas()
        _counters = [] if controller is None else [lib.get_num_threads for lib in controller.lib_controllers]
    return _counters


_gemm_addresses: dict = {}  # dtype -> gemm_address(dtype)


def gemm_address(dtype) -> tuple[int, bool] | None:
    """(address of OpenBLAS' cblas_sgemm or cblas_dgemm, whether its integers are 64-bit) for float32 or float64, from
    the OpenBLAS NumPy links (the library threadpoolctl controls, so one_thread applies to its calls too), or None
    where there is none (another BLAS, no threadpoolctl): a compiled time loop calls it between its fused steps."""
    import ctypes

    dtype = np.dtype(dtype)
    if dtype in _gemm_addresses:
        return _gemm_addresses[dtype]
    kind = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}.get(dtype)
    controller, found = _blas(), None
    for lib in controller.lib_controllers if kind and controller else []:
        # threadpoolctl's OpenBLAS controller knows the library's symbol affixes (scipy_ ... 64_ in NumPy's wheels)
        prefix, suffix = getattr(lib, "_symbol_prefix", None), getattr(lib, "_symbol_suffix", None)
        if lib.internal_api != "openblas" or prefix is None:
            continue
        function = getattr(lib.dynlib, f"{prefix}cblas_{kind}gemm{suffix}", None)
        if function is not None:
            found = ctypes.cast(function, ctypes.c_void_p).value, suffix in ("64_", "_64")
            break
    _gemm_addresses[dtype] = found
    return found


# OpenBLAS's cores whose kernels are AVX-512 ones (threadpoolctl's `architecture` of its library)
AVX512_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")
_avx512 = None


def library() -> dict | None:
    """NumPy's BLAS as threadpoolctl describes it (internal_api, version, architecture, filepath, ...), or None."""
    controller = _blas()
    return controller.lib_controllers[0].info() if controller else None


def avx512_kernels() -> bool:
    """Whether NumPy's OpenBLAS runs AVX-512 kernels (its choice on an AVX-512 CPU, unless OPENBLAS_CORETYPE forces
    others, as this workplace's Haswell does); False where it cannot tell. Asked once per process."""
    global _avx512
    if _avx512 is None:
        _avx512 = (library() or {}).get("architecture") in AVX512_CORES
    return _avx512


def block_products():
    """kernels/gemm (compiled) where its AVX-512 block product should run the layers' float32 products instead of
    NumPy's OpenBLAS: the compiled kernels run (not DLCLI_KERNELS=numpy), numba compiles for this CPU and it has
    AVX-512, and OpenBLAS runs other kernels (this workplace's forced Haswell ones); else None (np.matmul)."""
    gemm = kernels.compiled("gemm")
    return gemm if gemm is not None and gemm.AVX512 and not avx512_kernels() else None


# compared by instance: `dtype == np.float32` converts the type on every call (~0.03 us, of product's ~1)
_FLOAT32 = np.dtype(np.float32)


def product(a, b, out=None):
    """a @ b (np.matmul's result, into `out` if given) for 2-D arrays or 3-D stacks of one length (the Winograd
    convs' taps): kernels/gemm.product where block_products() says so, float32 with b's and out's rows contiguous
    (a may be a transposed view, read in place), else np.matmul. OpenBLAS's AVX2 kernels took 2.2-2.3x as long as
    the block product: one thread, the 36 taps of a resnet chunk, (129, 32) @ (32, 32) 92.5 -> 39.8 us and
    (65, 64) @ (64, 64) 172.4 -> 79.6 us; its AVX-512 (SkylakeX) kernels 40.1 and 78.8 us, the same bits as the
    block product at these shapes, so np.matmul stays there (AMD EPYC, Zen 5, load 5). One part: a caller that
    splits rows over lanes gets the same bits in any part (each element's k products summed in order)."""
    gemm = block_products()
    if (gemm is None or not a.ndim == b.ndim in (2, 3) or a.dtype != _FLOAT32 or b.dtype != _FLOAT32
            or b.strides[-1] != 4 or a.shape[-1] != b.shape[-2] or a.ndim == 3 and a.shape[0] != b.shape[0]):
        return np.matmul(a, b, out=out)  # its broadcasting, its errors
    shape = (*a.shape[:-1], b.shape[-1])
    if out is None:
        out = np.empty(shape, _FLOAT32)
    elif out.shape != shape or out.dtype != _FLOAT32 or out.strides[-1] != 4:
        return np.matmul(a, b, out=out)
    if a.ndim == 2:
        gemm.matrix_product(a, b, out)
    else:
        gemm.product(a, b, out)
    return out

