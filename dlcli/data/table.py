"""`data: {type: table}`: a CSV of mixed columns (numbers, categories, dates, missing cells) preprocessed as Keras'
FeatureSpace does (dlcli.data.features), adapted on the training split only and stored in the run as
`feature_space.json`, which evaluate, predict, --resume and export reuse. k-fold adapts each fold on its own
training part (`TableSource.adapted_on`).

Bad input stops before anything is written with one line naming the file, the line and the column.
"""
import contextlib
import contextvars
import json
from pathlib import Path

import numpy as np

from dlcli import run_files
from dlcli.data import features as fs
from dlcli.data.dataset import Dataset, DatasetType, register
from dlcli.data.paths import resolve_path
from dlcli.data.source import ArraySource, fit_inputs
from dlcli.data.split import check_limits, split_indices
from dlcli.data.table_file import (DEFAULT_MISSING, PARQUET_SUFFIXES, Table, TableError, check_head, check_input_names,
                                   infer_features, inferred_yaml, parse_columns, parse_labels, read_table,
                                   records_table, require_columns)
from dlcli.errors import ConfigError, DlcliError

# the preprocessing state of the run a command works on (see `stored`): used instead of adapting again
_stored: contextvars.ContextVar = contextvars.ContextVar("dlcli_table_state", default=None)


# --- the source and the stored state ---------------------------------------------------------------------------------
class TableSource(ArraySource):
    """Rows already transformed (one float32 vector each; with output_mode dict one block per feature and cross,
    named by `input_names`, in `order` when given), with their parsed columns kept so a fold can adapt again on its
    own training part."""

    def __init__(self, columns: dict, state: dict, order: list[str] | None = None):
        self.columns, self.state, self.order = columns, state, order
        self.input_names = None
        if state.get("output_mode") == "dict":
            blocks = fs.transform_blocks(state, columns)
            self.input_names = list(order or blocks)
            super().__init__([blocks[n] for n in self.input_names])
        else:
            super().__init__([fs.transform(state, columns)])

    def for_inputs(self, names: list[str]) -> "TableSource":
        """The blocks in the order of a model's inputs, matched by name (output_mode dict)."""
        check_input_names(names, self.input_names)
        return TableSource(self.columns, self.state, list(names))

    def subset(self, index):
        return TableSource({k: c.take(index) for k, c in self.columns.items()}, self.state, self.order)

    def with_state(self, state: dict) -> "TableSource":
        return TableSource(self.columns, state, self.order)

    def adapted_on(self, index) -> "TableSource":
        """All these rows, transformed by a feature space adapted on rows `index` only (a k-fold fold)."""
        specs, crosses = fs.specs_of(self.state)
        state = {**self.state, **fs.adapt(specs, crosses, {k: c.take(index) for k, c in self.columns.items()})}
        return self.with_state(state)

    def describe(self):
        return {}


@contextlib.contextmanager
def stored(run_dir_or_state):
    """While the block runs, tables use this preprocessing state (a dict, or a run directory's feature_space.json
    when it has one) instead of adapting on the data again."""
    state = run_dir_or_state
    if state is not None and not isinstance(state, dict):
        path = run_files.RunDir(state).feature_space
        state = json.loads(path.read_text()) if path.is_file() else None
    token = _stored.set(state)
    try:
        yield
    finally:
        _stored.reset(token)


def read_state(run_dir) -> dict:
    path = run_files.RunDir(run_dir).feature_space
    if not path.is_file():
        raise DlcliError(f"{run_dir} has no {path.name}: it was not trained on a table (data.type table)")
    return json.loads(path.read_text())


def feature_state(data: dict) -> dict:
    """The preprocessing state for a config's `data:`: the stored one (see `stored`), else adapted on the training
    split (cached: loading the data next reuses it)."""
    state = _stored.get()
    return state if state is not None else _load(data).extra["feature_space"]


def input_width(data: dict) -> int:
    """The width of the concatenated vector: a Sequential model's input_shape."""
    return feature_state(data)["width"]


def input_widths(data: dict) -> dict:
    """Each feature's and cross's width by name: the shapes of a functional model's inputs (output_mode dict)."""
    return fs.widths(feature_state(data))


