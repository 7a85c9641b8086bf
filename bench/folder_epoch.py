"""Input pipeline bench (issue 14): one epoch of the book's MLP and convnet trained from a folder of the 60,000
MNIST training PNGs against the same pixels in memory, decode throughput, and where a first epoch's time goes.

    DLCLI_DATA_DIR=../shared/datasets python bench/folder_epoch.py [--rounds 3] [--convnet-rounds 1] [--png-dir DIR]

The PNGs are written once (dlcli data to-folder's code) into --png-dir (default: $TMPDIR/dlcli-bench-mnist-png).
Both sides train the same model (Rescaling(1/255) first, so the in-memory arrays hold the same 0..255 pixels the
folder decodes) with the same batches. Rounds alternate between the sides; the best of each counts.
- "folder, no cache": a fresh image_folder source each epoch, every PNG decoded (file listing timed apart);
- "folder, cache memory": the second epoch of a source with cache: memory (the first decoded and kept the images).
Bar: no cache <= 1.2x the in-memory epoch, cache memory <= 1.05x.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from common import mnist_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def ensure_pngs(folder: Path) -> Path:
    from dlcli.data.images import MNIST
    from dlcli.data import load_dataset
    from dlcli.data.image_folder import write_image_folder

    done = folder / "complete"
    if not done.exists():
        ds = load_dataset({"type": "mnist", "normalize": False})
        start = time.perf_counter()
        write_image_folder(ds.x_train.astype(np.uint8), ds.y_train, list(MNIST.classes), folder / "train")
        print(f"wrote 60,000 PNGs to {folder / 'train'} in {time.perf_counter() - start:.1f} s")
        done.write_text("ok")
    return folder / "train"


def model_for(config_name: str):
    from dlcli.builder import build_model
    from dlcli.config import load_config

    cfg = load_config(ROOT / "configs" / config_name).to_dict()
    cfg["model"]["input_shape"] = [28, 28, 1]
    cfg["model"]["layers"] = [{"type": "Rescaling", "scale": 1 / 255}] + cfg["model"]["layers"]
    return build_model(cfg), int(cfg["train"]["batch_size"])


SPENT = {}  # the last epoch's split: training thread CPU, data threads' CPU, process CPU, the training thread's waits


def epoch(model, x, y, batch_size, seed):
    from dlcli.data import Dataset, source
    from dlcli.trainer import Run

    waited, data = [0.0], []
    take, work = source.Batches.__next__, source.Batches._work

    def next_batch(batches):  # the seconds the training thread waits for its next batch (decoding falls behind)
        start = time.perf_counter()
        try:
            return take(batches)
        finally:
            waited[0] += time.perf_counter() - start

    def timed_work(batches, *args):  # each data thread's CPU (decoding, or the in-memory gather), read as it ends
        start = time.thread_time()
        try:
            return work(batches, *args)
        finally:
            data.append(time.thread_time() - start)
    source.Batches.__next__, source.Batches._work = next_batch, timed_work
    try:
        start, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
        Run(model, verbose=0, rng=np.random.default_rng(seed)).fit(Dataset(x, [y]), epochs=1, batch_size=batch_size)
        SPENT.update(thread=time.thread_time() - thread, process=time.process_time() - process, waited=waited[0],
                     data=sum(data))
        return time.perf_counter() - start
    finally:
        source.Batches.__next__, source.Batches._work = take, work


def folder_source(directory: Path, cache: str):
    from dlcli.data import load_dataset

    start = time.perf_counter()
    d = load_dataset({"type": "image_folder", "directory": str(directory), "image_size": [28, 28],
                      "color_mode": "grayscale", "cache": cache})
    return d.x_train, d.y_train, time.perf_counter() - start


def decode_report(directory: Path, count: int = 3000):
    """Images per second: one thread end to end through Pillow, then split into read / PNG decode / array; the PNG
    fast path that image folders use; then the pool."""
    import io

    from PIL import Image

    from dlcli.data.image_folder import decode_image
    from dlcli.data.source import batch_indices

    files = sorted(directory.rglob("*.png"))[::20][:count]
    for f in files:  # into the page cache: both timings below read warm files
        f.read_bytes()
    start = time.perf_counter()
    for f in files:
        decode_image(f, (28, 28), "grayscale")
    one = time.perf_counter() - start
    t_read = t_decode = t_array = 0.0
    for f in files:
        a = time.perf_counter()
        blob = f.read_bytes()
        b = time.perf_counter()
        im = Image.open(io.BytesIO(blob), formats=["PNG"])
        im.load()
        c = time.perf_counter()
        np.asarray(im, dtype=np.uint8)
        t_read, t_decode, t_array = t_read + b - a, t_decode + c - b, t_array + time.perf_counter() - c
    from dlcli.data import png
    from dlcli.data.image_folder import ImageFolderSource

    paths, batch = png.Paths(files), np.empty((128, 28, 28, 1), np.float32)
    png.decode(paths, np.arange(8), "grayscale", batch[:8])  # the compiled kernel loaded (or compiled) first
    start = time.perf_counter()
    for i in range(0, len(files), 128):
        index = np.arange(i, min(i + 128, len(files)))
        png.decode(paths, index, "grayscale", batch[:len(index)])
    fast = time.perf_counter() - start

    source = ImageFolderSource(files, (28, 28), "grayscale", "bilinear", False, "none", os.cpu_count() or 1,
                               2 * (os.cpu_count() or 1))
    start = time.perf_counter()
    for _ in source.batches(batch_indices(len(files), 128)):
        pass
    pool = time.perf_counter() - start
    n = len(files)
    print(f"decode, 1 thread: {n / one:,.0f} images/s ({one / n * 1e6:.0f} us/image: read {t_read / n * 1e6:.0f}, "
          f"PNG decode {t_decode / n * 1e6:.0f}, to array {t_array / n * 1e6:.0f}, the rest: opening by path, "
          f"Pillow's format probe, dlcli's mode/size checks) {max(one - t_read - t_decode - t_array, 0) / n * 1e6:.0f})")
    print(f"decode, 1 thread, the PNG fast path (data/png.py, batches of 128, reading the files included): "
          f"{n / fast:,.0f} images/s ({fast / n * 1e6:.1f} us/image)")
    print(f"decode, pool of {source.workers} threads: {n / pool:,.0f} images/s")


def compare(name, config_name, directory, x_mem, y_mem, rounds):
    model, batch_size = model_for(config_name)
    epoch(model, x_mem[:2048], y_mem[:2048], batch_size, 0)  # warm-up
    best = {"in memory": float("inf"), "folder, no cache": float("inf"), "folder, cache memory": float("inf")}
    listing = float("inf")
    split = {}  # side -> SPENT of its best epoch
    for r in range(rounds):
        for side, source in (("in memory", lambda: (x_mem, y_mem, 0.0)), ("folder, no cache",
                                                                          lambda: folder_source(directory, "none"))):
            x, y, seconds = source()
            listing = min(listing, seconds) if seconds else listing
            sec = epoch(model, x, y, batch_size, r)
            if sec < best[side]:
                best[side], split[side] = sec, dict(SPENT)
        x, y, _ = folder_source(directory, "memory")
        first = epoch(model, x, y, batch_size, r)
        best["folder, cache memory"] = min(best["folder, cache memory"], epoch(model, x, y, batch_size, r + 100))
        print(f"  {name} round {r + 1}: cache memory first epoch {first:.2f} s", flush=True)
    base = best["in memory"]
    for side, sec in best.items():
        print(f"{name:8s} {side:22s} {sec:7.2f} s/epoch  ({sec / base:.2f}x in memory)")
    for side, s in split.items():  # more waiting: decoding falls behind; a slower step: it shares the cores
        print(f"{name:8s} {side:22s} training thread {s['thread']:.2f} s CPU, data threads {s['data']:.2f}, the "
              f"rest (lanes) {s['process'] - s['thread'] - s['data']:.2f}, process {s['process']:.2f}; waited for "
              f"batches {s['waited']:.2f} s")
    print(f"{name:8s} listing 60,000 files (os.walk, before the first epoch): {listing:.2f} s")


class TorchFolder:
    """PyTorch's ImageFolder on MNIST PNGs as a map-style dataset: its default loader (PIL open, convert) and
    ToTensor's scaling per file (torchvision itself is not a bench dependency; this is what it runs per file)."""

    def __init__(self, directory: Path):
        self.files = sorted(Path(directory).rglob("*.png"))
        self.classes = sorted({f.parent.name for f in self.files})

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        with open(self.files[i], "rb") as f:
            image = Image.open(f).convert("L")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div_(255)
        return pixels[None], self.classes.index(self.files[i].parent.name)


