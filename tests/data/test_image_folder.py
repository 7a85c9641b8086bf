"""type: image_folder on real MNIST PNGs (written from ../shared by dlcli's own to-folder code) and on hand-made
edge cases: a grayscale/RGB/palette mix, odd sizes, a truncated file, a non-image file, an empty class folder."""
import json

import numpy as np
import pytest
from PIL import Image

from dlcli.data import load_dataset
from dlcli.data.image_folder import decode_image, write_image_folder
from dlcli.data.source import batch_indices
from dlcli.errors import DlcliError
from tests.conftest import require_dataset


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory):
    """The first 300 MNIST training and 100 test images as PNG class folders, with the arrays they came from."""
    folder = require_dataset("mnist")
    from dlcli.data.images import MNIST, load_idx_set

    ds = load_idx_set(MNIST, str(folder), 300, normalize=False, verify=False)
    root = tmp_path_factory.mktemp("mnist-png")
    write_image_folder(ds.x_train.astype(np.uint8), ds.y_train, ds.classes, root / "train")
    write_image_folder(ds.x_test[:100].astype(np.uint8), ds.y_test[:100], ds.classes, root / "test")
    return root, ds


def _index(files):
    return np.array([int(f.stem) for f in files])  # write_image_folder names a file by its sample index


def test_mnist_pngs_decode_to_the_original_pixels_and_labels(mnist_folder):
    root, ds = mnist_folder
    d = load_dataset({"type": "image_folder", "directory": str(root / "train"), "test_directory": str(root / "test"),
                      "image_size": [28, 28], "color_mode": "grayscale"})
    assert d.classes == [str(i) for i in range(10)] and len(d.x_train) == 300 and len(d.x_test) == 100
    x = d.x_train.take(slice(0, 300))[0]
    assert x.dtype == np.float32 and x.shape == (300, 28, 28, 1) and x.max() == 255  # Keras: 0..255 floats
    order = _index(d.x_train.files)
    np.testing.assert_array_equal(x[..., 0], ds.x_train[order])
    np.testing.assert_array_equal(d.y_train, ds.y_train[order])
    assert d.extra["folder"]["files_per_class"] == {str(c): int((ds.y_train == c).sum()) for c in range(10)}


def test_label_modes_color_modes_and_resizing(mnist_folder):
    root, _ = mnist_folder
    base = {"type": "image_folder", "directory": str(root / "train"), "limit": 20}
    cat = load_dataset({**base, "label_mode": "categorical", "image_size": [14, 10], "color_mode": "rgb"})
    assert cat.y_train.shape == (20, 10) and cat.y_train.dtype == np.float32
    assert cat.x_train.take(np.arange(3))[0].shape == (3, 14, 10, 3)
    assert len(set(cat.y_train.argmax(1).tolist())) > 3  # limit draws from every class, not the first folder
    with pytest.raises(Exception, match="binary needs exactly 2 classes"):
        load_dataset({**base, "label_mode": "binary"})
    with pytest.raises(Exception, match="interpolation must be one of"):
        load_dataset({**base, "interpolation": "gaussian"})


