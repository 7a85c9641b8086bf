"""The download path against a local HTTP server on 127.0.0.1 (never the internet)."""
import numpy as np
import pytest

from dlcli.data import load_dataset
from dlcli.data.download import download
from dlcli.data.images import MNIST
from dlcli.data.paths import cache_dir
from dlcli.errors import DlcliError

LABELS = "t10k-labels-idx1-ubyte"


def test_full_download_into_cache_then_reuse(server, monkeypatch):
    httpd, url = server
    monkeypatch.setenv("DLCLI_DATASET_MIRROR", f"{url}/good")
    d = load_dataset({"type": "mnist", "limit": 100})
    assert "downloaded" in d.source and d.x_train.shape == (100, 28, 28)
    files = sorted(p.name for p in (cache_dir() / "mnist").iterdir())
    assert files == sorted(f"{stem}.gz" for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                     "t10k-images-idx3-ubyte", LABELS))
    hits = len(httpd.hits)
    again = load_dataset({"type": "mnist", "limit": 100})
    assert len(httpd.hits) == hits and "(cache)" in again.source
    assert np.array_equal(again.x_train, d.x_train)


def test_only_missing_files_are_fetched(server, monkeypatch, isolated):
    httpd, url = server
    monkeypatch.setenv("DLCLI_DATASET_MIRROR", f"{url}/good")
    folder = cache_dir() / "mnist"
    download([f"{url}/good/mnist/{LABELS}.gz"], folder / f"{LABELS}.gz", MNIST.sha256["test_labels"])
    httpd.hits.clear()
    load_dataset({"type": "mnist", "limit": 5})
    assert len(httpd.hits) == 3 and not any(LABELS in h for h in httpd.hits)


def test_wrong_checksum_is_an_error_and_leaves_nothing(server):
    _, url = server
    dest = cache_dir() / "mnist" / f"{LABELS}.gz"
    with pytest.raises(DlcliError, match=r"checksum mismatch .* discarded"):
        download([f"{url}/bad/mnist/{LABELS}.gz"], dest, MNIST.sha256["test_labels"])
    assert list(dest.parent.iterdir()) == []


def test_truncated_transfer_is_an_error_and_leaves_nothing(server):
    _, url = server
    dest = cache_dir() / "mnist" / f"{LABELS}.gz"
    with pytest.raises(DlcliError, match=r"truncated transfer: received 2271 of 4542 bytes"):
        download([f"{url}/short/mnist/{LABELS}.gz"], dest, MNIST.sha256["test_labels"])
    assert list(dest.parent.iterdir()) == []


def test_next_mirror_after_a_failure(server):
    _, url = server
    dest = cache_dir() / "mnist" / f"{LABELS}.gz"
    download([f"{url}/missing/{LABELS}.gz", f"{url}/good/mnist/{LABELS}.gz"], dest, MNIST.sha256["test_labels"])
    assert dest.is_file()


def test_all_mirrors_failing_lists_each_failure(server, monkeypatch):
    _, url = server
    monkeypatch.setenv("DLCLI_DATASET_MIRROR", f"{url}/short")
    with pytest.raises(DlcliError, match=r"could not download .*truncated transfer.*DLCLI_DATA_DIR"):
        load_dataset({"type": "fashion_mnist"})
    assert not any((cache_dir() / "fashion_mnist").iterdir())


@pytest.fixture
def synthetic_mirror(tmp_path, monkeypatch):
    """A mirror of synthetic MNIST-shaped files (no ../shared needed, so these never skip), with the checksum
    table patched to their real content hashes: the verification itself is what is tested."""
    import dataclasses
    import gzip
    import hashlib
    import threading
    from functools import partial

    from tests.data.conftest import _Handler, write_idx_set

    import dlcli.data.images as images

    write_idx_set(tmp_path / "mirror" / "mnist", n_train=7, n_test=3, seed=5)
    table = {part: hashlib.sha256(gzip.decompress((tmp_path / "mirror" / "mnist" / f"{stem}.gz").read_bytes()))
             .hexdigest() for part, (stem, _) in images.PARTS.items()}
    monkeypatch.setattr(images, "MNIST", dataclasses.replace(images.MNIST, sha256=table))
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(tmp_path / "mirror")))
    httpd.hits = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}", table
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_checksum_verification_with_synthetic_bytes(synthetic_mirror, monkeypatch):
    httpd, url, table = synthetic_mirror
    dest = cache_dir() / "mnist" / f"{LABELS}.gz"
    with pytest.raises(DlcliError, match=r"checksum mismatch .* discarded"):  # altered content, valid gzip
        download([f"{url}/bad/mnist/{LABELS}.gz"], dest, table["test_labels"])
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with pytest.raises(DlcliError, match=r"checksum mismatch"):  # the right bytes against another file's hash
        download([f"{url}/good/mnist/{LABELS}.gz"], dest, table["train_labels"])
    download([f"{url}/good/mnist/{LABELS}.gz"], dest, table["test_labels"])
    assert dest.is_file()
    monkeypatch.setenv("DLCLI_DATASET_MIRROR", f"{url}/good")
    d = load_dataset({"type": "mnist"})
    assert "downloaded" in d.source and d.x_train.shape == (7, 28, 28) and len(d.y_test) == 3


def test_the_download_error_says_why_dlcli_data_dir_did_not_have_the_data(monkeypatch, tmp_path):
    # the mirror refuses connections (tests/data/conftest.py): every case ends in a failed download
    cases = [(None, r"mnist is not on this machine \(\$DLCLI_DATA_DIR is not set\), and could not download"),
             (tmp_path / "nowhere", rf"\(\$DLCLI_DATA_DIR={tmp_path / 'nowhere'}: no such folder\)"),
             (tmp_path / "data", rf"\(\$DLCLI_DATA_DIR={tmp_path / 'data'} has no mnist/ folder\)")]
    (tmp_path / "data").mkdir()
    for data_dir, message in cases:
        if data_dir is not None:
            monkeypatch.setenv("DLCLI_DATA_DIR", str(data_dir))
        with pytest.raises(DlcliError, match=message):
            load_dataset({"type": "mnist"})
    (tmp_path / "data" / "mnist").mkdir()
    (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DlcliError, match=r"mnist lacks train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                                         r"t10k-labels-idx1-ubyte \(\.gz or uncompressed\)\), and could not"):
        load_dataset({"type": "mnist"})
