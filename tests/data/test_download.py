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
