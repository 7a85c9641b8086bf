"""Data-parallel training on MPI: the world of ranks, how a global batch is shared, one gradient exchange per step.

The scheme is Horovod's and PyTorch DDP's. Every rank holds the whole model and draws the same permutation; rank r
takes a contiguous slice of each global batch, runs forward and backward on it with the loss gradient scaled by
its share of the batch (its samples / the global batch), and one in-place Allreduce of a single flat float32 buffer
sums the gradients, the loss and metric sums, and a status word. Summing share-weighted gradients gives exactly the
mean over the global batch, also for an uneven last batch or a dataset that does not divide by the rank count.

`World` is a world of one process (no MPI needed: the same code path without a launcher); `MPIWorld` is mpi4py's
COMM_WORLD. Every collective is started non-blocking and polled, and between polls a rank looks for a failure
message from another rank: an exception on any rank reaches all of them within one poll, each raises the same
message and exits with the same code, and none hangs in a collective the failed rank will never join.
"""
import atexit
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np

from dlcli.errors import DlcliError, require

FAILURE_TAG = 0x444C  # point-to-point messages carrying a failure (a collective cannot: the failed rank is gone)
EXIT_TAG = 0x444D  # rank 0 to the others after a failure: its message is printed and flushed, they may exit
ACK_SECONDS = 10.0  # how long a failed rank waits for rank 0 to take over its message before printing it itself
SPIN_POLLS = 200  # polls before a waiting rank starts sleeping between them (short waits stay fast)


def rank_share(count: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of `count` items: sizes differ by at most one."""
    return count * rank // size, count * (rank + 1) // size


class RemoteFailure(DlcliError):
    """Another rank failed: this rank stops with that rank's message and exit code."""


class World:
    """A world of one process: every collective is the identity. Also the base of MPIWorld."""

    rank, size, local_size = 0, 1, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce(self, buf: np.ndarray) -> np.ndarray:
        """In-place sum of `buf` over ranks (a contiguous array); returns it."""
        return buf

    def bcast_json(self, obj):
        """Rank 0's JSON-able `obj` on every rank."""
        return obj

    def bcast_arrays(self, arrays: dict | None) -> dict:
        """Rank 0's {name: array} on every rank (others pass None)."""
        return arrays

    def gather_json(self, obj) -> list | None:
        """[every rank's obj] on rank 0, None elsewhere."""
        return [obj]

    def barrier(self):
        pass

    @contextmanager
    def guard(self):
        """Propagates a failure inside the block to every rank (MPIWorld); nothing to do for one process."""
        yield


class MPIWorld(World):
    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_size = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()  # ranks sharing this node's cores
        self.failed_code: int | None = None
        self.printed_here = False  # a failed rank that printed its own message need not wait for rank 0's
        atexit.register(self._exit_after_failure)  # registered after mpi4py's, so it runs before MPI_Finalize

    # --- collectives, polled --------------------------------------------------------------------------------
    def allreduce(self, buf):
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        return buf

    def bcast_json(self, obj):
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.is_root else None
        return json.loads(self._bcast_bytes(data).tobytes().decode())

    def bcast_arrays(self, arrays):
        header = [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()] if self.is_root else None
        out = {}
        for key, dtype, shape in self.bcast_json(header):
            buf = np.asarray(arrays[key], order="C") if self.is_root else np.empty(shape, np.dtype(dtype))
            if buf.size:
                self._wait(self.comm.Ibcast(buf.reshape(-1).view(np.uint8), root=0))
            out[key] = buf
        return out

    def gather_json(self, obj):
        mine = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        sizes = np.zeros(self.size, np.int64)
        sizes[self.rank] = mine.size
        self.allreduce(sizes)
        out = np.zeros(int(sizes.sum()), np.uint8)
        start = int(sizes[:self.rank].sum())
        out[start:start + mine.size] = mine
        self.allreduce(out)  # small (RNG states): a sum of disjoint pieces is the concatenation
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        if not self.is_root:
            return None
        return [json.loads(out[a:b].tobytes().decode()) for a, b in zip(offsets[:-1], offsets[1:])]

    def barrier(self):
        self._wait(self.comm.Ibarrier())

    def _bcast_bytes(self, data):
        n = np.array([0 if data is None else data.size], np.int64)
        self._wait(self.comm.Ibcast(n, root=0))
        buf = data.copy() if self.is_root else np.empty(int(n[0]), np.uint8)
        self._wait(self.comm.Ibcast(buf, root=0))
        return buf

    def _wait(self, request):
        """Complete `request`, raising RemoteFailure as soon as another rank reports one."""
        polls = 0
        while not request.Test():
            if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=FAILURE_TAG):
                status = self.MPI.Status()
                message, code = self.comm.recv(source=self.MPI.ANY_SOURCE, tag=FAILURE_TAG, status=status)
                self.failed_code = code  # the pending collective never completes: skip MPI_Finalize at exit
                if self.is_root:
                    self._send_failure(status.Get_source(), "ack", code)  # rank 0 will print the message
                raise RemoteFailure(message, code)
            polls += 1
            if polls > SPIN_POLLS:
                time.sleep(0.0002)  # yield the core: ranks often outnumber idle cores while one lags

    # --- failures ---------------------------------------------------------------------------------------------
    @contextmanager
    def guard(self):
        try:
            yield
        except BaseException as e:
            if not getattr(e, "announced", False) and not isinstance(e, SystemExit):
                self.announce(e)
            raise

    def announce(self, error: BaseException):
        """Tell every other rank that this one failed, with the message and exit code they should stop with."""
        error.announced = True
        if isinstance(error, RemoteFailure):
            return
        message, code = failure_text(error), failure_code(error)
        if not self.is_root:  # rank 0 is the process a user watches: name any other
            message = f"rank {self.rank} of {self.size} failed: {message}"
        self.failed_code = code
        for dest in range(self.size):
            if dest != self.rank:
                self._send_failure(dest, message, code)
        if isinstance(error, DlcliError):
            error.message = message
        if not self.is_root and not self._root_took_over():
            print(f"error: {message}", file=sys.__stderr__, flush=True)  # rank 0 is stuck elsewhere: say it here
            self.printed_here = True

    def _send_failure(self, dest, message, code):
        self.comm.isend((message, code), dest=dest, tag=FAILURE_TAG).Wait()

    def _root_took_over(self) -> bool:
        """Rank 0 acknowledges (or announces its own failure): then it prints, and this rank stays quiet."""
        return self._wait_for_root(FAILURE_TAG)

    def _wait_for_root(self, tag) -> bool:
        """Receive rank 0's message with `tag` within ACK_SECONDS (False: rank 0 is stuck elsewhere)."""
        deadline = time.monotonic() + ACK_SECONDS
        while time.monotonic() < deadline:
            if self.comm.Iprobe(source=0, tag=tag):
                self.comm.recv(source=0, tag=tag)
                return True
            time.sleep(0.005)
        return False

    def _exit_after_failure(self):
        # MPI_Finalize would wait for collectives the failed rank never joins; every rank leaves with its code.
        # Rank 0 prints the message, and a launcher (mpiexec, srun) kills the ranks still running as soon as one
        # exits non-zero: the others wait for rank 0 to say its message is out before they exit.
        if self.failed_code is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if self.is_root:
            self._tell_others_to_exit()
        elif not self.printed_here:
            self._wait_for_root(EXIT_TAG)
        os._exit(self.failed_code)

    def _tell_others_to_exit(self):
        sends = [self.comm.isend(None, dest=dest, tag=EXIT_TAG) for dest in range(self.size) if dest != self.rank]
        deadline = time.monotonic() + 1.0  # a rank that gave up waiting has gone: never hang on its send
        while not all(r.Test() for r in sends) and time.monotonic() < deadline:
            time.sleep(0.001)


