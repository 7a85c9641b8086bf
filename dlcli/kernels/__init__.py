"""Compiled kernels: the one place that chooses between a Numba kernel and its NumPy twin.

`DLCLI_KERNELS=numba` (the default) runs the compiled kernels, `DLCLI_KERNELS=numpy` the NumPy reference they are
tested against. Numba is imported at the first kernel call, never at `import dlcli`, so `dlcli --help` stays fast;
where it cannot be imported the NumPy path runs after one warning. The kernels compile with cache=True: the first
use on a machine compiles (seconds), later processes load the cache: about 0.3 s of CPU for numba's import and its
CPU target's set-up (once per process; scipy.linalg's import refused, see _scipy_blas_refused), then ~0.005 s per
kernel.

The kernels a training step calls (gemm.product, conv's im2col / col2im, winograd's transforms, pooling's and the
pooled normalisation's) write into the arrays their caller passes and return nothing: compiled code returning an
array boxes it, which calls back into Python (numba's _numba_unpickle, for the array's class) every call. One thread, AMD EPYC, alternating in one process:
a small product returning its `out` 0.50 us a call, 0.28 returning nothing; with a 32 MB sweep between calls (a
step's data evicts the interpreter's) 9.6 -> 6.0 us median. A resnet training step made 286 such calls.
"""
import atexit
import contextlib
import ctypes
import gc
import os
import sys
import threading
import warnings

from dlcli.errors import ConfigError

CHOICES = ("numba", "numpy")
_libc_functions: dict[tuple, tuple | None] = {}  # names -> their addresses (libc)
_loaded: dict[str, object] = {}  # module name -> its compiled module, or None where numba failed to import
_loading = threading.Lock()  # numba's set-up in two threads at once fails ("generator already executing")


# os.environ's own store and its key for DLCLI_KERNELS: a lookup there takes ~0.05 us where os.environ.get decodes
# (~0.5-1.8 us), and a layer's call or an optimizer's update asks once per kernel (18 times per convnet step)
_ENVIRON, _KEY = os.environ._data, os.environ.encodekey("DLCLI_KERNELS")
_chosen = (None, "numba")  # (the raw value last seen, the path it selects)


def choice() -> str:
    """The kernel path DLCLI_KERNELS selects, checked at every call so a test (or a user) can switch it: setting
    os.environ stores a new value object, which is parsed again; the same object answers from `_chosen`."""
    global _chosen
    raw = _ENVIRON.get(_KEY)
    if raw is _chosen[0]:
        return _chosen[1]
    value = os.environ.get("DLCLI_KERNELS", "numba").strip().lower() or "numba"
    if value not in CHOICES:
        raise ConfigError(f"DLCLI_KERNELS must be one of {', '.join(CHOICES)}; got {value!r}")
    _chosen = (raw, value)  # one tuple: a thread reading meanwhile sees the old pair or the new, never a mix
    return value


def compiled(name: str):
    """The compiled module dlcli.kernels.<name>, or None when the NumPy twin should run."""
    if choice() == "numpy":
        return None
    if name not in _loaded:
        with _loading:
            if name not in _loaded:
                try:
                    _loaded[name] = _load(name)
                    if len(_loaded) == 1:
                        atexit.register(_exit_without_collections)
                except ImportError as e:
                    if not any(m is None for m in _loaded.values()):  # one warning per process
                        warnings.warn(f"numba could not be imported ({e}); running the NumPy kernels "
                                      "(pip install numba, or set DLCLI_KERNELS=numpy to silence this)",
                                      stacklevel=2)
                    _loaded[name] = None
    return _loaded[name]


def _load(name: str):
    """Import the compiled module with the garbage collector paused: numba's import and its CPU target's set-up
    (done here, not at the first kernel call) allocate ~10^5 objects, and each collection meanwhile would walk the
    process' own (a training run's ~1.3*10^5): measured 0.30 s of CPU instead of 0.45 s."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with _scipy_blas_refused():
            module = _import(name)
            from numba.core.registry import cpu_target  # what a cached kernel's first call would refresh

            cpu_target.target_context.refresh()
        return module
    finally:
        if enabled:
            gc.enable()


def libc(*names) -> tuple[int, ...] | None:
    """The C library's functions `names` by address, for the kernels that call them (lanes' polls, PNG reads), or
    None where there is no such library or function (not a POSIX system). Looked up once a process."""
    if names not in _libc_functions:
        try:
            library = ctypes.CDLL(None)
            _libc_functions[names] = tuple(ctypes.cast(getattr(library, name), ctypes.c_void_p).value
                                           for name in names)
        except (OSError, AttributeError, TypeError):
            _libc_functions[names] = None
    return _libc_functions[names]


def _exit_without_collections():
    """At interpreter exit, after one collection (which runs the finalizers of whatever garbage there is), freeze
    every object left: the collections of the interpreter's teardown then skip numba's ~10^5 objects, which they
    would walk several times for nothing (the process ends). A process that loaded a kernel exited in 0.27-0.28 s of
    CPU, 0.08 with this (AMD EPYC, load 13); nothing of the teardown is skipped but the cyclic collector's walks."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def _scipy_blas_refused():
    """The CPU target's refresh imports numba.np.arraymath, whose import asks for scipy.linalg.cython_blas (so that
    np.dot in compiled code can call BLAS): that imports all of scipy.linalg, ~0.2 s of CPU, 140 modules, every
    process. No kernel of ours calls numba's np.dot or np.linalg (gemm.py calls OpenBLAS through
    engine/blas.py's addresses), so the import is refused while numba is imported and its target set up, and allowed again after it:
    numba then takes BLAS as absent only for np.correlate / np.convolve in compiled code (a plain loop instead),
    and its np.dot, which asks again when it compiles, still finds scipy. Nothing is refused where scipy.linalg
    is already imported (nothing to save)."""
    name = "scipy.linalg.cython_blas"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # `import` raises ImportError for a None entry, before importing any parent package
    try:
        yield
    finally:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


def _import(name: str):
    """The compiled modules by name, as plain imports (the import graph shows them; nothing is loaded by a string)."""
    if name == "pooling":
        import dlcli.kernels.pooling as pooling  # imported anew when absent from sys.modules (a failed import)

        return pooling
    if name == "optimizers":
        import dlcli.kernels.optimizers as optimizers

        return optimizers
    if name == "normalization":
        import dlcli.kernels.normalization as normalization

        return normalization
    if name == "activations":
        import dlcli.kernels.activations as activations

        return activations
    if name == "attention":
        import dlcli.kernels.attention as attention

        return attention
    if name == "norms":
        import dlcli.kernels.norms as norms

        return norms
    if name == "png":
        import dlcli.kernels.png as png

        return png
    if name == "conv":
        import dlcli.kernels.conv as conv

        return conv
    if name == "recurrent":
        import dlcli.kernels.recurrent as recurrent

        return recurrent
    if name == "classification":
        import dlcli.kernels.classification as classification

        return classification
    if name == "embedding":
        import dlcli.kernels.embedding as embedding

        return embedding
    if name == "winograd":
        import dlcli.kernels.winograd as winograd

        return winograd
    if name == "lanes":
        import dlcli.kernels.lanes as lanes

        return lanes
    if name == "gemm":
        import dlcli.kernels.gemm as gemm

        return gemm
    raise KeyError(f"no compiled kernel module {name!r}")
