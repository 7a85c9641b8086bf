"""Reading Keras files as data only: the `.keras` zip and HDF5 weights, with the guards recent Keras CVEs call for.

- The zip is read member by member into memory, never extracted: only config.json, metadata.json,
  model.weights.h5 and a lookup layer's assets/layers/<layer>/vocabulary.txt (text, one token a line) are accepted
  (any other name, `../x` included, is refused by name), each under a size limit and a
  compression-ratio limit checked from the directory before a byte is inflated (zip bombs), and read with a cap in
  case the directory lies.
- The HDF5 file is opened from memory. Before anything is read, every link in it is audited: hard links only (no
  soft or external links, which can point into other files), and every dataset plain: a float array, no external
  storage (which reads host files), not virtual, no larger than the file could hold.
- Each weight's shape is compared with the one the model expects before its data is read, and its values must be
  finite: a NaN or inf weight would import and predict NaN for everything.
"""
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlcli.errors import DlcliError, require

CONFIG, METADATA, WEIGHTS = "config.json", "metadata.json", "model.weights.h5"
MEMBER_LIMITS = {CONFIG: 16 << 20, METADATA: 1 << 20, WEIGHTS: 2 << 30}  # bytes once inflated
VOCABULARY = re.compile(r"^assets/(layers/[a-z0-9_]+)/vocabulary\.txt$")  # StringLookup's / IntegerLookup's
VOCABULARY_LIMIT = 64 << 20
MAX_RATIO = 100  # Keras stores members uncompressed; real data never deflates 100:1 (Keras uses the same bound)
RATIO_FLOOR = 1 << 20  # small members (a JSON config) may compress well without being a bomb
MAX_H5_OBJECTS = 100_000


class UnsafeFile(DlcliError):
    """A file dlcli refuses to read (exit 2): the message names the file and what was refused."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


@dataclass
class KerasArchive:
    config: dict
    metadata: dict
    weights: bytes
    vocabularies: dict  # layer path in the weights' layout (layers/string_lookup) -> its vocabulary.txt lines


def read_keras_archive(path) -> KerasArchive:
    """config.json, metadata.json and the weights bytes of a `.keras` file, read safely into memory."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DlcliError(f"{path} does not exist") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafeFile(f"{path} is not a .keras file (a zip archive): {e}") from None
    with archive:
        members, vocabularies = {}, {}
        for info in archive.infolist():
            name = info.filename
            asset = VOCABULARY.match(name)
            if asset and asset.group(1) not in vocabularies:
                vocabularies[asset.group(1)] = _vocabulary(path, name, _read_member(path, archive, info))
                continue
            if name not in MEMBER_LIMITS:
                raise UnsafeFile(f"{path}: unexpected archive member '{name}'; a .keras file dlcli reads holds only "
                                 f"{', '.join(MEMBER_LIMITS)} (nothing is ever extracted to disk)")
            if name in members:
                raise UnsafeFile(f"{path}: archive member '{name}' appears twice")
            members[name] = _read_member(path, archive, info)
    missing = [n for n in (CONFIG, WEIGHTS) if n not in members]
    if missing:
        raise UnsafeFile(f"{path}: not a Keras 3 model archive (no {' or '.join(missing)})")
    return KerasArchive(_json(path, CONFIG, members[CONFIG]),
                        _json(path, METADATA, members[METADATA]) if METADATA in members else {}, members[WEIGHTS],
                        vocabularies)