def describe_lines(state: dict) -> list[str]:
    """Each feature's block and width, in concatenation order, and the columns left out: for the banner."""
    lines = [f"{name}: {what}, width {width}" for name, what, width in fs.describe(state)]
    lines.append(f"total width {state['width']}; label '{state['label']}' "
                 + (f"({len(state['classes'])} classes)" if state.get("classes") else "(regression)"))
    if state.get("ignored_columns"):
        lines.append(f"ignored (not in data.features): {', '.join(state['ignored_columns'])}")
    if state.get("inferred"):
        lines.append("features: auto inferred this section (paste it into data.features to keep or edit it):")
        lines += [f"  {line}" for line in inferred_yaml(state)]
    return lines


_cache: dict = {}


def _load(data: dict) -> Dataset:
    """load_table for a data spec, cached on the spec and the files' sizes and times (builder then loader)."""
    import inspect

    bound = inspect.signature(load_table).bind(**{k: v for k, v in data.items() if k != "type"})
    bound.apply_defaults()
    args = dict(bound.arguments)
    _check_arguments(args)
    try:
        files = [resolve_path(args["path"])]
        if args.get("test_path"):
            files.append(resolve_path(args["test_path"], "data.test_path"))
    except ValueError as e:  # a NUL in a path
        raise ConfigError(f"data.path: {e}") from None
    key = json.dumps([args, [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files],
                      _stored.get() is not None and json.dumps(_stored.get(), sort_keys=True)],
                     sort_keys=True, default=str)
    if key not in _cache:
        _cache.clear()  # one table at a time: the last one is what the next call asks for
        _cache[key] = _load_table(**args)
    return _cache[key]


class TableRows(DatasetType):
    """Rows by column name, through the run's stored feature space (feature_space.json); a Sequential model's
    input width is the adapted vector's."""

    rows = True

    def read_files(self, paths, run_dir, model):
        if len(paths) != 1:
            raise DlcliError("give one CSV or JSON file of rows for a run trained on a table", exit_code=2)
        x, labels = prediction_rows(paths[0], run_dir)
        return fit_inputs(x, model), labels

    def read_instances(self, instances, run_dir, model):
        return fit_inputs(prediction_records(instances, run_dir), model)

    def decides_input_shapes(self, functional):  # a functional model's with output_mode dict only
        return not functional or self.spec.get("output_mode") == "dict"

    def input_shape(self):
        return [input_width(self.spec)]

    def input_shapes(self):  # output_mode dict: each feature's and cross's width, adapted (or the run's)
        return {name: [width] for name, width in input_widths(self.spec).items()}


@register("table", kind=TableRows)
def load_table(path: str, label: str, features: dict | str, crosses: list[dict] | None = None,
               test_path: str | None = None, test_split: float = 0.0, missing: list[str] | None = None,
               delimiter: str = ",", output_mode: str = "concat", stratify: bool = True, seed: int = 0,
               limit: int | None = None, test_limit: int | None = None, stream: bool = False) -> Dataset:
    """A CSV table: `features` (column -> Keras FeatureSpace type) preprocessed into one float32 vector per row,
    adapted on the training rows; `label` text -> classes (stored in the run), numbers -> regression. The test set
    is test_path or a seeded test_split (stratified by class unless stratify: false). Cells equal to one of
    `missing` (default "" and NA) are missing. Columns not in `features` are ignored. stream: true reads a CSV
    larger than memory in chunks (dlcli.data.table_stream), holding its rows as compact codes."""
    return _load({k: v for k, v in locals().items()})


def _check_arguments(args: dict):
    """What the schema's annotations cannot say, before any file is read."""
    check_limits(args["limit"], args["test_limit"])
    if not isinstance(args["stream"], bool):
        raise ConfigError(f"data.stream must be true or false; got {args['stream']!r}")
    if args["output_mode"] not in ("concat", "dict"):
        raise ConfigError(f"data.output_mode: 'concat' (one vector per row, for a Sequential model) or 'dict' (one "
                          f"named input per feature, for a functional model); found {args['output_mode']!r}")
    split = args["test_split"]
    if not isinstance(split, (int, float)) or isinstance(split, bool) or not 0.0 <= split < 1.0:
        raise ConfigError(f"data.test_split must be a fraction in [0, 1); got {split!r}")
    if args["test_path"] is not None and split:
        raise ConfigError("data: give test_path or test_split, not both")
    if not isinstance(args["delimiter"], str) or len(args["delimiter"]) != 1 or args["delimiter"] in "\r\n\"":
        raise ConfigError(f"data.delimiter must be one character (not a quote or line break); got "
                          f"{args['delimiter']!r}")
    if not isinstance(args["seed"], int) or not 0 <= args["seed"] < 2**32:
        raise ConfigError(f"data.seed must be an integer from 0 to 2**32 - 1; got {args['seed']!r}")
    if not isinstance(args["label"], str):
        raise ConfigError(f"data.label must be a column name; got {args['label']!r}")
    if args["features"] != "auto":
        fs.feature_specs(args["features"], args["crosses"])


