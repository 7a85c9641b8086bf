"""Arrays larger than memory: .npy files and uncompressed .npz members opened memory-mapped (numpy's
mmap_mode="r"), read batch by batch. Only the pages of the samples a batch needs are read; the operating system
drops them again under memory pressure, so a 10 GB array trains in much less RAM."""
import zipfile
from pathlib import Path

import numpy as np

from dlcli.data.preprocess import to_features
from dlcli.data.source import Source
from dlcli.errors import DlcliError


def map_npy(file: Path) -> np.memmap:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DlcliError(f"{file}: cannot open as a .npy array ({e})") from None


def map_npz_member(file: Path, key: str) -> np.memmap:
    """A member of an .npz archive, memory-mapped in place. np.load ignores mmap_mode for .npz, but a member saved
    uncompressed (np.savez) is a plain .npy file at a known offset inside the zip."""
    try:
        with zipfile.ZipFile(file) as archive:
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            if key not in names:
                raise DlcliError(f"{file}: no array '{key}'; the archive has: {', '.join(sorted(names))}")
            info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise DlcliError(f"{file}: array '{key}' is compressed (np.savez_compressed), so it cannot be "
                             f"memory-mapped; save it with np.savez or as a .npy file, or set data.mmap: false to "
                             f"load it into memory")
        with open(file, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # the zip local file header: name and extra-field lengths at bytes 26..29
            f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                   + int.from_bytes(local[28:30], "little"))
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if dtype.hasobject:
            raise DlcliError(f"{file}: array '{key}' holds Python objects; only plain numeric arrays can be mapped")
        return np.memmap(file, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DlcliError(f"{file}: cannot memory-map array '{key}' ({e})") from None


class MappedSource(Source):
    """A memory-mapped array; each batch is read (in file order) and converted to `dtype`, times `rescale`."""

    prefetch, workers = 2, 1  # one reader thread keeps two batches ahead: page reads overlap the step

    def __init__(self, array: np.ndarray, dtype, rescale: float = 1.0):
        self.array, self.dtype, self.rescale = array, np.dtype(dtype), rescale

    def __len__(self):
        return len(self.array)

    @property
    def sample_shapes(self):
        return [self.array.shape[1:]]

    def take(self, index):
        if isinstance(index, slice):
            rows = np.asarray(self.array[index])
        else:
            index = np.asarray(index)
            order = np.argsort(index, kind="stable")
            rows = np.empty((len(index), *self.array.shape[1:]), self.array.dtype)
            rows[order] = self.array[index[order]]  # ascending offsets: sequential reads
        return [to_features(rows, self.dtype.name, self.rescale)]  # as a whole array in memory is converted

    def describe(self):
        return {"memory_mapped": str(getattr(self.array, "filename", "")), "bytes": int(self.array.nbytes)}