def _vocabulary(path, name, data: bytes) -> list[str]:
    """Keras' save_assets: the tokens joined by newlines, as UTF-8 (trailing empty lines dropped, as Keras does)."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise UnsafeFile(f"{path}: member '{name}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _read_member(path, archive, info) -> bytes:
    limit = MEMBER_LIMITS.get(info.filename, VOCABULARY_LIMIT)
    if info.file_size > limit:
        raise UnsafeFile(f"{path}: member '{info.filename}' declares {info.file_size:,} bytes, over dlcli's limit of "
                         f"{limit:,}")
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise UnsafeFile(f"{path}: member '{info.filename}' would inflate {info.compress_size:,} bytes to "
                         f"{info.file_size:,} (more than {MAX_RATIO}:1): refusing a likely zip bomb")
    try:
        with archive.open(info) as f:
            data = f.read(min(limit, info.file_size) + 1)  # a lying directory cannot make us read more
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:  # sizes or CRC that do not match the data
        raise UnsafeFile(f"{path}: member '{info.filename}' does not match its directory entry (a damaged or "
                         f"doctored archive): {e}") from None
    if len(data) > info.file_size:
        raise UnsafeFile(f"{path}: member '{info.filename}' holds more data than its directory entry declares")
    return data


def _json(path, name, data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeFile(f"{path}: {name} is not valid JSON ({e})") from None
    except RecursionError:  # Python's parser recurses per level; no Keras config nests this deep
        raise UnsafeFile(f"{path}: {name} nests JSON arrays or objects too deeply to be a Keras config") from None
    if not isinstance(value, dict):
        raise UnsafeFile(f"{path}: {name} must hold a JSON object")
    return value


class SafeH5:
    """An HDF5 file opened from bytes and audited link by link before any value is read."""

    def __init__(self, data: bytes, source: str):
        h5py = require("h5py", "keras", "reading HDF5 weights")
        self.h5py, self.source = h5py, source
        try:
            self.file = h5py.File(io.BytesIO(data), "r")
        except OSError as e:
            raise UnsafeFile(f"{source}: not a readable HDF5 file ({e})") from None
        self._audit(self.file, "", [0])

    def _audit(self, group, prefix, count):
        h5py = self.h5py
        for name in group:
            path = f"{prefix}/{name}"
            count[0] += 1
            if count[0] > MAX_H5_OBJECTS:
                raise UnsafeFile(f"{self.source}: more than {MAX_H5_OBJECTS:,} objects in the weights file")
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                kind = "an external link (to another file)" if isinstance(link, h5py.ExternalLink) else \
                    "a soft link" if isinstance(link, h5py.SoftLink) else f"a {type(link).__name__}"
                raise UnsafeFile(f"{self.source}: '{path}' is {kind}; dlcli accepts only plain groups and datasets")
            kind = group.get(name, getclass=True)
            if kind is h5py.Group:
                self._audit(group[name], path, count)
            elif kind is h5py.Dataset:
                self._check_dataset(group[name], path)
            else:
                raise UnsafeFile(f"{self.source}: '{path}' is a {getattr(kind, '__name__', kind)}, not a group or "
                                 f"dataset")

    def _check_dataset(self, ds, path):
        if ds.external:
            raise UnsafeFile(f"{self.source}: dataset '{path}' uses HDF5 external storage (its values would be read "
                             f"from {', '.join(str(e[0]) for e in ds.external)} on this machine); refused")
        if ds.is_virtual:
            raise UnsafeFile(f"{self.source}: dataset '{path}' is a virtual dataset (its values come from other "
                             f"files); refused")
        if ds.dtype.kind not in "fiu" or ds.dtype.fields is not None:
            raise UnsafeFile(f"{self.source}: dataset '{path}' has type {ds.dtype}; only numeric arrays are read")
        declared = int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
        if declared > MEMBER_LIMITS[WEIGHTS] or declared > MAX_RATIO * max(ds.id.get_storage_size(), 1) + RATIO_FLOOR:
            raise UnsafeFile(f"{self.source}: dataset '{path}' declares {declared:,} bytes but stores "
                             f"{ds.id.get_storage_size():,}: refusing a likely decompression bomb")

    def group(self, path: str):
        """The group at `path`, or None (every link on the way was audited as a hard link)."""
        node = self.file
        for part in path.strip("/").split("/"):
            if part not in node:
                return None
            node = node[part]
            if not isinstance(node, self.h5py.Group):
                return None
        return node

    def read(self, group, name: str, shape: tuple, what: str, dtype=np.float32) -> np.ndarray:
        """Dataset `name` of `group` as float32 (or as the integer `dtype` a counter such as Normalization's count
        expects), after checking it has the expected `shape`."""
        if group is None or name not in group or not isinstance(group[name], self.h5py.Dataset):
            raise DlcliError(f"{self.source}: no weight array for {what} (expected {group.name if group else '?'}/"
                             f"{name})")
        ds = group[name]
        if tuple(ds.shape) != tuple(shape):
            raise DlcliError(f"{self.source}: {what} has shape {tuple(ds.shape)} in the file but the model expects "
                             f"{tuple(shape)}")
        integer = np.dtype(dtype).kind in "iu"
        if ds.dtype.kind not in ("iu" if integer else "f"):
            raise UnsafeFile(f"{self.source}: {what} holds {ds.dtype} values; weights are "
                             f"{'integers' if integer else 'floating point'}")
        if integer:
            return np.asarray(ds[()], dtype=dtype)
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: refused below
            value = np.asarray(ds[()], dtype=np.float32)
        bad = ~np.isfinite(value)
        if bad.any():
            raise UnsafeFile(f"{self.source}: {what} ({group.name}/{name}) holds {int(bad.sum()):,} non-finite "
                             f"value{'s' if bad.sum() != 1 else ''} (NaN or inf, the first at index "
                             f"{tuple(int(i) for i in np.argwhere(bad)[0])}); a model with them predicts NaN: "
                             f"re-save the model from weights that trained without diverging")
        return value

    def attr(self, node, name: str):
        """A string or list-of-strings attribute (Keras' model_config, layer_names, weight_names), or None."""
        if name not in node.attrs:
            return None
        value = node.attrs[name]
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, np.ndarray):
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1).tolist()]
        return value if isinstance(value, str) else None

    def close(self):
        self.file.close()


def read_file_bytes(path, limit=MEMBER_LIMITS[WEIGHTS]) -> bytes:
    """A weights file's bytes (refusing one over the limit)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise UnsafeFile(f"{path} is {size:,} bytes, over dlcli's limit of {limit:,}")
        return path.read_bytes()
    except FileNotFoundError:
        raise DlcliError(f"{path} does not exist") from None
    except OSError as e:
        raise DlcliError(f"cannot read {path}: {e.strerror or e}") from None
