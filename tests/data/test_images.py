import numpy as np
import pytest

from dlcli.data import load_dataset
from dlcli.errors import DlcliError

from tests.conftest import require_dataset

from .conftest import write_idx, write_idx_set


def load(**kw):
    return load_dataset({"type": "mnist", "verify": False, **kw})


def test_synthetic_set_loads_scaled(isolated):
    arrays = write_idx_set(isolated / "set")
    d = load(path=str(isolated / "set"))
    assert d.x_train.shape == (12, 28, 28) and d.x_train.dtype == np.float32
    assert np.allclose(d.x_train * 255, arrays["train-images-idx3-ubyte"])
    assert d.y_train.dtype == np.int64 and np.array_equal(d.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert d.classes == [str(i) for i in range(10)] and (len(d.y_train), d.y_val, len(d.y_test)) == (12, None, 5)
    raw = load(path=str(isolated / "set"), normalize=False)
    assert raw.x_train.max() > 1


def test_uncompressed_files_and_limit(isolated):
    write_idx_set(isolated / "set", compress=False)
    d = load(path=str(isolated / "set"), limit=3)
    assert len(d.x_train) == len(d.y_train) == 3 and len(d.x_test) == 5  # limit caps training only
    d = load(path=str(isolated / "set"), limit=3, test_limit=2)
    assert len(d.x_test) == len(d.y_test) == 2


def test_search_order(isolated, monkeypatch):
    """path > $DLCLI_DATA_DIR/<name> > cache > /usr/share/datasets, first found wins."""
    locations = {"path": isolated / "explicit", "env": isolated / "env" / "fashion-mnist",
                 "cache": isolated / "cache" / "datasets" / "fashion_mnist",
                 "system": isolated / "system" / "fashion-mnist"}
    for marker, folder in enumerate(locations.values()):
        write_idx_set(folder, marker=marker)
    monkeypatch.setenv("DLCLI_DATA_DIR", str(isolated / "env"))

    def marker(**kw):
        return int(load_dataset({"type": "fashion_mnist", "verify": False, "normalize": False, **kw}).x_train[0, 0, 0])

    assert marker(path=str(locations["path"])) == 0
    assert marker() == 1
    monkeypatch.delenv("DLCLI_DATA_DIR")
    assert marker() == 2
    for f in locations["cache"].iterdir():
        f.unlink()
    assert marker() == 3
    d = load_dataset({"type": "fashion_mnist", "verify": False})
    assert "system" in d.source and d.classes[0] == "T-shirt/top"


def test_incomplete_location_is_skipped_but_explicit_path_is_an_error(isolated, monkeypatch):
    write_idx_set(isolated / "env" / "mnist")
    (isolated / "env" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx_set(isolated / "system" / "mnist", marker=7)
    monkeypatch.setenv("DLCLI_DATA_DIR", str(isolated / "env"))
    assert load(normalize=False).x_train[0, 0, 0] == 7
    with pytest.raises(DlcliError, match=r"missing t10k-labels-idx1-ubyte"):
        load(path=str(isolated / "env" / "mnist"))


def test_corrupt_file_is_an_error_naming_it(isolated):
    write_idx_set(isolated / "set")
    bad = isolated / "set" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-6])
    with pytest.raises(DlcliError, match="train-labels-idx1-ubyte.gz"):
        load(path=str(isolated / "set"))


def test_label_count_mismatch(isolated):
    write_idx_set(isolated / "set")
    write_idx(isolated / "set" / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(DlcliError, match="11 labels for 12 images"):
        load(path=str(isolated / "set"))


def test_checksum_verified_by_default(isolated):
    write_idx_set(isolated / "set")
    with pytest.raises(DlcliError, match="not the official mnist train-images-idx3-ubyte"):
        load_dataset({"type": "mnist", "path": str(isolated / "set")})


@pytest.mark.slow
def test_real_mnist(monkeypatch):
    monkeypatch.setenv("DLCLI_DATA_DIR", str(require_dataset("mnist").parent))
    d = load_dataset({"type": "mnist"})
    assert d.x_train.shape == (60000, 28, 28) and d.x_test.shape == (10000, 28, 28)
    assert d.x_train.dtype == np.float32 and 0.0 <= d.x_train.min() and d.x_train.max() == 1.0
    # Label counts as ../shared/datasets/mnist/README.txt lists them.
    assert np.bincount(d.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert "$DLCLI_DATA_DIR" in d.source


def test_real_fashion_mnist_recompressed_copy_is_recognised(isolated, monkeypatch):
    """Checksums pin the decompressed content: an uncompressed copy (as another tool might leave) verifies."""
    import gzip
    src = require_dataset("fashion-mnist")
    folder = isolated / "copy"
    folder.mkdir()
    for f in src.glob("*.gz"):
        (folder / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    d = load_dataset({"type": "fashion_mnist", "path": str(folder), "limit": 10})
    assert d.x_train.shape == (10, 28, 28) and d.classes[9] == "Ankle boot"