def torch_folder_images_per_second(torch, directory: Path, batch_size: int, rounds: int) -> float:
    """Images/s of DataLoader(num_workers=2, shuffle=True) over the folder, best of `rounds` epochs after a
    warm-up one (persistent workers: their start-up is not counted; forkserver, as JAX's threads may be running)."""
    loader = torch.utils.data.DataLoader(TorchFolder(directory), batch_size=batch_size, shuffle=True, num_workers=2,
                                         persistent_workers=True, multiprocessing_context="forkserver")
    best = float("inf")
    for _ in range(rounds + 1):
        start = time.perf_counter()
        for _ in loader:
            pass
        best = min(best, time.perf_counter() - start)
    return len(loader.dataset) / best


def report_row(count: int, rounds: int) -> str:
    """bench/report.py's data row: the book convnet trained one epoch from a folder of `count` MNIST PNGs (no
    cache: every PNG decoded) against the same pixels in memory, rounds alternating; and images/s read through
    dlcli's folder source (its decoding pool, batch 64) against PyTorch's ImageFolder pipeline on the same files."""
    from dlcli.data import load_dataset
    from dlcli.data.images import MNIST
    from dlcli.data.image_folder import write_image_folder
    from dlcli.data.source import batch_indices

    raw = load_dataset({"type": "mnist", "normalize": False, "limit": count})
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "train"
        write_image_folder(raw.x_train.astype(np.uint8), raw.y_train, list(MNIST.classes), directory)
        files = load_dataset({"type": "image_folder", "directory": str(directory), "image_size": [28, 28],
                              "color_mode": "grayscale"}).x_train.files
        order = np.array([int(f.stem) for f in files])
        x = np.ascontiguousarray(raw.x_train.reshape(-1, 28, 28, 1).astype(np.float32)[order])
        y = raw.y_train.astype(np.int64)[order]
        model, batch_size = model_for("mnist_cnn.yaml")
        epoch(model, x[:256], y[:256], batch_size, 0)  # warm-up
        memory = folder = reading = float("inf")
        for r in range(rounds):
            memory = min(memory, epoch(model, x, y, batch_size, r))
            xf, yf, _ = folder_source(directory, "none")
            folder = min(folder, epoch(model, xf, yf, batch_size, r))
            xf, _, _ = folder_source(directory, "none")
            start = time.perf_counter()
            for _ in xf.batches(batch_indices(len(xf), batch_size, np.random.default_rng(r).permutation(len(xf)))):
                pass
            reading = min(reading, time.perf_counter() - start)
        torch = common.torch_or_none()
        peer = torch_folder_images_per_second(torch, directory, batch_size, rounds) if torch else None
    ours = count / reading
    versus = f"{peer:,.0f} images/s | - | {ours / peer:.2f}x images/s (higher is better)" if peer else "- | - | -"
    return (f"| image folder epoch, book convnet, no cache ({count:,} PNGs) | {folder:.3g} s/epoch, {folder / memory:.2f}x "
            f"its in-memory {memory:.3g} s; reads {ours:,.0f} images/s | {versus} | - | - | - | "
            f"<= 1.1x in-memory; images/s >= PyTorch DataLoader(num_workers=2) |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--convnet-rounds", type=int, default=1)
    parser.add_argument("--png-dir", type=Path, default=Path(tempfile.gettempdir()) / "dlcli-bench-mnist-png")
    parser.add_argument("--skip-convnet", action="store_true")
    args = parser.parse_args()
    x, y = mnist_train((28, 28, 1))
    x = x * np.float32(255)  # the folder decodes 0..255 pixels; both sides share the Rescaling layer
    directory = ensure_pngs(args.png_dir)
    # the same sample order on both sides: the folder lists files class by class
    from dlcli.data import load_dataset

    d = load_dataset({"type": "image_folder", "directory": str(directory), "image_size": [28, 28],
                      "color_mode": "grayscale"})
    order = np.array([int(f.stem) for f in d.x_train.files])
    x, y = np.ascontiguousarray(x[order]), y[order]
    decode_report(directory)
    compare("MLP", "mnist.yaml", directory, x, y, args.rounds)
    if not args.skip_convnet:
        compare("convnet", "mnist_cnn.yaml", directory, x, y, args.convnet_rounds)


if __name__ == "__main__":
    main()
