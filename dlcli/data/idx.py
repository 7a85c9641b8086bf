"""IDX files (LeCun's MNIST format): magic 0x0000 <dtype code> <ndim>, big-endian int32 dims, row-major data.

Reading checks the magic, the dims and the exact byte length, so a truncated or padded file is an error naming
it, never a silently short dataset."""
import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from dlcli.errors import DlcliError

_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_bytes(path) -> bytes:
    """The file's content, gunzipped when it is gzip (by its magic bytes, not its name)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DlcliError(f"{path}: corrupt or truncated gzip file ({e}); delete it so it can be fetched again")
    except OSError as e:
        raise DlcliError(f"{path}: cannot read ({e.strerror or e})")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_idx(data: bytes, name: str = "<bytes>", magic: int | None = None) -> np.ndarray:
    """Decode IDX bytes; `magic` (e.g. 2051 for MNIST images) pins the dtype code and rank."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DlcliError(f"{name}: not an IDX file (bad magic bytes {data[:4].hex() or 'none'})")
    found = int.from_bytes(data[:4], "big")
    if magic is not None and found != magic:
        raise DlcliError(f"{name}: IDX magic {found}, expected {magic}; is this the right file?")
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DlcliError(f"{name}: truncated IDX header ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DlcliError(f"{name}: IDX file {what}: dims {list(dims)} need {expected} bytes, file has {len(data)}; "
                         f"delete it so it can be fetched again")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