def _load_table(path, label, features, crosses, test_path, test_split, missing, delimiter, output_mode, stratify,
                seed, limit, test_limit, stream) -> Dataset:
    missing = DEFAULT_MISSING if missing is None else [str(m) for m in missing]
    file = resolve_path(path)
    if stream:
        return _load_streamed(file, label, features, crosses, test_path, test_split, missing, delimiter, output_mode,
                              stratify, seed, limit, test_limit)
    table = read_table(file, delimiter)
    inferred = None
    if features == "auto":  # types only, from the cells of the training file: nothing is adapted yet
        require_columns(table, [label], "data.label")
        features, left_out = infer_features(table, label, missing)
        inferred = {"features": features, "left_out": left_out}
    specs, cross_specs = fs.feature_specs(features, crosses)
    if label in specs:
        raise ConfigError(f"data.features: '{label}' is the label (data.label); it cannot be a feature too")
    stored_state = _stored.get()
    columns = parse_columns(table, specs, missing)
    y, classes, kept = parse_labels(table, label, missing, stored_state and stored_state.get("classes"))
    columns = {k: c.take(kept) for k, c in columns.items()}
    table = table.take(kept)
    for name, col in columns.items():
        if col.missing.all():
            raise TableError(f"{file}, column '{name}': every cell is missing ({missing}); drop it from "
                             f"data.features")
    if test_path is not None:
        test_table = read_table(resolve_path(test_path, "data.test_path"), delimiter)
        test_columns = parse_columns(test_table, specs, missing)
        y_test, _, test_kept = parse_labels(test_table, label, missing, classes)
        test_columns = {k: c.take(test_kept) for k, c in test_columns.items()}
    train_index, test_index = _split(y, classes, test_path, test_split, stratify, seed, limit)
    if test_index is not None:
        test_columns, y_test = {k: c.take(test_index) for k, c in columns.items()}, y[test_index]
    elif test_path is None:
        test_columns, y_test = None, None
    train_columns, y_train = {k: c.take(train_index) for k, c in columns.items()}, y[train_index]
    if test_columns is not None and test_limit is not None:
        test_columns, y_test = {k: c.take(slice(0, test_limit)) for k, c in test_columns.items()}, y_test[:test_limit]
    state = stored_state or _state(file, lambda: fs.adapt(specs, cross_specs, {  # the training rows in file order
        k: c.take(np.sort(train_index)) for k, c in columns.items()}), table.header, specs, label, classes, missing,
        output_mode, inferred)
    x_train = TableSource(train_columns, state)
    x_test = None if test_columns is None else TableSource(test_columns, state)
    return _dataset(file, x_train, y_train, x_test, y_test, classes, state, kept)


def _split(y, classes, test_path, test_split, stratify, seed, limit):
    """(training rows, test rows or None): all rows when a test file is given, else a seeded test_split
    (stratified by class unless stratify is false); `limit` keeps the first training rows."""
    if test_path is None and test_split:
        train_index, test_index = split_indices(y, float(test_split), np.random.default_rng(seed),
                                                stratify and classes is not None)
    else:
        train_index, test_index = np.arange(len(y)), None
    return train_index[:limit], test_index


def _state(file, adapted, header, specs, label, classes, missing, output_mode, inferred=None) -> dict:
    """The run's feature_space.json: what `adapted()` learned, with the label, classes and settings."""
    try:
        state = adapted()
    except ValueError as e:
        raise TableError(f"{file}: {e}; drop it from data.features") from None
    ignored = [h for h in header if h not in specs and h != label]
    return {"label": label, "classes": classes, "missing": missing, "ignored_columns": ignored,
            "output_mode": output_mode, **state, **({"inferred": inferred} if inferred else {})}


