"""Forecasting windows from a CSV time series, split by time (train, then validation, then test; never shuffled).

A sample is `window` consecutive rows of the feature columns; its target is the `target` column `horizon` rows
after the window's last row. Each split's windows and targets lie entirely inside that split's rows, and the
normalisation statistics come from the training rows only, so nothing of the future leaks into training."""
import numpy as np

from dlcli.data.arrays import _numeric, _read_csv
from dlcli.data.dataset import Dataset, register
from dlcli.data.paths import resolve_path
from dlcli.data.split import check_limits
from dlcli.errors import ConfigError, DlcliError

TIME_COLUMNS = ("date", "time", "datetime", "timestamp")  # skipped when `columns` is not given
MISSING = ("interpolate", "error")
TARGET_MODES = ("value", "delta")


def fill_missing(values: np.ndarray) -> np.ndarray:
    """Linear interpolation over the row index per column; leading/trailing gaps take the nearest value."""
    out = values.copy()
    rows = np.arange(len(values))
    for j in range(values.shape[1]):  # a loop over columns, not samples
        gap = np.isnan(values[:, j])
        if gap.any() and not gap.all():
            out[gap, j] = np.interp(rows[gap], rows[~gap], values[~gap, j])
    return out


def windows(values: np.ndarray, target: np.ndarray, window: int, horizon: int, stride: int):
    """(x (n, window, features), target index of each window's last row, target row index) for one segment."""
    last = np.arange(window - 1, len(values) - horizon, stride)
    starts = last - (window - 1)
    x = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)[starts]  # (n, features, window)
    return x.transpose(0, 2, 1), last, last + horizon


@register("timeseries_csv")
def load_timeseries_csv(path: str, target: str | None = None, columns: list[str] | None = None, window: int = 10,
                        horizon: int = 1, stride: int = 1, normalize: bool = True, val_fraction: float = 0.2,
                        test_fraction: float = 0.2, limit: int | None = None, target_mode: str = "value",
                        missing: str = "interpolate", delimiter: str = ",", relative_inputs: bool = False,
                        test_limit: int | None = None) -> Dataset:
    """x (samples, window, features) float32, y (samples, 1) float32; x_val/y_val set (split by time).

    columns: features (default every column but date/time ones); target: the column to forecast (default: the
    only feature). normalize: features and target scaled by the training rows' mean and std; y is then in
    those units and extra["target_std"] converts an MAE back to original units. target_mode "delta" predicts
    the change from the window's last target value (same MAE, but a trend no longer leaves the training range).
    relative_inputs subtracts each window's last row from the whole window, so the model sees the shape of the
    recent past rather than its level (a rising series then stays inside the range the model was trained on).
    extra["baseline"] holds the common-sense baseline "the target stays at its last value in the window":
    its MAE on validation and test, in original units (and normalised units). missing: empty cells are
    linearly interpolated over rows ("interpolate") or rejected ("error"). limit caps the training and validation
    windows, test_limit the test windows.
    A relative path is looked up in the current directory, then in $DLCLI_DATA_DIR."""
    check_limits(limit, test_limit)
    for key, value in (("window", window), ("horizon", horizon), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.{key} must be a positive integer; got {value!r}")
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{key} must be a fraction in [0, 1); got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no "
                          f"training rows")
    if missing not in MISSING:
        raise ConfigError(f"data.missing must be one of {', '.join(MISSING)}; got {missing!r}")
    if target_mode not in TARGET_MODES:
        raise ConfigError(f"data.target_mode must be one of {', '.join(TARGET_MODES)}; got {target_mode!r}")

    file = resolve_path(path)
    header, cells = _read_csv(file, delimiter)
    if columns is None:
        columns = [h for h in header if h.lower() not in TIME_COLUMNS]
    if target is None:
        if len(columns) != 1:
            raise ConfigError(f"data.target: name the column to forecast among {', '.join(columns)} ({file})")
        target = columns[0]
    wanted = list(dict.fromkeys([*columns, target]))
    absent = [c for c in wanted if c not in header]
    if absent:
        raise DlcliError(f"{file}: no column(s) {', '.join(map(repr, absent))}; it has: {', '.join(header)}")
    cells = cells[:, [header.index(c) for c in wanted]]
    empty = np.char.str_len(np.char.strip(cells)) == 0
    if empty.any() and missing == "error":
        row, col = np.argwhere(empty)[0]
        raise DlcliError(f"{file}: row {row + 2}, column '{wanted[col]}' is empty ({int(empty.sum())} empty cells; "
                         f"set data.missing: interpolate to fill them)")
    values = _numeric(file, np.where(empty, "nan", cells), wanted)
    if np.isnan(values).all(axis=0).any():
        raise DlcliError(f"{file}: column(s) {[c for c, e in zip(wanted, np.isnan(values).all(0)) if e]} are empty")
    values = fill_missing(values)
    features, y_all = values[:, [wanted.index(c) for c in columns]], values[:, wanted.index(target)]

    n = len(values)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    bounds = {"train": (0, n - n_val - n_test), "validation": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
    train_rows = slice(*bounds["train"])
    mean, std = features[train_rows].mean(0), features[train_rows].std(0)
    std = np.where(std > 0, std, 1.0)  # a constant column stays 0 after centring
    t_mean, t_std = 0.0, 1.0
    if normalize:
        t_mean, t_std = float(y_all[train_rows].mean()), float(y_all[train_rows].std() or 1.0)
    x_all = (features - mean) / std if normalize else features

    splits, baseline = {}, {}
    for split, (lo, hi) in bounds.items():
        if hi - lo == 0:
            splits[split] = None
            continue
        if hi - lo < window + horizon:
            raise ConfigError(f"data: the {split} part has {hi - lo} rows of {file}, fewer than window + horizon "
                              f"= {window + horizon}; use a smaller window or a larger {split} fraction")
        x, last, goal = windows(x_all[lo:hi], y_all[lo:hi], window, horizon, stride)
        if relative_inputs:
            x = x - x[:, -1:, :]
        seg = y_all[lo:hi]
        offset = seg[last] if target_mode == "delta" else t_mean
        y = ((seg[goal] - offset) / t_std).astype(np.float32)[:, None]
        splits[split] = (np.ascontiguousarray(x, dtype=np.float32), y)
        mae = float(np.abs(seg[goal] - seg[last]).mean())  # "tomorrow = today", in original units
        if split != "train":
            baseline[f"{split}_mae"] = mae
            baseline[f"{split}_mae_normalized"] = mae / t_std
    if splits["train"] is None:
        raise ConfigError(f"data: no training rows in {file}")
    empty_split = (None, None)
    return Dataset(
        x_train=splits["train"][0], y_train=splits["train"][1],
        x_val=(splits["validation"] or empty_split)[0], y_val=(splits["validation"] or empty_split)[1],
        x_test=(splits["test"] or empty_split)[0], y_test=(splits["test"] or empty_split)[1],
        source=str(file), name="timeseries_csv",
        extra={"columns": columns, "target": target, "target_mode": target_mode, "window": window,
               "relative_inputs": relative_inputs,
               "horizon": horizon, "stride": stride, "rows": {k: list(v) for k, v in bounds.items()},
               "normalization": {"mean": mean.tolist(), "std": std.tolist()} if normalize else None,
               "target_mean": t_mean, "target_std": t_std, "baseline": baseline,
               "baseline_description": "predict the target's last value in the window (tomorrow = today)"}).limited(limit, test_limit)
