"""Memory a model needs (weights, optimizer state, activations at a batch size) against what this machine has.

`inspect-shapes` prints the estimate; training refuses a model that cannot fit before it allocates, and a single
weight that could never be allocated is refused by `Layer.add_weight` instead of ending in NumPy's traceback.
"""
import os
from pathlib import Path

from dlcli.errors import DlcliError


class MemoryRefused(DlcliError):
    """A model too large for this machine (exit 2: the config asks for it)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by a cgroup limit (containers, CI runners)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return 1 << 62  # unknown (not Linux): never refuse
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            available = min(available, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return available


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def shape_size(shape) -> int:
    """Values in a shape (or a list of shapes), in Python integers so a huge model cannot overflow."""
    if isinstance(shape, list):
        return sum(shape_size(s) for s in shape)
    n = 1
    for d in shape:
        n *= int(d)
    return n


def estimate(model, batch_size: int) -> dict:
    """Bytes of weights, optimizer state and activations (float32 forward outputs kept for backward)."""
    slots = model.optimizer.slot_count() if getattr(model, "optimizer", None) is not None else 0
    weights = sum(p.value.nbytes for p in model.weights)
    optimizer = slots * sum(p.value.nbytes for p in model.trainable_weights)
    rows = model.summary_rows()
    activations = 4 * int(batch_size) * sum(shape_size(r["output_shape"]) + r["kept"] for r in rows)
    attention = 4 * int(batch_size) * sum(r["kept"] for r in rows if r["type"] in _QUADRATIC)
    return {"weights": weights, "optimizer": optimizer, "activations": activations, "slots": slots,
            "batch_size": int(batch_size), "attention": attention, "total": weights + optimizer + activations}


# Layers whose kept values grow as sequence length squared (the (heads, T, S) attention probabilities)
_QUADRATIC = ("MultiHeadAttention", "TransformerEncoder", "TransformerDecoder")


def describe(e: dict) -> str:
    return (f"weights {format_bytes(e['weights'])}, optimizer state {format_bytes(e['optimizer'])} "
            f"({e['slots']} slot{'s' if e['slots'] != 1 else ''} per weight), activations "
            f"{format_bytes(e['activations'])} at batch {e['batch_size']}" + (
                f", of which attention {format_bytes(e['attention'])} (grows as sequence length squared)"
                if e.get("attention") else ""))


def check_training_fits(model, batch_size: int):
    """Refuse, before training allocates optimizer state and activations, a model this machine cannot hold."""
    e = estimate(model, batch_size)
    available = available_bytes()
    if e["total"] > available:
        raise MemoryRefused(
            f"model '{model.name}' needs about {format_bytes(e['total'])} to train ({describe(e)}; the "
            f"`dlcli inspect-shapes` estimate) but this machine has {format_bytes(available)} available: use fewer "
            f"units/filters or a smaller train.batch_size")


def check_weight_fits(layer_name: str, weight: str, shape: tuple, dtype) -> None:
    """Refuse one weight that could never be allocated, before NumPy tries. Initialisers draw in float64 and
    cast, so the peak is the float64 draw plus the weight itself."""
    import numpy as np

    values, itemsize = shape_size(shape), np.dtype(dtype).itemsize
    available = available_bytes()
    if values * (8 + itemsize) > available:
        raise MemoryRefused(
            f"layer '{layer_name}': weight '{weight}' of shape {tuple(shape)} needs {format_bytes(values * itemsize)} "
            f"({np.dtype(dtype).name}; {format_bytes(values * (8 + itemsize))} while it is initialised) but this "
            f"machine has {format_bytes(available)} available: use fewer units/filters (`dlcli inspect-shapes` "
            f"shows the memory of a model that fits)")