def _load_streamed(file, label, features, crosses, test_path, test_split, missing, delimiter, output_mode, stratify,
                   seed, limit, test_limit) -> Dataset:
    """data.stream: the CSV read in chunks by dlcli.data.table_stream (labels, adaptation, codes), never whole."""
    from dlcli.data import table_stream as ts

    if features == "auto":
        raise ConfigError("data.features: auto infers the types from the whole file, which data.stream does not "
                          "read at once; run features: auto on a sample of the file and paste the section it prints")
    if Path(file).suffix.lower() in (*PARQUET_SUFFIXES, ".json", ".jsonl"):
        raise ConfigError(f"data.stream reads CSV files; {file} is {Path(file).suffix}: convert it or drop stream")
    specs, cross_specs = fs.feature_specs(features, crosses)
    if label in specs:
        raise ConfigError(f"data.features: '{label}' is the label (data.label); it cannot be a feature too")
    text = [n for n, f in specs.items() if f["type"] == "text"]
    if text:
        raise ConfigError(f"data.features.{text[0]}: a text feature's vocabulary needs every text at once; "
                          f"data.stream takes the other feature types")
    stored_state = _stored.get()
    header = check_head(file, delimiter)
    y, classes, kept = ts.labels(file, delimiter, label, missing, stored_state and stored_state.get("classes"))
    train_index, test_index = _split(y, classes, test_path, test_split, stratify, seed, limit)
    state = stored_state or _state(file, lambda: ts.adapt(file, delimiter, specs, cross_specs, missing, kept,
                                                          np.sort(train_index)),
                                   header, specs, label, classes, missing, output_mode)
    rows = ts.EncodedSource(ts.encode(file, delimiter, state, missing, kept), state)
    x_train, y_train = rows.subset(train_index), y[train_index]
    x_test, y_test = (rows.subset(test_index), y[test_index]) if test_index is not None else (None, None)
    del rows
    if test_path is not None:
        test_file = resolve_path(test_path, "data.test_path")
        y_test, _, test_kept = ts.labels(test_file, delimiter, label, missing, classes)
        x_test = ts.EncodedSource(ts.encode(test_file, delimiter, state, missing, test_kept), state)
    if x_test is not None and test_limit is not None:
        x_test, y_test = x_test.subset(np.arange(min(test_limit, len(y_test)))), y_test[:test_limit]
    return _dataset(file, x_train, y_train, x_test, y_test, classes, state, kept)


def adapt_streamed(data: dict) -> dict:
    """The feature space a streamed table's training rows give (passes 1 and 2 alone, for bench/table_stream.py),
    with "rows": the rows read."""
    from dlcli.data import table_stream as ts

    file = resolve_path(data["path"])
    missing = DEFAULT_MISSING if data.get("missing") is None else [str(m) for m in data["missing"]]
    delimiter = data.get("delimiter", ",")
    specs, crosses = fs.feature_specs(data["features"], data.get("crosses"))
    y, classes, kept = ts.labels(file, delimiter, data["label"], missing, None)
    train_index, _ = _split(y, classes, data.get("test_path"), data.get("test_split", 0.0),
                            data.get("stratify", True), data.get("seed", 0), data.get("limit"))
    state = ts.adapt(file, delimiter, specs, crosses, missing, kept, np.sort(train_index))
    return {**state, "rows": int(len(kept)), "train_rows": int(len(train_index))}


def _dataset(file, x_train, y_train, x_test, y_test, classes, state, kept) -> Dataset:
    extra = {"feature_space": state, "label_rows_dropped": int((~kept).sum())}
    if classes is None and y_test is not None:  # regression: the "predict the training mean" baseline
        mean = float(y_train.mean())
        extra.update({"baseline": {"test_mae": float(np.abs(y_test - mean).mean())}, "target": state["label"],
                      "target_std": 1.0, "baseline_description": f"predict the training mean, {mean:.4g}"})
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=classes,
                   source=str(file), extra=extra, name="table")


def prediction_rows(file: Path, run_dir) -> tuple[np.ndarray, list[str]]:
    """`dlcli predict RUN rows.csv | records.json`: columns read by name (others and their order do not matter),
    preprocessed with the run's stored feature space; an unseen category is out-of-vocabulary, as in Keras."""
    table = read_table(file)
    return transform_rows(table, run_dir), [f"{Path(file).name}:{line}" for line in table.lines]


def prediction_records(records: list, run_dir) -> np.ndarray:
    """`dlcli serve`'s rows: JSON objects of column -> value, through the same steps as prediction_rows."""
    return transform_rows(records_table(records, "request", list(range(len(records))), "instance"), run_dir)


def transform_rows(table: Table, run_dir) -> np.ndarray | dict:
    """The rows as the run's model takes them: one vector each, or (output_mode dict) blocks by feature name."""
    state = read_state(run_dir)
    columns = parse_columns(table, state, state["missing"])
    return fs.transform_blocks(state, columns) if state.get("output_mode") == "dict" else fs.transform(state, columns)
