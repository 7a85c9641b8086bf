"""The image folder's fast path for its commonest file: an 8-bit, non-interlaced PNG already of the run's image_size
and color_mode (what `dlcli data to-folder` writes, and most thumbnail datasets). Pillow spends ~30 us of a 28x28
MNIST PNG's ~55 (one thread, AMD EPYC, load ~9) opening, probing and setting up its decoder; here Python reads each
file with one system call and one compiled call (kernels/png.py) decodes the whole batch into the batch's own
array: chunks, inflate, row filters; ~10 us a file in all, half of it reading. The pixels are Pillow's, bit for bit
(tests/data/test_png.py). Any other file, and anything unexpected in one (a bad checksum is not looked for: Pillow
does not check IDAT's either), is left to Pillow, which decodes it or names what is wrong; so is every file when the
compiled kernels do not run."""
import os

import numpy as np

from dlcli import kernels

COLOR_TYPES = {"grayscale": (0, 1), "rgb": (2, 3), "rgba": (6, 4)}  # color_mode -> (PNG colour type, channels)


def decode(files: list, color_mode: str, out: np.ndarray) -> list[int]:
    """The pixels of the files this path decodes into out (len(files), height, width, channels), uint8 or float32
    and C-contiguous; returns the positions of those it leaves to Pillow (their pixels unset)."""
    color_type, channels = COLOR_TYPES[color_mode]
    n, height, width, _ = out.shape
    compiled = kernels.compiled("png")
    if compiled is None or height * width > (_pillow_pixel_limit() or height * width):
        return list(range(n))  # Pillow warns of, or refuses, a possible decompression bomb
    blobs = [_read(f) for f in files]
    bounds = np.zeros(n + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=bounds[1:])
    data = np.frombuffer(b"".join(blobs), np.uint8)
    done = compiled.decode(data, bounds, out.reshape(n, height, width * channels), color_type, channels)
    return np.flatnonzero(done == 0).tolist()


def _read(file) -> bytes:
    """A file's bytes by plain system calls (4 us for a 300-byte PNG where open().read() takes 8), b"" where it
    cannot be read (Pillow names the problem). One read: a regular file is read short only at its end, and a file
    read short anyway ends before its IEND, so the kernel leaves it to Pillow."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return b""
    try:
        data = os.read(fd, 1 << 16)
        if len(data) == 1 << 16:
            chunks = [data]
            while chunks[-1]:
                chunks.append(os.read(fd, 1 << 20))
            data = b"".join(chunks)
        return data
    except OSError:
        return b""
    finally:
        os.close(fd)


def _pillow_pixel_limit() -> int | None:
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS
