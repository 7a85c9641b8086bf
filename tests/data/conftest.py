"""Shared fixtures: an isolated environment (no real cache, no system dir, no internet) and synthetic IDX sets."""
import gzip
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from dlcli.data import paths

from tests.conftest import require_dataset


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every data test runs with an empty cache, no $DLCLI_DATA_DIR, no /usr/share/datasets and a mirror that
    refuses connections, so nothing depends on (or downloads into) the machine's real state."""
    monkeypatch.setenv("DLCLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DLCLI_DATA_DIR", raising=False)
    monkeypatch.setenv("DLCLI_DATASET_MIRROR", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(paths, "SYSTEM_DIR", tmp_path / "system")
    return tmp_path


# IDX type codes (LeCun's format), written independently of the reader under test.
_IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def write_idx(path, array, compress: bool | None = None) -> None:
    """Write `array` as IDX, gzipped when `compress` (default: when the name ends in .gz)."""
    array = np.asarray(array)
    code = _IDX_CODES[array.dtype.str[1:]]
    body = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    body += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(body) if (path.suffix == ".gz" if compress is None else compress) else body)


def write_idx_set(folder: Path, n_train=12, n_test=5, seed=0, compress=True, marker=None) -> dict:
    """Four MNIST-shaped IDX files; `marker` fills pixel [0, 0, 0] of every image so tests can tell sets apart."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8)}
    if marker is not None:
        arrays["train-images-idx3-ubyte"][:, 0, 0] = marker
    for name, a in arrays.items():
        write_idx(folder / (name + ".gz" if compress else name), a)
    return arrays


class _Handler(SimpleHTTPRequestHandler):
    """Serves the datasets folder (tests.conftest.DATASETS_DIR) under /good/; /bad/ serves a valid gzip of altered content (wrong checksum);
    /short/ announces the full Content-Length and closes after half the bytes."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        mode, _, rest = self.path.lstrip("/").partition("/")
        file = Path(self.directory) / rest
        if mode not in ("good", "bad", "short") or not file.is_file():
            self.send_error(404)
            return
        body = file.read_bytes()
        if mode == "bad":
            import gzip
            content = bytearray(gzip.decompress(body))
            content[-1] ^= 0xFF
            body = gzip.compress(bytes(content))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "short" else body)
        if mode == "short":
            self.close_connection = True


@pytest.fixture(scope="module")
def _httpd():
    datasets = require_dataset("mnist").parent
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(datasets)))
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(_httpd):
    """A threaded HTTP server on 127.0.0.1 serving the datasets folder: (server with .hits, base URL)."""
    _httpd.hits = []
    return _httpd, f"http://127.0.0.1:{_httpd.server_address[1]}"
