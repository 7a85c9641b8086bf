"""Fetch a file from mirrors into the cache: progress bar on stderr, SHA-256 check of the (decompressed) content,
atomic move (temp file + fsync + rename), so the cache never holds a partial or wrong file."""
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from dlcli.data.idx import read_bytes, sha256
from dlcli.errors import DlcliError

MIRROR_ENV = "DLCLI_DATASET_MIRROR"
TIMEOUT = 60  # seconds without data before a mirror counts as failed


def mirror_urls(bases: list[str], subdir: str, filename: str) -> list[str]:
    """URLs to try in order. $DLCLI_DATASET_MIRROR=<base> replaces the public mirrors with <base>/<subdir>/<file>
    (the layout of ../shared/datasets, e.g. mnist/, fashion-mnist/)."""
    override = os.environ.get(MIRROR_ENV)
    if override:
        return [f"{override.rstrip('/')}/{subdir}/{filename}"]
    return [base + filename for base in bases]


def download(urls: list[str], dest: Path, content_sha256: str) -> Path:
    """Fetch the first URL that works into `dest`; `content_sha256` pins the gunzipped content, so a copy
    recompressed by another tool is still the real thing."""
    failures = []
    for url in urls:
        try:
            _fetch_verified(url, dest, content_sha256)
            return dest
        except DlcliError as e:
            failures.append(e.message)
    raise DlcliError(f"could not download {dest.name}: " + "; ".join(failures)
                     + f". Check your connection, or put the file into {dest.parent}/ yourself "
                       f"(or point DLCLI_DATA_DIR at a folder holding it)")


def _fetch_verified(url: str, dest: Path, content_sha256: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out)
            out.flush()
            os.fsync(out.fileno())
        got = sha256(read_bytes(tmp))
        if got != content_sha256:
            raise DlcliError(f"{url}: checksum mismatch (SHA-256 of the content {got}, expected {content_sha256}); "
                             f"the file was discarded")
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except DlcliError as e:
        if e.message.startswith(url):
            raise
        raise DlcliError(f"{url}: {e.message}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stream(url: str, out) -> None:
    from tqdm import tqdm  # lazy: keeps `import dlcli.data` light

    request = urllib.request.Request(url, headers={"User-Agent": "dlcli"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(url).name,
                      file=sys.stderr, disable=None, leave=False) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except http.client.IncompleteRead as e:
        raise DlcliError(f"truncated transfer: the connection closed after {received + len(e.partial)} of "
                         f"{total} bytes") from None
    except urllib.error.HTTPError as e:
        raise DlcliError(f"HTTP {e.code} {e.reason}")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DlcliError(f"download failed ({getattr(e, 'reason', None) or e})")
    if total is not None and received != total:
        raise DlcliError(f"truncated transfer: received {received} of {total} bytes") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
