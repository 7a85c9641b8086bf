import numpy as np
import pytest

from dlcli.data import load_dataset
from dlcli.errors import ConfigError, DlcliError


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    file = tmp_path / "d.npz"
    np.savez(file, x=rng.random((40, 3)), y=np.repeat([0, 1], 20), xt=rng.random((8, 3)), yt=np.arange(8) % 2,
             tokens=rng.integers(0, 50, (40, 6)))
    return file


def test_npz_with_test_arrays(npz):
    d = load_dataset({"type": "npz", "path": str(npz), "x_test": "xt", "y_test": "yt"})
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert (len(d.y_train), d.y_val, len(d.y_test)) == (40, None, 8)


def test_npz_seeded_test_split_and_limit(npz):
    spec = {"type": "npz", "path": str(npz), "test_split": 0.25, "stratify": True}
    a, b = load_dataset(spec), load_dataset(spec)
    assert np.array_equal(a.x_test, b.x_test) and len(a.y_test) == 10 and np.bincount(a.y_test).tolist() == [5, 5]
    assert not np.array_equal(a.x_test, load_dataset({**spec, "seed": 1}).x_test)
    c = load_dataset({**spec, "limit": 4})
    assert len(c.x_train) == 4 and len(c.x_test) == 10  # data.limit caps training only
    assert len(load_dataset({**spec, "limit": 4, "test_limit": 3}).x_test) == 3


def test_npz_keeps_integer_inputs_and_named_inputs(npz):
    d = load_dataset({"type": "npz", "path": str(npz), "x": {"words": "tokens", "extra": "x"}})
    assert d.x_train["words"].dtype.kind == "i" and d.x_train["extra"].dtype == np.float32
    assert load_dataset({"type": "npz", "path": str(npz), "x": "tokens", "rescale": 0.5}).x_train.dtype == np.float32


def test_npz_errors_name_the_file(npz, tmp_path):
    with pytest.raises(DlcliError, match=r"d.npz: no array 'images'; the archive has: tokens, x, xt, y, yt"):
        load_dataset({"type": "npz", "path": str(npz), "x": "images"})
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(DlcliError, match="obj.npz: cannot read"):
        load_dataset({"type": "npz", "path": str(tmp_path / "obj.npz")})
    with pytest.raises(DlcliError, match="file not found"):
        load_dataset({"type": "npz", "path": str(tmp_path / "nope.npz")})
    with pytest.raises(DlcliError, match="'xt'/'y' have 8 samples but 40 targets"):
        load_dataset({"type": "npz", "path": str(npz), "x": "xt"})
    with pytest.raises(ConfigError, match="limit"):
        load_dataset({"type": "npz", "path": str(npz), "limit": 0})


def test_relative_path_falls_back_to_data_dir(npz, monkeypatch):
    monkeypatch.setenv("DLCLI_DATA_DIR", str(npz.parent))
    assert load_dataset({"type": "npz", "path": "d.npz"}).source == str(npz)


def write_csv(path, text):
    path.write_text(text)
    return str(path)


def test_csv_numeric_labels_and_test_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", "a,b,label\n1,2,0\n3,4,1\n5,6,1\n")
    test = write_csv(tmp_path / "test.csv", "b,a,label\n7,8,0\n")
    d = load_dataset({"type": "csv", "path": train, "test_path": test})
    assert d.x_train.tolist() == [[1, 2], [3, 4], [5, 6]] and d.y_train.tolist() == [0, 1, 1]
    assert d.x_test.tolist() == [[7, 8]]  # the test file's own column order is mapped by name
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64


def test_csv_text_labels_regression_and_delimiter(tmp_path):
    f = write_csv(tmp_path / "d.csv", "x;kind\n1;cat\n2;dog\n3;cat\n")
    d = load_dataset({"type": "csv", "path": f, "label": "kind", "delimiter": ";"})
    assert d.classes == ["cat", "dog"] and d.y_train.tolist() == [0, 1, 0]
    r = load_dataset({"type": "csv", "path": write_csv(tmp_path / "r.csv", "x,label\n1,0.5\n2,1.5\n")})
    assert r.y_train.dtype == np.float32


def test_csv_errors_name_file_row_and_column(tmp_path):
    f = write_csv(tmp_path / "d.csv", "a,b,label\n1,2,0\n3,x,1\n")
    with pytest.raises(DlcliError, match=r"d.csv: row 3, column 'b': 'x' is not a number"):
        load_dataset({"type": "csv", "path": f})
    with pytest.raises(DlcliError, match=r"d.csv: no column\(s\) 'target'; it has: a, b, label"):
        load_dataset({"type": "csv", "path": f, "label": "target"})
    g = write_csv(tmp_path / "g.csv", "a,label\n1,0\n2\n")
    with pytest.raises(DlcliError, match=r"g.csv, line 3: 1 fields, the header has 2"):  # the tables' CSV reader
        load_dataset({"type": "csv", "path": g})


@pytest.mark.parametrize("bad,found", [(np.array(3.0), r"is a single value \(shape \(\)\); expected samples along the "
                                                        r"first axis"),
                                       (np.ones((4, 2)) + 1j, r"is complex128; expected real numbers")])
def test_a_0d_or_complex_array_is_refused_naming_the_file(tmp_path, bad, found):
    import warnings

    good_x, good_y = np.ones((4, 2), np.float32), np.arange(4)
    np.save(tmp_path / "bad.npy", bad)
    np.save(tmp_path / "x.npy", good_x)
    np.save(tmp_path / "y.npy", good_y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "imaginary part discarded" must not be the only sign
        with pytest.raises(DlcliError, match=rf"data.x: {tmp_path / 'bad.npy'}: the array {found}"):
            load_dataset({"type": "npy", "x": str(tmp_path / "bad.npy"), "y": str(tmp_path / "y.npy")})
        with pytest.raises(DlcliError, match=rf"data.y: {tmp_path / 'bad.npy'}: the array {found}"):
            load_dataset({"type": "npy", "x": str(tmp_path / "x.npy"), "y": str(tmp_path / "bad.npy")})
        for mmap in (False, True):
            np.savez(tmp_path / "d.npz", x=bad, y=good_y)
            with pytest.raises(DlcliError, match=rf"d\.npz: array 'x': the array {found}"):
                load_dataset({"type": "npz", "path": str(tmp_path / "d.npz"), "mmap": mmap})
        np.savez(tmp_path / "d.npz", x=good_x, y=bad)
        with pytest.raises(DlcliError, match=rf"d\.npz: array 'y': the array {found}"):
            load_dataset({"type": "npz", "path": str(tmp_path / "d.npz")})
