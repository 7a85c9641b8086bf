"""PNG's row filters undone for a batch of images (the PNG specification, section 9): each row starts with a filter
byte, 0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth, and every byte after it is stored as the difference from a predictor
made of the bytes already decoded to its left (a), above (b) and above-left (c). Sub, Average and Paeth depend on
the byte just decoded, so a row is a loop: NumPy could vectorise it over the batch only, one Python step per byte.

Its reference is Pillow's PNG decoder, not a NumPy twin: data/png.py decodes with Pillow whenever this module does not
run (DLCLI_KERNELS=numpy, no numba), and the tests compare the two bit for bit on every filter and colour type.
"""
import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def unfilter(raw, out, bpp):
    """raw (n, height, 1 + row bytes) uint8, each row its filter byte (0-4: the caller leaves other files to Pillow)
    and filtered bytes -> out (n, height, row bytes) uint8; bpp bytes per pixel (the left neighbour's distance)."""
    n, h, stride = out.shape
    for i in range(n):
        for r in range(h):
            kind = raw[i, r, 0]
            for k in range(stride):
                x = np.int32(raw[i, r, 1 + k])
                a = np.int32(out[i, r, k - bpp]) if k >= bpp else np.int32(0)
                b = np.int32(out[i, r - 1, k]) if r > 0 else np.int32(0)
                if kind == 0:
                    v = x
                elif kind == 1:
                    v = x + a
                elif kind == 2:
                    v = x + b
                elif kind == 3:
                    v = x + (a + b) // 2
                else:
                    c = np.int32(out[i, r - 1, k - bpp]) if r > 0 and k >= bpp else np.int32(0)
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    v = x + (a if pa <= pb and pa <= pc else (b if pb <= pc else c))
                out[i, r, k] = v & 255