@pytest.fixture
def edge_folder(tmp_path):
    """cats: an RGB JPEG, a grayscale PNG, a palette GIF, an RGBA PNG of odd sizes; dogs: a BMP, a truncated PNG,
    a text file named .png and a notes.txt (ignored: not an image extension); birds: empty."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for c in ("cats", "dogs", "birds"):
        (root / c).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(root / "cats" / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "cats" / "b.png")
    Image.fromarray(rng.integers(0, 256, (9, 31), dtype=np.uint8)).convert("P").save(root / "cats" / "c.gif")
    Image.fromarray(rng.integers(0, 256, (64, 16, 4), dtype=np.uint8)).save(root / "cats" / "d.png")
    (root / "cats" / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(root / "cats" / "sub" / "e.PNG")
    Image.fromarray(rng.integers(0, 256, (11, 13, 3), dtype=np.uint8)).save(root / "dogs" / "a.bmp")
    good = root / "dogs" / "b.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(good)
    (root / "dogs" / "c.png").write_bytes(good.read_bytes()[:200])  # truncated
    (root / "dogs" / "d.png").write_text("not an image")
    (root / "dogs" / "notes.txt").write_text("ignored")
    return root


def test_bad_files_are_errors_naming_the_file(edge_folder):
    spec = {"type": "image_folder", "directory": str(edge_folder), "image_size": [8, 8]}
    with pytest.raises(DlcliError, match=r"birds holds no images"):
        load_dataset(spec)
    (edge_folder / "birds").rmdir()
    d = load_dataset(spec)
    assert d.classes == ["cats", "dogs"] and len(d.x_train) == 5 + 4
    with pytest.raises(DlcliError, match=r"dogs/c\.png: cannot decode .*truncated"):
        d.x_train.take(np.arange(len(d.x_train)))
    with pytest.raises(DlcliError, match=r"dogs/d\.png: not an image"):
        d.x_train.take(np.array([8]))


def test_on_bad_file_skip_counts_them_and_mixed_modes_convert(edge_folder):
    d = load_dataset({"type": "image_folder", "directory": str(edge_folder), "image_size": [8, 6],
                      "color_mode": "rgb", "on_bad_file": "skip", "cache": "memory"})
    skipped = d.extra["folder"]["skipped"]
    assert sorted(r.split("/")[-1].split(" ")[0] for r, _ in skipped) == ["birds", "c.png", "d.png"]
    assert d.classes == ["birds", "cats", "dogs"] and d.y_train.tolist() == [1] * 5 + [2] * 2
    x = d.x_train.take(np.arange(7))[0]
    assert x.shape == (7, 8, 6, 3) and np.isfinite(x).all()
    gray = decode_image(edge_folder / "cats" / "b.png", (8, 6), "rgb")
    assert (gray[..., 0] == gray[..., 1]).all()  # grayscale expanded to RGB, as Keras' decode with channels=3


def test_crop_to_aspect_ratio_takes_the_centre(tmp_path):
    a = np.zeros((10, 30), np.uint8)
    a[:, 10:20] = 255  # a white centre square in a wide black image
    Image.fromarray(a).save(tmp_path / "wide.png")
    cropped = decode_image(tmp_path / "wide.png", (5, 5), "grayscale", "nearest", crop_to_aspect_ratio=True)
    squeezed = decode_image(tmp_path / "wide.png", (5, 5), "grayscale", "nearest")
    assert cropped.min() == 255 and squeezed.min() == 0


def test_caches_return_the_same_batches_and_disk_cache_is_reused(mnist_folder, tmp_path):
    root, _ = mnist_folder
    spec = {"type": "image_folder", "directory": str(root / "train"), "image_size": [28, 28],
            "color_mode": "grayscale", "limit": 64}
    chunks = batch_indices(64, 16, np.random.default_rng(0).permutation(64))
    plain = [b[0] for b in load_dataset(spec).x_train.batches(chunks)]
    for cache in ("memory", "disk"):
        source = load_dataset({**spec, "cache": cache}).x_train
        for _ in range(2):  # the first epoch decodes, the second reads the cache
            with source.batches(chunks) as batches:
                for want, got in zip(plain, batches):
                    np.testing.assert_array_equal(want, got[0])
    again = load_dataset({**spec, "cache": "disk"}).x_train  # a new run with the same files and settings
    assert again.done.all() and again.store.mode == "r"
    np.testing.assert_array_equal(again.take(chunks[0])[0], plain[0])


@pytest.mark.parametrize("change", [{"interpolation": "nearest"}, {"crop_to_aspect_ratio": True}],
                         ids=["interpolation", "crop"])
def test_disk_cache_is_keyed_by_interpolation_and_crop(tmp_path, change):
    """Another interpolation or crop decodes other pixels from the same files: it must not read the first cache."""
    rng = np.random.default_rng(2)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (12, 30), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    spec = {"type": "image_folder", "directory": str(tmp_path / "images"), "image_size": [5, 5],
            "color_mode": "grayscale", "interpolation": "bilinear", "cache": "disk"}
    first = load_dataset(spec).x_train
    first.take(np.arange(6))
    assert first.complete and first.store.mode == "r"  # the cache file is written
    other = load_dataset({**spec, **change}).x_train
    want = [decode_image(f, (5, 5), "grayscale", other.interpolation, other.crop) for f in other.files]
    np.testing.assert_array_equal(other.take(np.arange(6))[0], np.stack(want).astype(np.float32))
    assert not np.array_equal(other.take(np.arange(6))[0], first.take(np.arange(6))[0])
    assert other.cache_file != first.cache_file


def test_train_evaluate_predict_and_banner_from_a_folder(mnist_folder, tmp_path):
    from typer.testing import CliRunner

    from dlcli.cli import app

    root, ds = mnist_folder
    config = tmp_path / "folder.yaml"
    config.write_text(f"""\