def failure_text(error: BaseException) -> str:
    if isinstance(error, DlcliError):
        return error.message
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    frame = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" (at {os.path.basename(frame[0].filename)}:{frame[0].lineno} in {frame[0].name})" if frame else ""
    return f"{type(error).__name__}: {error}{where}"


def failure_code(error: BaseException) -> int:
    if isinstance(error, DlcliError):
        return error.exit_code
    return 130 if isinstance(error, KeyboardInterrupt) else 1


_world: World | None = None


def world(distributed: bool = False) -> World:
    """This process's world: MPI's COMM_WORLD with `distributed`, else (and without a launcher) one process."""
    global _world
    if not distributed:
        return World()
    if _world is None:
        require("mpi4py", "distributed", "--distributed")
        from mpi4py import MPI

        _world = MPIWorld(MPI.COMM_WORLD)
        if _world.rank != 0:  # the terminal is rank 0's: other ranks' failures reach rank 0, which prints them
            sys.stdout = sys.stderr = open(os.devnull, "w")
    return _world


def limit_threads(world: World, threads: int | None = None):
    """BLAS threads per rank: `threads`, else OMP_NUM_THREADS when the user set it, else this node's cores shared
    among the ranks on it (more threads than cores makes the ranks fight for them)."""
    if threads is None and (world.size == 1 or os.environ.get("OMP_NUM_THREADS")):
        return None
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // world.local_size)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(threads), user_api="blas")


