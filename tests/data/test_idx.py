import gzip

import numpy as np
import pytest

from dlcli.data.idx import parse_idx, read_bytes
from dlcli.errors import DlcliError

from .conftest import write_idx


def read_idx(path, magic=None):
    return parse_idx(read_bytes(path), str(path), magic)


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(tmp_path, dtype, compress):
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    file = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(file, a)
    b = read_idx(file)
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_gzip_detected_by_content_not_name(tmp_path):
    a = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "labels", a, compress=True)
    assert np.array_equal(read_idx(tmp_path / "labels", magic=2049), a)


def test_mnist_magic_checked(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 28, 28), np.uint8))
    assert read_idx(tmp_path / "x.gz", magic=2051).shape == (2, 28, 28)
    with pytest.raises(DlcliError, match=r"x.gz: IDX magic 2051, expected 2049"):
        read_idx(tmp_path / "x.gz", magic=2049)


def test_truncated_and_padded_files_name_the_file(tmp_path):
    write_idx(tmp_path / "x", np.zeros((3, 4, 4), np.uint8))
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    (tmp_path / "long").write_bytes(data + b"\0")
    with pytest.raises(DlcliError, match=r"short: IDX file truncated: dims \[3, 4, 4\] need 64 bytes, file has 63"):
        read_idx(tmp_path / "short")
    with pytest.raises(DlcliError, match=r"long: IDX file has trailing bytes"):
        read_idx(tmp_path / "long")


def test_truncated_gzip_and_garbage(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28), np.uint8))
    data = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DlcliError, match=r"cut.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(DlcliError, match=r"junk: not an IDX file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(DlcliError, match="not an IDX file"):
        parse_idx(gzip.compress(b""))