name: mnist-folder
seed: 0
data: {{type: image_folder, directory: {root / 'train'}, test_directory: {root / 'test'}, image_size: [28, 28],
        color_mode: grayscale, cache: memory}}
model:
  input_shape: [28, 28, 1]
  layers:
    - {{type: Rescaling, scale: 0.00392156862745098}}
    - {{type: Flatten}}
    - {{type: Dense, units: 32, activation: relu}}
    - {{type: Dense, units: 10, activation: softmax}}
compile: {{optimizer: adam, loss: sparse_categorical_crossentropy, metrics: [accuracy]}}
train: {{epochs: 4, batch_size: 32, validation_split: 0.2}}
""")
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "found 300 files in 10 classes" in result.output and "cache memory" in result.output
    assert "input: decoded 300 images of the training folder at" in result.output  # the decode rate, after training
    (run,) = (tmp_path / "runs").iterdir()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["sizes"] == {"train": 240, "validation": 60,
                                                                              "test": 100}
    assert meta["input"]["decoded"] == 300 and meta["test"]["accuracy"] > 0.3  # chance is 0.1
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0 and "100 samples" in result.output
    out = tmp_path / "pred.csv"
    result = runner.invoke(app, ["predict", str(run), str(root / "test"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 100
    truth = {str(f): f.parent.name for f in (root / "test").rglob("*.png")}
    right = sum(truth[r.split(",")[0]] == r.split(",")[1] for r in rows)
    assert right / 100 == pytest.approx(meta["test"]["accuracy"], abs=1e-9)  # same decoding as training
    result = runner.invoke(app, ["inspect-shapes", str(config)])
    assert result.exit_code == 0 and "Rescaling" in result.output


def test_data_to_folder_command_writes_class_folders(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dlcli.cli import app

    monkeypatch.setenv("DLCLI_DATA_DIR", str(require_dataset("fashion-mnist").parent))
    result = CliRunner().invoke(app, ["data", "to-folder", "fashion_mnist", str(tmp_path / "fm"), "--limit", "30"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "fm" / "train").iterdir())[:3] == ["Ankle boot", "Bag", "Coat"]
    assert (tmp_path / "fm" / "train" / "T-shirt-top").is_dir()  # "/" cannot be in a folder name
    assert sum(1 for _ in (tmp_path / "fm" / "test").rglob("*.png")) == 30
    result = CliRunner().invoke(app, ["data", "to-folder", "imdb", str(tmp_path / "x")])
    assert result.exit_code == 2 and "fashion_mnist or mnist" in result.output


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height grayscale pixels and holds none: Pillow reads the size from the header,
    so it is a decompression bomb to open, at 60 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_a_bad_file(tmp_path):
    root = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dogs" / "bomb.png").write_bytes(png_header(20000, 20000))
    spec = {"type": "image_folder", "directory": str(root), "image_size": [4, 4], "color_mode": "grayscale"}
    x = load_dataset(spec).x_train
    with pytest.raises(DlcliError, match=r"dogs/bomb\.png: refused as a possible decompression bomb"):
        x.take(np.arange(len(x)))
    skipped = load_dataset({**spec, "on_bad_file": "skip"})
    assert len(skipped.x_train) == 4 and [f.split("/")[-1] for f, _ in skipped.extra["folder"]["skipped"]] == \
        ["bomb.png"]


def test_tiff_and_webp_are_images_of_a_folder_as_for_predict(tmp_path):
    from dlcli.data.inputs import _kind

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    for c, suffix in (("a", ".tif"), ("b", ".webp")):
        (tmp_path / c).mkdir()
        Image.fromarray(pixels).save(tmp_path / c / f"x{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
        assert _kind(tmp_path / c / f"x{suffix}") == "image"
    d = load_dataset({"type": "image_folder", "directory": str(tmp_path), "image_size": [5, 7],
                      "color_mode": "grayscale"})
    assert d.classes == ["a", "b"] and len(d.x_train) == 2
    np.testing.assert_array_equal(d.x_train.take(np.arange(2))[0][..., 0], [pixels, pixels])


def test_one_class_warns_naming_it(tmp_path):
    (tmp_path / "train" / "cats").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train" / "cats" / "a.png")
    spec = {"type": "image_folder", "directory": str(tmp_path / "train"), "image_size": [4, 4]}
    with pytest.warns(UserWarning, match=r"all in one class folder, 'cats'"):
        load_dataset(spec)
    (tmp_path / "train" / "dogs").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "train" / "dogs" / "a.png")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(spec)


def to_folder(*args):
    from typer.testing import CliRunner

    from dlcli.cli import app

    return CliRunner().invoke(app, ["data", "to-folder", "mnist", *map(str, args)])


def test_to_folder_refuses_a_folder_that_is_not_empty_unless_overwrite(tmp_path, monkeypatch):
    monkeypatch.setenv("DLCLI_DATA_DIR", str(require_dataset("mnist").parent))
    out = tmp_path / "digits"
    assert to_folder(out, "--limit", "30").exit_code == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    result = to_folder(out, "--limit", "20")  # was: 20 more files padded another way beside the 30
    assert result.exit_code == 2 and "is not empty (test/, train/)" in result.output and "--overwrite" in result.output
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == before
    (out / "notes.md").write_text("mine")
    result = to_folder(out, "--limit", "20", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "train: 20 PNG files" in result.output and sum(1 for _ in (out / "train").rglob("*.png")) == 20
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "test", "train"]  # nothing else touched


def test_to_folder_onto_a_file_is_one_line(tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    for target in (tmp_path / "passwd", tmp_path / "passwd" / "digits"):
        result = to_folder(target)
        assert result.exit_code == 2 and f"{tmp_path / 'passwd'} is a file, not a folder" in result.output
        assert isinstance(result.exception, SystemExit)  # an error message, not a traceback


def test_to_folder_on_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno
    import itertools
    import os

    monkeypatch.setenv("DLCLI_DATA_DIR", str(require_dataset("mnist").parent))
    out = tmp_path / "digits"
    assert to_folder(out, "--limit", "10").exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")}
    calls = itertools.count()

    def full_disk(self, fp, *args, **kwargs):
        if next(calls) >= 25:  # the disk fills up mid-way, as a real one: the file is created, nothing fits
            open(fp, "wb").close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, fp, *args, **kwargs)

    save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", full_disk)
    result = to_folder(out, "--limit", "20", "--overwrite")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "No space left on device" in result.output and "as it was" in result.output
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # no 0-byte PNG
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]  # no staging folder left
    calls = itertools.count()
    result = to_folder(tmp_path / "new", "--limit", "20")
    assert result.exit_code == 1 and not (tmp_path / "new").exists()