class BatchStatSync:
    """BatchNormalization's hook: sums per-channel statistics over ranks so every rank normalises with the global
    batch's mean and variance (SyncBatchNorm). `ghost` marks a rank holding no sample of this batch (a global batch
    smaller than the rank count): it runs one stand-in sample that counts for nothing."""

    def __init__(self, world: World):
        self.world = world
        self.ghost = False
        self.paused = False  # a local diagnosis (divergence.json) normalises with its own batch

    def __call__(self, buf: np.ndarray) -> np.ndarray:
        return self.world.allreduce(buf)

    @contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def attach_batch_sync(model, world: World) -> BatchStatSync | None:
    """Give every BatchNormalization layer the sync hook (none for one process: local statistics are global)."""
    if world.size == 1:  # before the walk over every layer's attributes: 70 us of each fit (the LSTM bench's)
        return None
    from dlcli.checkpoint import layer_paths
    from dlcli.layers.normalization import BatchNormalization

    bns = [layer for layer in layer_paths(model).values() if isinstance(layer, BatchNormalization)]
    if not bns:
        return None
    sync = BatchStatSync(world)
    for layer in bns:
        layer.sync = sync
    return sync


def share_initial_state(world: World, model):
    """Rank 0's weights and optimizer state on every rank (initialisers are seeded, but this makes it a fact)."""
    if world.size == 1:
        return
    weights = world.bcast_arrays(model.weights_dict() if world.is_root else None)
    model.load_weights_dict(weights, source="rank 0's weights")
    state = world.bcast_arrays(model.optimizer.get_state() if world.is_root else None)
    model.optimizer.set_state(state)


def share_checkpoint(world: World, loaded: dict | None) -> dict | None:
    """Rank 0's loaded checkpoint (dlcli.checkpoint.load) on every rank: other nodes may not see its disk."""
    if world.size == 1:
        return loaded
    meta = world.bcast_json(None if loaded is None else {"path": str(loaded["path"]), "header": loaded["header"]})
    if meta is None:
        return None
    arrays = world.bcast_arrays(loaded["arrays"] if world.is_root else None)
    from pathlib import Path

    return {"path": Path(meta["path"]), "header": meta["header"], "arrays": arrays}


def rank_streams(world: World, model, saved: list | None = None):
    """Dropout and augmentation draw rank-specific streams: rank 0 keeps the run's, rank r > 0 derives its own from
    it (or takes its saved state when a checkpoint of the same rank count holds one)."""
    if world.size == 1:
        return
    from dlcli.checkpoint import current_paths, layer_rngs

    rngs = layer_rngs(model)
    if saved is not None and len(saved) == world.size:
        for key, state in current_paths(model, saved[world.rank]).items():
            rngs[key].bit_generator.state = state
        return
    if world.rank == 0:
        return
    for key in sorted(rngs):
        seed = int(rngs[key].integers(2**63))
        rngs[key].bit_generator.state = np.random.default_rng([seed, world.rank]).bit_generator.state


class GradientExchange:
    """One step's collective: [share-weighted gradients | metric sums | status] in one float32 buffer, summed
    in place. Each parameter's gradient lives in the buffer (p.grad is a view into it), so layers accumulate
    straight into what is sent and nothing is packed or unpacked. The status word counts ranks asking to stop
    (Ctrl-C / SIGTERM), so all ranks stop at the same batch."""

    def __init__(self, world: World, params, n_sums: int):
        odd = [p.path for p in params if p.value.dtype != np.float32]
        if odd:
            raise DlcliError(f"data-parallel training exchanges float32 gradients; {', '.join(odd[:3])} "
                             f"{'is' if len(odd) == 1 else 'are'} not float32: drop the layers' dtype setting")
        self.world, self.params = world, list(params)
        self.n_grads = sum(p.value.size for p in params)
        self.n_sums = n_sums
        self.buf = np.zeros(self.n_grads + n_sums + 1, np.float32)
        offset = 0
        for p in params:
            view = self.buf[offset:offset + p.value.size].reshape(p.value.shape)
            view[...] = p.grad
            p.grad = view
            offset += p.value.size
        self.seconds = 0.0  # time spent in the allreduce, for the bench
        self.steps = 0

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    def __call__(self, sums: np.ndarray, stop: bool) -> tuple[np.ndarray, bool]:
        """Sums the gradients (in place) and `sums` over ranks; returns (global sums, whether any rank stops)."""
        for p in self.params:  # the buffer is summed as it is: a gradient no layer wrote since zero_grad is
            if p.grad_zeroed:  # still the last step's, and reading `grad` writes its zeros
                _ = p.grad
        buf = self.buf
        buf[self.n_grads:self.n_grads + self.n_sums] = sums
        buf[-1] = 1.0 if stop else 0.0
        start = time.perf_counter()
        self.world.allreduce(buf)
        self.seconds += time.perf_counter() - start
        self.steps += 1
        return buf[self.n_grads:self.n_grads + self.n_sums].astype(np.float64), bool(buf[-1] > 0)
