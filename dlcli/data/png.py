"""The image folder's fast path for its commonest file: an 8-bit, non-interlaced PNG already of the run's image_size
and color_mode (what `dlcli data to-folder` writes, and most thumbnail datasets). Pillow spends ~30 us of a 28x28
MNIST PNG's ~55 (one thread, AMD EPYC, load ~9) opening, probing and setting up its decoder; here one compiled call
(kernels/png.py) reads and decodes the whole batch into the batch's own array, without the GIL: open, read, close,
chunks, inflate, row filters; ~8 us a file in all, half of it the system calls. The pixels are Pillow's, bit for bit
(tests/data/test_png.py). Any other file, one that cannot be read, and anything unexpected in one (a bad checksum is
not looked for: Pillow does not check IDAT's either), is left to Pillow, which decodes it or names what is wrong; so
is every file when the compiled kernels do not run, or where the C library has no open/read/close to call (not a
POSIX system)."""
import os

import numpy as np

from dlcli import kernels
from dlcli.engine import lanes

COLOR_TYPES = {"grayscale": (0, 1), "rgb": (2, 3), "rgba": (6, 4)}  # color_mode -> (PNG colour type, channels)


class Paths:
    """Files' paths as the C library takes them, made once per source: NUL-terminated bytes one after the other in
    one array, path i from starts[i]."""

    def __init__(self, files: list):
        encoded = [os.fsencode(f) + b"\0" for f in files]
        self.starts = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=self.starts[1:])
        self.data = np.frombuffer(b"".join(encoded), np.uint8)

    def __len__(self):
        return len(self.starts) - 1


def decode(paths: Paths, index: np.ndarray, color_mode: str, out: np.ndarray) -> list[int]:
    """The pixels of the files paths[index] this path decodes into out (len(index), height, width, channels), uint8
    or float32 and C-contiguous; returns the positions in index of those it leaves to Pillow (their pixels unset)."""
    color_type, channels = COLOR_TYPES[color_mode]
    n, height, width, _ = out.shape
    compiled, calls = kernels.compiled("png"), _calls()
    if compiled is None or calls is None or height * width > (_pillow_pixel_limit() or height * width):
        return list(range(n))  # Pillow warns of, or refuses, a possible decompression bomb
    # Lanes poll for their next task only while the machine has a core to spare; then the decoder gives way after
    # each file. On a busy machine it does not: each yield would hand the core to another job's thread for a slice
    # (the book convnet's training thread waited 87-215 ms an epoch of 6,400 PNGs for its batches, 7-13 without).
    give_way = lanes.spare_core()
    done = compiled.decode(paths.data, paths.starts, np.asarray(index, np.int64), calls, give_way,
                           out.reshape(n, height, width * channels), color_type, channels)
    return np.flatnonzero(done == 0).tolist()


def _calls() -> np.ndarray | None:
    """The C library's open, read, close and sched_yield by address and open's flags (read-only, closed on exec as
    Python opens files), or None where there is no such library."""
    addresses = kernels.libc("open", "read", "close", "sched_yield")
    return None if addresses is None else np.array([*addresses, os.O_RDONLY | os.O_CLOEXEC], np.int64)


def _pillow_pixel_limit() -> int | None:
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS
