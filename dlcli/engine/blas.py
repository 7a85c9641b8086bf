"""BLAS threads for small products: a recurrent time loop runs hundreds of tiny GEMMs ((64, 32) @ (32, 128) for an
LSTM(32) at batch 64), each too small to split, yet OpenBLAS splits it over all its threads (it keeps one thread
only below m*n*k = 262,144, and this one is exactly that), and waking and joining the second thread costs more than
it saves. On this 2-core machine shared with other jobs (load average 5-8) the LSTM(32) bench step went from 273 to
203 ms (best of 4 alternating rounds) with its time loops on one thread; the large GEMMs outside the loops keep
every thread.

threadpoolctl (a dependency) switches OpenBLAS' threads around the loop; without it this is a no-op."""
from contextlib import nullcontext

_controller = None


def one_thread():
    """A context manager that runs BLAS on one thread inside it (restoring the previous count after)."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
        else:
            _controller = ThreadpoolController().select(user_api="blas")
    if not _controller or not _controller.lib_controllers:
        return nullcontext()
    return _controller.limit(limits=1)
