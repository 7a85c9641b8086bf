"""`type: image_folder`: a folder of class sub-folders of images, as Keras' image_dataset_from_directory reads it.

Images are decoded by Pillow (PNG, JPEG, BMP, GIF and TIFF first frame, WebP), converted to `color_mode`, resized to
`image_size` and given as float32 pixels in 0..255 (as Keras; rescale in the model, e.g. a Rescaling layer). 8-bit
PNGs already of `image_size` and `color_mode` take data/png.py's path instead: the same pixels for a fifth of the CPU.
Decoding happens per batch, ahead of the training step in a bounded thread pool; `cache: memory` keeps the
decoded uint8 images after the first epoch, `cache: disk` keeps them in a file under the dataset cache that later
runs with the same files and settings reuse.

Differences from Keras, on purpose: Pillow's resampling filters (antialiased when shrinking, like
tf.image.resize(antialias=True)), and the validation split is dlcli's seeded train.validation_split.
"""
import hashlib
import inspect
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from dlcli.data import png
from dlcli.data.dataset import Dataset, DatasetType, register
from dlcli.data.folders import ClassFiles, check_folder_options, encode_labels, limited, list_class_files
from dlcli.data.paths import cache_dir
from dlcli.data.source import Source, fit_inputs
from dlcli.data.split import check_limits
from dlcli.errors import ConfigError, DlcliError

# The one list of image files, for image folders and for predict: their suffixes and the Pillow formats they name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]
COLOR_MODES = {"grayscale": ("L", 1), "rgb": ("RGB", 3), "rgba": ("RGBA", 4)}
CACHES = ("none", "memory", "disk")
# Keras' interpolation names that Pillow has a filter for ("area" is box averaging).
INTERPOLATIONS = {"bilinear": "BILINEAR", "nearest": "NEAREST", "bicubic": "BICUBIC", "area": "BOX",
                  "lanczos3": "LANCZOS"}


class BadImage(DlcliError):
    pass


