import numpy as np
import pytest

from dlcli.data import load_dataset
from dlcli.errors import ConfigError, DlcliError

from tests.conftest import require_dataset


def series_csv(tmp_path, n=100, gaps=()):
    t = np.arange(n, dtype=float)
    rows = ["date,temp,wind"] + [f"{20000101 + i},{'' if i in gaps else t[i]},{t[i] * 10}" for i in range(n)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "s.csv")


def load(path, **kw):
    return load_dataset({"type": "timeseries_csv", "path": path, "target": "temp", **kw})


def test_windows_targets_and_time_split(tmp_path):
    d = load(series_csv(tmp_path), window=5, horizon=2, stride=1, normalize=False, val_fraction=0.2,
             test_fraction=0.2)
    assert d.extra["rows"] == {"train": [0, 60], "validation": [60, 80], "test": [80, 100]}
    # Train rows 0..59: windows end at rows 4..57 (target 2 rows later must be inside the split).
    assert d.x_train.shape == (54, 5, 2) and d.x_train.dtype == np.float32 and d.y_train.shape == (54, 1)
    assert d.x_train[0, :, 0].tolist() == [0, 1, 2, 3, 4] and d.y_train[0, 0] == 6
    assert d.x_train[0, :, 1].tolist() == [0, 10, 20, 30, 40]  # both feature columns, date skipped
    assert d.x_val[0, 0, 0] == 60 and d.y_val[-1, 0] == 79 and d.x_test[0, 0, 0] == 80
    assert d.extra["columns"] == ["temp", "wind"]
    strided = load(series_csv(tmp_path), window=5, horizon=1, stride=3, normalize=False)
    assert strided.x_train[1, 0, 0] == 3


def test_normalisation_uses_training_rows_only(tmp_path):
    d = load(series_csv(tmp_path), window=4, val_fraction=0.25, test_fraction=0.25)
    train_rows = np.arange(50, dtype=float)
    mean, std = train_rows.mean(), train_rows.std()
    assert d.extra["normalization"]["mean"][0] == pytest.approx(mean)
    assert d.extra["normalization"]["std"][0] == pytest.approx(std)
    assert d.x_val[0, 0, 0] == pytest.approx((50 - mean) / std, rel=1e-5)  # validation is beyond the train range
    assert d.y_train[0, 0] == pytest.approx((4 - d.extra["target_mean"]) / d.extra["target_std"], rel=1e-5)
    # Changing the future must not change the training inputs.
    values = np.arange(100, dtype=float)
    values[60:] *= 100
    (tmp_path / "f.csv").write_text("temp\n" + "\n".join(map(str, values)) + "\n")
    other = load(str(tmp_path / "f.csv"), window=4, val_fraction=0.25, test_fraction=0.25)
    assert np.array_equal(other.x_train, d.x_train[..., :1])


def test_baseline_and_delta_mode(tmp_path):
    d = load(series_csv(tmp_path), window=5, horizon=3, columns=["temp"])
    # The series rises by 1 per row, so "target = last value" is off by exactly the horizon.
    assert d.extra["baseline"]["validation_mae"] == pytest.approx(3.0)
    assert d.extra["baseline"]["test_mae"] == pytest.approx(3.0)
    delta = load(series_csv(tmp_path), window=5, horizon=3, columns=["temp"], target_mode="delta")
    assert np.allclose(delta.y_val * delta.extra["target_std"], 3.0)
    assert np.abs(delta.y_val).mean() == pytest.approx(delta.extra["baseline"]["validation_mae_normalized"])


def test_missing_values(tmp_path):
    d = load(series_csv(tmp_path, gaps=(2, 3)), window=5, normalize=False)
    assert d.x_train[0, :, 0].tolist() == [0, 1, 2, 3, 4]  # linear interpolation
    with pytest.raises(DlcliError, match=r"s.csv: row 4, column 'temp' is empty"):
        load(series_csv(tmp_path, gaps=(2,)), missing="error")


def test_errors(tmp_path):
    path = series_csv(tmp_path)
    with pytest.raises(ConfigError, match="fewer than window"):
        load(path, window=30)
    with pytest.raises(ConfigError, match="name the column to forecast"):
        load_dataset({"type": "timeseries_csv", "path": path})
    with pytest.raises(DlcliError, match=r"no column\(s\) 'pressure'"):
        load(path, columns=["pressure"])
    with pytest.raises(ConfigError, match="leaves no training rows"):
        load(path, val_fraction=0.5, test_fraction=0.5)


def test_real_co2_relative_to_data_dir(monkeypatch):
    monkeypatch.setenv("DLCLI_DATA_DIR", str(require_dataset("co2-mauna-loa").parent))
    d = load_dataset({"type": "timeseries_csv", "path": "co2-mauna-loa/co2.csv", "window": 52, "limit": 100})
    assert d.x_train.shape == (100, 52, 1) and d.extra["target"] == "co2"
    assert not np.isnan(d.x_train).any() and 0.1 < d.extra["baseline"]["test_mae"] < 1.0
