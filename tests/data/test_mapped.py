"""type: npy and npz with mmap: true: x stays on disk (np.memmap), batches read and converted on demand, with the
same values, splits and limits as the in-memory npz loader."""
import numpy as np
import pytest

from dlcli.config import Config
from dlcli.data import load_dataset
from dlcli.data.mapped import MappedSource
from dlcli.errors import DlcliError


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 6, 5), dtype=np.uint8)
    y = rng.integers(0, 3, 200)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "plain.npz", x=x, y=y, xt=x[:30], yt=y[:30])
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    return tmp_path, x, y


def _all(source):
    return source.take(np.arange(len(source)))[0]


def test_npz_mmap_matches_the_in_memory_loader(arrays):
    tmp, x, y = arrays
    spec = {"type": "npz", "path": str(tmp / "plain.npz"), "rescale": 1 / 255, "test_split": 0.25, "limit": 120}
    loaded, mapped = load_dataset(spec), load_dataset({**spec, "mmap": True})
    assert isinstance(mapped.x_train.base, MappedSource)
    assert isinstance(mapped.x_train.base.array, np.memmap)
    np.testing.assert_array_equal(_all(mapped.x_train), loaded.x_train)
    np.testing.assert_array_equal(_all(mapped.x_test), loaded.x_test)
    np.testing.assert_array_equal(mapped.y_train, loaded.y_train)
    with_test = load_dataset({"type": "npz", "path": str(tmp / "plain.npz"), "x_test": "xt", "y_test": "yt",
                              "mmap": True})
    np.testing.assert_array_equal(_all(with_test.x_test), x[:30])  # uint8 stays uint8 without rescale


def test_fortran_ordered_arrays_map_to_their_values(tmp_path):
    """np.save keeps a Fortran-ordered array's memory layout (fortran_order in the header): mapped, it must be read
    in that order, not as C order over the same bytes."""
    rng = np.random.default_rng(1)
    x = np.asfortranarray(rng.integers(0, 256, (40, 6, 5), dtype=np.uint8))
    y = rng.integers(0, 3, 40)
    np.savez(tmp_path / "f.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    for spec in ({"type": "npz", "path": str(tmp_path / "f.npz"), "mmap": True},
                 {"type": "npy", "x": str(tmp_path / "x.npy"), "y": str(tmp_path / "y.npy")}):
        d = load_dataset(spec)
        np.testing.assert_array_equal(_all(d.x_train), x, err_msg=spec["type"])
        np.testing.assert_array_equal(d.x_train.take(np.array([9, 3]))[0], x[[9, 3]], err_msg=spec["type"])


def test_npy_files_unsorted_index_and_errors(arrays):
    tmp, x, y = arrays
    d = load_dataset({"type": "npy", "x": str(tmp / "x.npy"), "y": str(tmp / "y.npy"), "dtype": "float32"})
    assert isinstance(d.x_train.array, np.memmap) and d.y_train.dtype == np.int64
    np.testing.assert_array_equal(d.x_train.take(np.array([7, 2, 150]))[0], x[[7, 2, 150]].astype(np.float32))
    with pytest.raises(DlcliError, match="compressed .* cannot be memory-mapped"):
        load_dataset({"type": "npz", "path": str(tmp / "packed.npz"), "mmap": True})
    np.save(tmp / "short.npy", y[:5])
    with pytest.raises(DlcliError, match="200 samples but data.y has 5"):
        load_dataset({"type": "npy", "x": str(tmp / "x.npy"), "y": str(tmp / "short.npy")})


def test_training_from_a_mapped_array_with_a_validation_split(arrays, tmp_path):
    from dlcli.builder import build_model
    from dlcli.data.dataset import load_fitted
    from dlcli.run_files import RunDir
    from dlcli.trainer import Run

    tmp, x, y = arrays
    config = Config.model_validate({"name": "mapped", "seed": 0,
              "data": {"type": "npy", "x": str(tmp / "x.npy"), "y": str(tmp / "y.npy"), "rescale": 1 / 255},
              "model": {"input_shape": [6, 5, 1], "layers": [{"type": "Flatten"},
                                                            {"type": "Dense", "units": 3, "activation": "softmax"}]},
              "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
              "train": {"epochs": 2, "batch_size": 16, "validation_split": 0.2}})  # defaults filled
    model = build_model(config)
    data = load_fitted(config, model)
    assert data.sizes() == {"train": 160, "validation": 40, "test": 0}
    assert data.x_train.take(np.arange(3))[0].shape == (3, 6, 5, 1)  # (6, 5) samples fed as (6, 5, 1)
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    result = Run.in_dir(RunDir(run), config, model, data, verbose=0).train()
    assert result.status == "completed" and [row["epoch"] for row in result.history if "val_loss" in row] == [1, 2]
