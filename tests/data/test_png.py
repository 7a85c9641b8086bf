"""The image folder's PNG fast path (dlcli/data/png.py, kernels/png.py) against Pillow, its reference: PNGs written
here with every row filter, colour type and odd sizes decode bit for bit as Pillow decodes them; every other file
(another size or mode, palette, 16 bits, interlaced, corrupt) is left to Pillow, which decodes it or names it. The
compiled inflate against zlib's: every block type and strategy, and damaged streams refused or inflated as zlib does."""
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from dlcli import kernels
from dlcli.data import png
from dlcli.data.image_folder import BadImage, ImageFolderSource, decode_image

MODES = {"grayscale": (0, 1), "rgb": (2, 3), "rgba": (6, 4)}
SIGNATURE = b"\x89PNG\r\n\x1a\n"  # every PNG file's first eight bytes


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png(path, pixels: np.ndarray, filters, color_type: int, depth=8, interlace=0, extra=b""):
    """uint8 pixels (h, w, channels) as a PNG whose row r is filtered with filters[r % len(filters)] (the
    specification's encoder side, so the decoder meets each filter on real data)."""
    h, w, ch = pixels.shape
    rows = pixels.reshape(h, w * ch).astype(np.int32)
    out = []
    for r in range(h):
        kind = filters[r % len(filters)]
        x = rows[r]
        a = np.concatenate([np.zeros(ch, np.int32), x[:-ch]])
        b = rows[r - 1] if r else np.zeros_like(x)
        c = np.concatenate([np.zeros(ch, np.int32), b[:-ch]])
        pred = [0 * x, a, b, (a + b) // 2, _paeth(a, b, c)][min(kind, 4)]
        out.append(bytes([kind]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, interlace)
    data = zlib.compress(b"".join(out))
    path.write_bytes(SIGNATURE + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", data[:7])
                     + _chunk(b"IDAT", data[7:]) + _chunk(b"IEND", b""))  # IDAT split: the chunks are joined
    return path


def decode(files, size, mode, dtype=np.uint8):
    """png.decode into a new array: (pixels, positions left to Pillow)."""
    pixels = np.zeros((len(files), *size, MODES[mode][1]), dtype)
    return pixels, png.decode(png.Paths(files), np.arange(len(files)), mode, pixels)


@pytest.mark.parametrize("mode", MODES)
def test_every_row_filter_decodes_as_pillow_does(tmp_path, mode):
    color_type, channels = MODES[mode]
    rng = np.random.default_rng(0)
    files = []
    for i, filters in enumerate([[0], [1], [2], [3], [4], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0, 4]]):
        for high in (256, 3):  # values 0-2: Paeth's ties (its order a, b, c decides), sums wrapping past 255
            pixels = rng.integers(0, high, (7, 5, channels), dtype=np.uint8)
            pixels[:3] = pixels[0]  # flat and noisy rows: predictors near and far from the pixel
            files.append(write_png(tmp_path / f"{i}-{high}.png", pixels, filters, color_type))
    files.append(tmp_path / "pillow.png")  # and one Pillow wrote, with its own choice of filters
    Image.fromarray(rng.integers(0, 256, (7, 5, channels), dtype=np.uint8).squeeze()).save(files[-1])
    pixels, left = decode(files, (7, 5), mode)
    assert left == []
    np.testing.assert_array_equal(pixels, np.stack([decode_image(f, (7, 5), mode) for f in files]))
    floats, _ = decode(files, (7, 5), mode, np.float32)  # the batch's own type, decoded into directly
    np.testing.assert_array_equal(floats, pixels)


def test_other_files_are_left_to_pillow(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (6, 4, 1), dtype=np.uint8)
    files = [write_png(tmp_path / "fast.png", gray, [4], 0),
             write_png(tmp_path / "other_size.png", rng.integers(0, 256, (8, 4, 1), dtype=np.uint8), [1], 0),
             write_png(tmp_path / "rgb_as_gray.png", rng.integers(0, 256, (6, 4, 3), dtype=np.uint8), [2], 2),
             write_png(tmp_path / "interlaced.png", gray, [0], 0, interlace=1),
             write_png(tmp_path / "bad_filter.png", gray, [7], 0),
             write_png(tmp_path / "animated.png", gray, [0], 0, extra=_chunk(b"acTL", bytes(8)))]
    Image.fromarray(gray[:, :, 0]).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(gray[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    (tmp_path / "truncated.png").write_bytes(files[0].read_bytes()[:-20])
    Image.fromarray(gray[:, :, 0]).save(tmp_path / "jpeg.png", format="JPEG")
    (tmp_path / "folder.png").mkdir()  # opens, but cannot be read
    files += [tmp_path / n for n in ("palette.png", "sixteen.png", "truncated.png", "jpeg.png", "folder.png",
                                     "missing.png")]
    pixels, left = decode(files, (6, 4), "grayscale")
    assert left == list(range(1, len(files)))
    np.testing.assert_array_equal(pixels[0], gray)


def test_the_folder_source_gives_pillows_pixels_on_both_kernel_paths(tmp_path, monkeypatch):
    """Fast files and Pillow's side by side in one batch; a corrupt one is Pillow's error naming it."""
    rng = np.random.default_rng(2)
    files = [write_png(tmp_path / f"{i}.png", rng.integers(0, 256, (6, 4, 3), dtype=np.uint8), [i % 5], 2)
             for i in range(6)]
    files.insert(2, write_png(tmp_path / "big.png", rng.integers(0, 256, (12, 8, 3), dtype=np.uint8), [3], 2))
    results = {}
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        source = ImageFolderSource(files, (6, 4), "rgb", "bilinear", False, "none", 1, 0)
        results[path] = source.take(np.arange(len(files)))[0]
        assert source.decoded == len(files)
    np.testing.assert_array_equal(results["numba"], results["numpy"])
    np.testing.assert_array_equal(results["numba"][0], np.asarray(Image.open(files[0])))
    bad = write_png(tmp_path / "bad.png", np.zeros((6, 4, 3), np.uint8), [9], 2)
    monkeypatch.setenv("DLCLI_KERNELS", "numba")
    source = ImageFolderSource(files + [bad], (6, 4), "rgb", "bilinear", False, "none", 1, 0)
    with pytest.raises(BadImage, match="bad.png: cannot decode"):
        source.take(np.arange(len(files) + 1))


def _streams(rng):
    """zlib streams of PNG-like rows (flat runs, repeats, noise) by every strategy and block type DEFLATE has."""
    rows = np.repeat(rng.integers(0, 256, (40, 1), dtype=np.uint8), 61, axis=1)
    rows[::3] = rng.integers(0, 256, rows[::3].shape, dtype=np.uint8)
    rows[5:9, 10:30] = rows[1:5, 10:30]
    data = rows.tobytes()
    for level, strategy in [(0, zlib.Z_DEFAULT_STRATEGY), (1, zlib.Z_DEFAULT_STRATEGY), (6, zlib.Z_DEFAULT_STRATEGY),
                            (9, zlib.Z_FILTERED), (6, zlib.Z_HUFFMAN_ONLY), (6, zlib.Z_RLE), (6, zlib.Z_FIXED)]:
        packer = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
        yield data, packer.compress(data[:1000]) + packer.flush(zlib.Z_FULL_FLUSH) + packer.compress(data[1000:]) \
            + packer.flush()  # a flush ends a block mid-stream: several blocks, byte-aligned ones among them
    yield bytes(100_000), zlib.compress(bytes(100_000))  # runs of 258 at distance 1
    yield data * 3, zlib.compress(data * 3, 0)  # stored blocks only
    yield b"", zlib.compress(b"")


def test_inflate_gives_zlibs_bytes_on_every_kind_of_stream():
    compiled = kernels.compiled("png")
    for data, stream in _streams(np.random.default_rng(3)):
        out = np.zeros(len(data), np.uint8)
        assert compiled.inflate(np.frombuffer(stream, np.uint8), out)
        assert out.tobytes() == data
        for size in {max(len(data) - 1, 0), len(data) + 1} - {len(data)}:  # the rows' length: any other is refused
            assert not compiled.inflate(np.frombuffer(stream, np.uint8), np.zeros(size, np.uint8))


def test_damaged_streams_are_refused_or_inflated_as_zlib_does():
    """Flipped bits, cut ends and junk: whatever the compiled inflate accepts, zlib inflates to the same bytes (and
    the Adler-32 catches what would decode to other bytes); nothing reads or writes out of bounds."""
    compiled = kernels.compiled("png")
    rng = np.random.default_rng(4)
    accepted = 0
    for data, stream in _streams(rng):
        for trial in range(150):
            damaged = bytearray(stream)
            if trial % 3 == 0:
                damaged = damaged[:rng.integers(0, len(damaged))]
            for _ in range(rng.integers(1, 4)):
                if damaged:
                    damaged[rng.integers(0, len(damaged))] ^= 1 << rng.integers(0, 8)
            out = np.zeros(len(data), np.uint8)
            if compiled.inflate(np.frombuffer(bytes(damaged), np.uint8), out):
                accepted += 1
                assert zlib.decompress(bytes(damaged)) == out.tobytes()
    junk = rng.integers(0, 256, 5000, dtype=np.uint8)
    for start in range(0, 4000, 7):
        out = np.zeros(300, np.uint8)
        if compiled.inflate(junk[start:start + 200], out):
            assert zlib.decompress(junk[start:start + 200].tobytes()) == out.tobytes()
    assert accepted < 50  # a damaged stream passes only where the damage changes nothing (a flag bit zlib ignores)


def test_a_file_larger_than_one_read_decodes_as_pillow_does(tmp_path):
    """Noise does not compress: a 200x160 RGB PNG is ~96 KiB, read in more than one system call and inflated from
    several DEFLATE blocks."""
    pixels = np.random.default_rng(5).integers(0, 256, (200, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    assert (tmp_path / "noise.png").stat().st_size > 1 << 16
    decoded, left = decode([tmp_path / "noise.png"], (200, 160), "rgb")
    assert left == []
    np.testing.assert_array_equal(decoded[0], pixels)


@pytest.mark.slow
def test_the_decoder_never_indexes_out_of_bounds(tmp_path):
    """Compiled code does not check indices, and these files come from users: the damaged-stream and foreign-file
    tests run again with NUMBA_BOUNDSCHECK=1 (a fresh cache, so the kernels compile with the checks), where any read
    or write past an array's end raises IndexError and fails them instead of going unseen. ~20 s of CPU."""
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "damaged or other_files"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("spare", [True, False])
def test_the_decoder_gives_the_same_pixels_whether_it_gives_way_or_not(tmp_path, monkeypatch, spare):
    """With a core to spare the kernel yields after each file (so a polling lane gets its core); the pixels are the
    same."""
    from dlcli.engine import lanes

    monkeypatch.setattr(lanes, "spare_core", lambda: spare)
    rng = np.random.default_rng(6)
    files = [write_png(tmp_path / f"{i}.png", rng.integers(0, 256, (5, 3, 1), dtype=np.uint8), [i % 5], 0)
             for i in range(5)]
    pixels, left = decode(files, (5, 3), "grayscale")
    assert left == []
    np.testing.assert_array_equal(pixels, np.stack([decode_image(f, (5, 3), "grayscale") for f in files]))


def test_a_file_that_fills_the_read_buffer_exactly_decodes_as_pillow_does(tmp_path):
    """The kernel reads into 4 KiB, doubled while a read fills it: a file of exactly 4,096 bytes (an ancillary chunk
    pads it) takes a second read that finds its end."""
    pixels = np.random.default_rng(7).integers(0, 256, (6, 4, 1), dtype=np.uint8)
    size = write_png(tmp_path / "plain.png", pixels, [1], 0).stat().st_size
    padded = write_png(tmp_path / "padded.png", pixels, [1], 0, extra=_chunk(b"tEXt", bytes(4096 - size - 12)))
    assert padded.stat().st_size == 4096
    decoded, left = decode([padded], (6, 4), "grayscale")
    assert left == []
    np.testing.assert_array_equal(decoded[0], pixels)
