"""The image folder's fast path for its commonest file: an 8-bit, non-interlaced PNG already of the run's image_size
and color_mode (what `dlcli data to-folder` writes, and most thumbnail datasets). Pillow spends ~30 us of a 28x28
MNIST PNG's ~55 (one thread, AMD EPYC, load ~9) opening, probing and setting up its decoder; here a file is one read,
its chunks are split with struct, zlib inflates its rows and one compiled call (kernels/png.py) undoes the row
filters of the whole batch. The pixels are Pillow's, bit for bit (tests/data/test_png.py). Any other file, and
anything unexpected in one (a bad checksum is not looked for: Pillow does not check IDAT's either), is left to
Pillow, which decodes it or names what is wrong; so is every file when the compiled kernels do not run."""
import os
import struct
import zlib

import numpy as np

from dlcli import kernels

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {"grayscale": (0, 1), "rgb": (2, 3), "rgba": (6, 4)}  # color_mode -> (PNG colour type, channels)


def decode(files: list, size: tuple[int, int], color_mode: str) -> tuple[np.ndarray, list[int]]:
    """uint8 (len(files), height, width, channels) pixels of the files this path decodes, and the positions of
    those it leaves to Pillow (their pixels unset)."""
    color_type, channels = COLOR_TYPES[color_mode]
    height, width = size
    pixels = np.empty((len(files), height, width, channels), np.uint8)
    compiled = kernels.compiled("png")
    if compiled is None or height * width > (_pillow_pixel_limit() or height * width):
        return pixels, list(range(len(files)))  # Pillow warns of, or refuses, a possible decompression bomb
    raw = np.empty((len(files), height, 1 + width * channels), np.uint8)
    fast, left = [], []
    for j, f in enumerate(files):
        rows = _filtered_rows(f, width, height, color_type, raw.shape[1] * raw.shape[2])
        if rows is None:
            left.append(j)
        else:
            raw[len(fast)].reshape(-1)[:] = np.frombuffer(rows, np.uint8)
            fast.append(j)
    raw = raw[:len(fast)]
    corrupt = (raw[:, :, 0] > 4).any(axis=1)  # a filter byte PNG does not define: Pillow's message names it
    if corrupt.any():
        left = sorted(left + [fast[k] for k in np.flatnonzero(corrupt)])
        fast, raw = [j for j, bad in zip(fast, corrupt) if not bad], raw[~corrupt]
    if len(fast) == len(files):
        compiled.unfilter(raw, pixels.reshape(len(files), height, width * channels), channels)
    elif fast:
        out = np.empty((len(fast), height, width * channels), np.uint8)
        compiled.unfilter(raw, out, channels)
        pixels[fast] = out.reshape(len(fast), height, width, channels)
    return pixels, left


def _read(file) -> bytes:
    """A file's bytes by plain system calls: 5 us for a 300-byte PNG where open().read() takes 8."""
    fd = os.open(file, os.O_RDONLY)
    try:
        data = chunk = os.read(fd, 1 << 16)
        while chunk:
            chunk = os.read(fd, 1 << 16)
            data += chunk
        return data
    finally:
        os.close(fd)


def _pillow_pixel_limit() -> int | None:
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def _filtered_rows(file, width: int, height: int, color_type: int, length: int) -> bytes | None:
    """The inflated IDAT data of a PNG of exactly this size and colour type, 8 bits, not interlaced, or None."""
    try:
        data = _read(file)
    except OSError:
        return None
    if data[:8] != SIGNATURE or len(data) < 33:
        return None
    size, kind, w, h, depth, color, compression, filtering, interlace = struct.unpack_from(">I4sIIBBBBB", data, 8)
    if (kind != b"IHDR" or size != 13 or (w, h) != (width, height) or depth != 8 or color != color_type
            or compression or filtering or interlace):
        return None
    idat, pos = [], 33
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + size])
        elif kind == b"IEND":
            break
        elif kind in (b"acTL", b"fcTL"):  # an animated PNG: Pillow knows which frame comes first
            return None
        pos += 12 + size
    else:
        return None  # no IEND: truncated
    try:
        rows = zlib.decompress(b"".join(idat))
    except zlib.error:
        return None
    return rows if len(rows) == length else None