def decode_image(file, size: tuple[int, int] | None, color_mode: str, interpolation: str = "bilinear",
                 crop_to_aspect_ratio: bool = False, name: str | None = None) -> np.ndarray:
    """One image file (or file object, `name` naming it in messages) -> uint8 (height, width, channels). Raises
    BadImage naming it, also for an image larger than Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS
    x 2), refused before decoding."""
    from PIL import Image, UnidentifiedImageError

    name = file if name is None else name
    mode, _ = COLOR_MODES[color_mode]
    try:
        with Image.open(file, formats=FORMATS) as im:  # GIF: the first frame, as Keras (expand_animations=False)
            if im.mode in ("I", "I;16", "I;16B", "F") and mode != "L":
                raise BadImage(f"{name}: a {im.mode} (16-bit or float) image cannot be read as color_mode "
                               f"{color_mode}; use color_mode: grayscale or convert it to 8 bits")
            im = im.convert(mode) if im.mode != mode else im
            if size is not None and im.size != (size[1], size[0]):
                box = _center_crop(im.size, size) if crop_to_aspect_ratio else None
                im = im.resize((size[1], size[0]), getattr(Image.Resampling, INTERPOLATIONS[interpolation]), box=box)
            a = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:  # not an OSError: it would escape as a traceback
        raise BadImage(f"{name}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise BadImage(f"{name}: not an image Pillow can read as {', '.join(FORMATS)}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise BadImage(f"{name}: cannot decode ({e}); the file may be truncated or corrupt") from None
    return a[:, :, None] if a.ndim == 2 else a


def _center_crop(have: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The largest centred box of the target aspect ratio (Keras' crop_to_aspect_ratio), as Pillow's (l, t, r, b)."""
    w, h = have
    target = size[1] / size[0]
    cw, ch = (h * target, h) if w / h > target else (w, w / target)
    left, top = (w - cw) / 2, (h - ch) / 2
    return left, top, left + cw, top + ch


class ImageFolderSource(Source):
    """Decodes the images of `files` on demand; `cache` keeps them (uint8) once decoded."""

    # Decoding threads run at niceness 10 (Linux): while the step's lanes want both cores the scheduler gives the
    # decoders ~10% of a core (CFS weight 110 against 1024), and a core a lane leaves idle to them whole. 19 (weight
    # 15) starved them on a busy machine: the training thread then waited for its batches.
    background = 10

    def __init__(self, files: list[Path], image_size, color_mode: str, interpolation: str,
                 crop_to_aspect_ratio: bool, cache: str, workers: int, prefetch: int):
        self.files, self.color_mode, self.interpolation = files, color_mode, interpolation
        self.paths = png.Paths(files)  # as the compiled reader takes them
        self.crop = crop_to_aspect_ratio
        self.size = tuple(image_size)
        self.channels = COLOR_MODES[color_mode][1]
        self.workers, self.ahead = workers, prefetch
        self.cache_mode = cache
        self.complete = False  # every image cached: batches are plain gathers, no pool needed
        self.store = self.done = None
        self.cache_file = None
        self.lock = threading.Lock()
        self.decoded, self.decode_seconds = 0, 0.0  # for the decode rate (worker time, summed over threads)
        if cache == "memory":
            # np.zeros maps untouched pages lazily: memory grows with the images actually decoded
            self.store = np.zeros((len(files), *self.size, self.channels), np.uint8)
            self.done = np.zeros(len(files), bool)
        elif cache == "disk":
            self._open_disk_cache()

    def __len__(self):
        return len(self.files)

    @property
    def prefetch(self):
        # Once cached, a batch is a gather as cheap as an in-memory one: handing it to a thread would cost more.
        return 0 if self.complete else self.ahead

    @property
    def sample_shapes(self):
        return [(*self.size, self.channels)]

    def take(self, index):
        if self.complete:  # one gather straight from the cache, as an in-memory array answers
            return [self.store[index].astype(np.float32)]
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        out = np.empty((len(idx), *self.size, self.channels), np.float32)  # the batch itself: decoded into, no copy
        todo = np.arange(len(idx)) if self.done is None else np.flatnonzero(~self.done[idx])
        if self.done is not None and len(todo) < len(idx):
            have = np.flatnonzero(self.done[idx])
            out[have] = self.store[idx[have]]
        if len(todo):
            start = time.perf_counter()
            decoded = out if len(todo) == len(idx) else np.empty((len(todo), *out.shape[1:]), np.float32)
            left = png.decode(self.paths, idx[todo], self.color_mode, decoded)
            if decoded is not out:
                out[todo] = decoded
            for j in todo[left]:  # not a PNG of the run's size and mode: Pillow decodes it (or names what is wrong)
                out[j] = self.decode(idx[j])
            with self.lock:
                self.decoded += len(todo)
                self.decode_seconds += time.perf_counter() - start
            if self.store is not None:
                self.store[idx[todo]] = out[todo].astype(np.uint8)
                self.done[idx[todo]] = True  # after the pixels: a reader never sees a half-written image
                self._maybe_finish_disk_cache()
                self.complete = bool(self.done.all())
        return [out]

    def decode(self, i: int) -> np.ndarray:
        return decode_image(self.files[i], self.size, self.color_mode, self.interpolation, self.crop)

    def describe(self):
        rate = self.decoded / self.decode_seconds if self.decode_seconds else None
        return {"cache": self.cache_mode, "cache_file": None if self.cache_file is None else str(self.cache_file),
                "decoded": self.decoded, "decode_images_per_second_per_thread": rate, "workers": self.workers}

    # --- cache: disk ---------------------------------------------------------------------------------------
    def _key(self) -> str:
        """Identifies the decoded content: every file's path, size and modification time, and the settings."""
        h = hashlib.sha256(json.dumps([self.size, self.color_mode, self.interpolation, self.crop]).encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:24]

    def _open_disk_cache(self):
        folder = cache_dir().parent / "decoded"
        folder.mkdir(parents=True, exist_ok=True)
        self.cache_file = folder / f"{self._key()}.npy"
        shape = (len(self.files), *self.size, self.channels)
        if self.cache_file.is_file():
            self.store = np.load(self.cache_file, mmap_mode="r")
            if self.store.shape == shape:
                self.done = np.ones(len(self.files), bool)
                self.complete = True
                return
        # written while decoding, renamed to its final name once every image is in: never a partial cache
        self.partial = folder / f".{self.cache_file.stem}.{os.getpid()}.npy"
        self.store = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.uint8, shape=shape)
        self.done = np.zeros(len(self.files), bool)

    def _maybe_finish_disk_cache(self):
        if self.cache_mode != "disk" or not isinstance(self.store, np.memmap) or self.store.mode == "r":
            return
        with self.lock:
            if self.store.mode == "r" or not self.done.all():
                return
            self.store.flush()
            os.replace(self.partial, self.cache_file)
            self.store = np.load(self.cache_file, mmap_mode="r")


def check_images(files: ClassFiles, source: ImageFolderSource) -> ClassFiles:
    """on_bad_file: skip: decode every image once (in the pool; kept when cached) and leave the bad ones out."""
    from concurrent.futures import ThreadPoolExecutor

    def check(i):
        try:
            a = source.decode(i)
        except BadImage as e:
            return i, e.message
        if source.store is not None:
            source.store[i] = a
            source.done[i] = True
        return i, None

    with ThreadPoolExecutor(source.workers) as pool:
        bad = {i: reason for i, reason in pool.map(check, range(len(files.files)), chunksize=64) if reason}
    if source.store is not None and not bad:
        source._maybe_finish_disk_cache()
        source.complete = bool(source.done.all())
    return files.drop(bad) if bad else files


def _folder_source(files: ClassFiles, image_size, color_mode, interpolation, crop, cache, workers, prefetch,
                   on_bad_file) -> tuple[ClassFiles, Source]:
    source = ImageFolderSource(files.files, image_size, color_mode, interpolation, crop, cache, workers, prefetch)
    if on_bad_file == "skip":
        checked = check_images(files, source)
        if checked is not files:
            kept = np.array([str(f) for f in files.files])
            keep = np.isin(kept, [str(f) for f in checked.files])
            source = source.subset(np.flatnonzero(keep))  # the cache keeps its positions
            files = checked
    return files, source


class ImageFolderImages(DatasetType):
    """float32 pixels in 0..255, as Keras' image_dataset_from_directory; predict reads folders (recursively) and
    image files decoded exactly as in training (the run's image_size, color_mode, interpolation, crop), streamed."""

    pictures = True

    def conversion(self):
        return "float32", 1.0

    def read_files(self, paths, run_dir, model):
        if not all(p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES for p in paths):
            return None
        from dlcli.data.folders import prediction_files

        defaults = {k: p.default for k, p in inspect.signature(load_image_folder).parameters.items()}
        settings = {**defaults, **{k: v for k, v in self.spec.items() if k in defaults}}
        files = prediction_files(paths, IMAGE_SUFFIXES)
        workers = settings["workers"] or os.cpu_count() or 1
        source = ImageFolderSource(files, settings["image_size"], settings["color_mode"], settings["interpolation"],
                                   settings["crop_to_aspect_ratio"], "none", workers,
                                   2 * workers if settings["prefetch"] is None else settings["prefetch"])
        return fit_inputs(source, model), [str(f) for f in files]


@register("image_folder", kind=ImageFolderImages)
def load_image_folder(directory: str, test_directory: str | None = None, image_size: list[int] = (256, 256),
                      color_mode: str = "rgb", label_mode: str = "int", class_names: list[str] | None = None,
                      interpolation: str = "bilinear", crop_to_aspect_ratio: bool = False, cache: str = "none",
                      on_bad_file: str = "error", workers: int | None = None, prefetch: int | None = None,
                      limit: int | None = None, test_limit: int | None = None) -> Dataset:
    """Images in class sub-folders (Keras' image_dataset_from_directory names): x float32 (N, height, width,
    channels) in 0..255, y by label_mode. test_directory (same classes) is the test split. cache: none | memory |
    disk. on_bad_file: error (stop naming the file) | skip (decode everything once up front, leave bad files out,
    count them in the banner). workers / prefetch: decoding threads (default: the CPU count) and batches decoded
    ahead (default: 2 per worker)."""
    check_limits(limit, test_limit)
    check_folder_options(label_mode, on_bad_file)
    if color_mode not in COLOR_MODES:
        raise ConfigError(f"data.color_mode must be one of {', '.join(COLOR_MODES)}; got {color_mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
    if cache not in CACHES:
        raise ConfigError(f"data.cache must be one of {', '.join(CACHES)}; got {cache!r}")
    if (not isinstance(image_size, (list, tuple)) or len(image_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
        raise ConfigError(f"data.image_size must be [height, width] in pixels; got {image_size!r}")
    workers = workers or os.cpu_count() or 1
    prefetch = 2 * workers if prefetch is None else prefetch
    args = (image_size, color_mode, interpolation, crop_to_aspect_ratio, cache, workers, prefetch, on_bad_file)
    # limit: a seeded sample of each split's files (every class represented), chosen before any decoding
    train = list_class_files(directory, IMAGE_SUFFIXES, "images", on_bad_file, class_names)
    train, x_train = _folder_source(train.select(limited(len(train.files), limit)), *args)
    test = x_test = y_test = None
    if test_directory is not None:
        test = list_class_files(test_directory, IMAGE_SUFFIXES, "images", on_bad_file, train.class_names,
                                key="data.test_directory")
        test, x_test = _folder_source(test.select(limited(len(test.files), test_limit)), *args)
        y_test = encode_labels(test.labels, len(train.class_names), label_mode)
    skipped = train.skipped + (test.skipped if test else [])
    extra = {"files_per_class": train.per_class(), "skipped": skipped,
             "test_files_per_class": test.per_class() if test else None}
    return Dataset(x_train=x_train, y_train=encode_labels(train.labels, len(train.class_names), label_mode),
                   x_test=x_test, y_test=y_test, classes=train.class_names, source=str(train.directory),
                   extra={"folder": extra}, name="image_folder")


def folder_name(name: str) -> str:
    """A class name as a folder name ("T-shirt/top" -> "T-shirt-top")."""
    return "".join("-" if c in '/\\:*?"<>|' else c for c in str(name)).strip() or "_"


def write_image_folder(images: np.ndarray, labels: np.ndarray, classes: list[str], directory: Path,
                       workers: int | None = None) -> dict[str, int]:
    """uint8 images (N, height, width[, channels]) as PNG files directory/<class>/<index>.png (the layout
    image_folder reads); returns files per class. A file that cannot be written (a full disk) is a DlcliError
    naming it; write_splits leaves nothing behind when that happens."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    directory = Path(directory)
    names = [folder_name(c) for c in classes]
    width = len(str(len(images)))

    def write(i):
        a = images[i]
        path = directory / names[int(labels[i])] / f"{i:0{width}d}.png"
        try:
            Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(path)
        except OSError as e:
            raise DlcliError(f"cannot write {path}: {e.strerror or e}") from None

    try:
        for name in names:
            (directory / name).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DlcliError(f"cannot create {e.filename or directory}: {e.strerror or e}") from None
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(write, range(len(images)), chunksize=256))
    counts = np.bincount(labels.astype(np.int64), minlength=len(classes))
    return {name: int(c) for name, c in zip(names, counts)}


def check_output_folder(directory: Path, overwrite: bool = False) -> None:
    """`dlcli data to-folder` writes into a new or empty folder: files of an earlier call (another --limit names
    its files with other zero-padding) would mix with the new ones. `overwrite` replaces its split folders."""
    for folder in (directory, *directory.parents):
        if folder.exists():
            if not folder.is_dir():
                raise DlcliError(f"{folder} is a file, not a folder; give a new or empty folder", exit_code=2)
            break
    try:
        entries = sorted(p.name + "/" * p.is_dir() for p in directory.iterdir()) if directory.is_dir() else []
    except OSError as e:
        raise DlcliError(f"cannot read the folder {directory}: {e.strerror or e}") from None
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (" ..." if len(entries) > 4 else "")
        raise DlcliError(f"{directory} is not empty ({shown}): the new files would mix with what is there; give a "
                         f"new or empty folder, or --overwrite to replace its train/ and test/", exit_code=2)


def write_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                 directory: Path) -> dict[str, dict[str, int]]:
    """Each split (name -> uint8 images, labels) as directory/<split>/<class>/*.png, all or nothing: written into
    a hidden staging folder inside `directory` and moved into place (replacing a split folder already there) once
    every file is written. A failure (a full disk) removes what was written and leaves `directory` as it was."""
    import shutil
    import tempfile

    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".to-folder-", dir=directory))
    except OSError as e:
        raise DlcliError(f"cannot create a folder in {directory}: {e.strerror or e}") from None
    try:
        counts = {split: write_image_folder(x, y, classes, stage / split) for split, (x, y) in splits.items()}
        for split in splits:
            target = directory / split
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(stage / split, target)
        stage.rmdir()
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(e, DlcliError):
            raise DlcliError(f"{e.message}; the files written so far were removed, {directory} is as it was "
                             f"before") from None
        if isinstance(e, OSError):
            raise DlcliError(f"cannot write into {directory}: {e.strerror or e}; the files written so far were "
                             f"removed") from None
        raise
    return counts
