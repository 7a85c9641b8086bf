"""The short wait of a lane for its next task, and of a caller for its lanes' results, before either sleeps
(engine/lanes.py): the counter the other side bumps after each hand-over is polled, with the GIL released, for a
bounded time on the monotonic clock. libc's clock_gettime and sched_yield are called by address (plain arguments,
so the kernel caches); being opaque calls, they also make the counter be read again at every turn. The NumPy path
does not wait: it sleeps at once, as lanes did before."""
import numba
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

JIT = dict(cache=True, nogil=True)
CLOCK_MONOTONIC = 1  # Linux's and the BSDs' id (macOS: 6); a wrong id makes clock_gettime fail, so no wait at all


@intrinsic
def _clock_gettime(typingctx, fn, clock, ts):
    """fn(clock, ts.data): clock_gettime at address fn filling ts (two int64: seconds, nanoseconds); its result."""
    def codegen(context, builder, sig, args):
        fn_v, clock_v, ts_v = args
        i32, ptr = ir.IntType(32), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i32, [i32, ptr])
        data = context.make_array(sig.args[2])(context, builder, ts_v).data
        return builder.call(builder.inttoptr(fn_v, fnty.as_pointer()),
                            [builder.trunc(clock_v, i32), builder.bitcast(data, ptr)])

    return types.int32(fn, clock, ts), codegen


@intrinsic
def call_void(typingctx, fn):
    """fn(): a call of the int function at address fn taking no arguments (sched_yield); its result."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])

    return types.int32(fn), codegen


@numba.njit(**JIT)
def _now(clock, ts):
    """Nanoseconds on the monotonic clock, or -1 where the call fails."""
    if _clock_gettime(clock, CLOCK_MONOTONIC, ts) != 0:
        return -1
    return ts[0] * 1000000000 + ts[1]


@numba.njit(**JIT)
def wait_for_change(clock, give_way, counter, seen, limit_ns, ts):
    """True as soon as counter[0] != seen, False after limit_ns nanoseconds (at once where the clock fails). Each
    turn calls give_way (sched_yield's address): a thread runnable on this core (another job's, or the lane this
    wait is for) runs first, so the wait takes only a core nothing else wants."""
    start = _now(clock, ts)
    if start < 0:
        return counter[0] != seen
    while counter[0] == seen:
        call_void(give_way)
        now = _now(clock, ts)
        if now < 0 or now - start >= limit_ns:
            return False
    return True
