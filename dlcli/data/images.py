"""MNIST and Fashion-MNIST from the four standard IDX files (gzip or not), found locally or downloaded."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlcli.data.dataset import Dataset, DatasetType, register
from dlcli.data.download import download, mirror_urls
from dlcli.data.idx import parse_idx, read_bytes, sha256
from dlcli.data.paths import cache_dir, candidate_dirs
from dlcli.data.preprocess import to_features
from dlcli.data.split import check_limits
from dlcli.errors import DlcliError
from dlcli.registry import did_you_mean

IMAGES, LABELS = 2051, 2049  # IDX magics: uint8 rank 3, uint8 rank 1
PARTS = {"train_images": ("train-images-idx3-ubyte", IMAGES), "train_labels": ("train-labels-idx1-ubyte", LABELS),
         "test_images": ("t10k-images-idx3-ubyte", IMAGES), "test_labels": ("t10k-labels-idx1-ubyte", LABELS)}


@dataclass(frozen=True)
class IdxSet:
    names: tuple[str, ...]           # directory spellings, the first is the cache's
    mirror_subdir: str               # folder under $DLCLI_DATASET_MIRROR (the ../shared/datasets layout)
    mirrors: tuple[str, ...]         # public base URLs, tried in order
    sha256: dict                     # part -> SHA-256 of the DECOMPRESSED IDX file
    classes: tuple[str, ...]
    counts: tuple[int, int] = (60000, 10000)


MNIST = IdxSet(
    names=("mnist",), mirror_subdir="mnist",
    mirrors=("https://storage.googleapis.com/cvdf-datasets/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    sha256={"train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"},
    classes=tuple(str(d) for d in range(10)))

FASHION_MNIST = IdxSet(
    names=("fashion_mnist", "fashion-mnist"), mirror_subdir="fashion-mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    sha256={"train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"},
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"))


def _find_part(folder: Path, stem: str) -> Path | None:
    # Official names, uncompressed copies, and the dotted spelling some archives use (train-images.idx3-ubyte).
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (folder / name).is_file():
            return folder / name
    return None


def locate(spec: IdxSet, path: str | None) -> tuple[dict, str]:
    """part -> file, and where they came from; downloads into the cache when no location has all four."""
    if path is not None:
        folder = Path(path).expanduser()
        files = {part: _find_part(folder, stem) for part, (stem, _) in PARTS.items()}
        missing = [PARTS[p][0] for p, f in files.items() if f is None]
        if missing:
            raise DlcliError(f"data.path {folder}: missing {', '.join(missing)} (.gz or uncompressed); "
                             f"it must hold the four IDX files of {spec.names[0]}")
        return files, str(folder)
    for label, folder in candidate_dirs(list(spec.names)):
        files = {part: _find_part(folder, stem) for part, (stem, _) in PARTS.items()}
        if all(files.values()):
            return files, f"{folder} ({label})"
    folder = cache_dir() / spec.names[0]
    files = {}
    try:
        for part, (stem, _) in PARTS.items():
            files[part] = _find_part(folder, stem) or download(
                mirror_urls(list(spec.mirrors), spec.mirror_subdir, f"{stem}.gz"), folder / f"{stem}.gz",
                spec.sha256[part])
    except DlcliError as e:
        raise DlcliError(f"{spec.names[0]} is not on this machine ({_data_dir_state(spec)}), and {e.message}") \
            from None
    return files, f"{folder} (downloaded)"


def _data_dir_state(spec: IdxSet) -> str:
    """Why $DLCLI_DATA_DIR did not provide the dataset: the usual reason a download is attempted by mistake."""
    import os

    data_dir = os.environ.get("DLCLI_DATA_DIR")
    if not data_dir:
        return "$DLCLI_DATA_DIR is not set"
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        return f"$DLCLI_DATA_DIR={data_dir}: no such folder"
    folders = [root / n for n in spec.names if (root / n).is_dir()]
    if not folders:
        return f"$DLCLI_DATA_DIR={data_dir} has no {' or '.join(n + '/' for n in spec.names)} folder"
    missing = [stem for stem, _ in PARTS.values() if _find_part(folders[0], stem) is None]
    return f"{folders[0]} lacks {', '.join(missing)} (.gz or uncompressed)"


def load_idx_set(spec: IdxSet, path: str | None, limit: int | None, normalize: bool, verify: bool,
                 inputs: dict[str, str] | None = None, test_limit: int | None = None) -> Dataset:
    check_limits(limit, test_limit)
    files, source = locate(spec, path)
    arrays = {}
    for part, file in files.items():
        data = read_bytes(file)
        if verify and sha256(data) != spec.sha256[part]:
            raise DlcliError(f"{file}: content SHA-256 {sha256(data)} is not the official {spec.names[0]} "
                             f"{PARTS[part][0]} ({spec.sha256[part]}): the file is corrupt or a different "
                             f"dataset; delete it to fetch a fresh copy, or set data.verify: false for your own "
                             f"IDX files")
        arrays[part] = parse_idx(data, str(file), PARTS[part][1])
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DlcliError(f"{files[f'{split}_labels']}: {len(labels)} labels for {len(images)} images in "
                             f"{files[f'{split}_images']}")
        if labels.size and labels.max() >= len(spec.classes):
            raise DlcliError(f"{files[f'{split}_labels']}: label {labels.max()} outside 0..{len(spec.classes) - 1}")

    # cap before the float conversion: a smoke run should not pay for 60,000 images
    n, n_test = check_limits(limit, test_limit)

    def x(images, n):
        # Keras' book recipe: float32 pixels / 255 (the conversion predict gives raw pixels too)
        images = to_features(images[:n], *IdxImages({"normalize": normalize}).conversion())
        return images if inputs is None else image_views(images, inputs)

    return Dataset(x_train=x(arrays["train_images"], n), y_train=arrays["train_labels"][:n].astype(np.int64),
                   x_test=x(arrays["test_images"], n_test),
                   y_test=arrays["test_labels"][:n_test].astype(np.int64),
                   classes=list(spec.classes), source=source, name=spec.names[0])


VIEWS = {  # derived per-image features a multi-input model can read beside (or instead of) the pixels
    "image": lambda im: im,
    "profiles": lambda im: np.concatenate([im.mean(axis=2), im.mean(axis=1)], axis=1),  # 28 row + 28 column means
    "ink": lambda im: im.reshape(len(im), -1).mean(axis=1, keepdims=True),  # mean intensity, (N, 1)
}


def image_views(images: np.ndarray, inputs: dict[str, str]) -> dict:
    """{model input name: view name} -> {model input name: array}, for named inputs of a functional model."""
    unknown = [v for v in inputs.values() if v not in VIEWS]
    if unknown:
        raise DlcliError(f"data.inputs: unknown view '{unknown[0]}'{did_you_mean(unknown[0], VIEWS)}; views: "
                         f"{', '.join(VIEWS)} (image: the pixels; profiles: 28 row + 28 column mean intensities; "
                         f"ink: the mean intensity)")
    return {name: VIEWS[view](images) for name, view in inputs.items()}


class IdxImages(DatasetType):
    """MNIST-style digits and clothes: light ink on black, float32 pixels / 255 (Keras' book recipe)."""

    pictures = dark_background = True

    def conversion(self):
        return "float32", (1 / 255 if self.spec.get("normalize", True) else 1.0)

    def onnx_metadata(self):
        return {"dlcli.pixel_scale": repr(self.conversion()[1])}


@register("mnist", kind=IdxImages)
def load_mnist(path: str | None = None, limit: int | None = None, normalize: bool = True,
               verify: bool = True, inputs: dict[str, str] | None = None, test_limit: int | None = None) -> Dataset:
    """MNIST digits: x (N, 28, 28) float32 in [0, 1] (0..255 when normalize is false), y int64 0-9.
    limit caps train to its first N images, test_limit the 10,000 test images. verify checks the official SHA-256
    of each file.
    inputs maps model input names to views of each image (image, profiles, ink) for multi-input models."""
    return load_idx_set(MNIST, path, limit, normalize, verify, inputs, test_limit)


@register("fashion_mnist", kind=IdxImages)
def load_fashion_mnist(path: str | None = None, limit: int | None = None, normalize: bool = True,
                       verify: bool = True, inputs: dict[str, str] | None = None,
                       test_limit: int | None = None) -> Dataset:
    """Fashion-MNIST (Zalando): as mnist, with the ten clothing class names."""
    return load_idx_set(FASHION_MNIST, path, limit, normalize, verify, inputs, test_limit)
