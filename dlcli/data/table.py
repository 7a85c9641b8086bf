"""`data: {type: table}`: a CSV of mixed columns (numbers, categories, dates, missing cells) preprocessed as Keras'
FeatureSpace does (dlcli.data.features), adapted on the training split only and stored in the run as
`feature_space.json`, which evaluate, predict, --resume and export reuse. k-fold adapts each fold on its own
training part (`TableSource.adapted_on`).

Bad input stops before anything is written with one line naming the file, the line and the column.
"""
import contextlib
import contextvars
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlcli.data import features as fs
from dlcli.data.dataset import Dataset, DatasetType, register
from dlcli.data.paths import resolve_path
from dlcli.data.source import ArraySource, fit_inputs
from dlcli.data.split import check_limits, split_indices
from dlcli.errors import ConfigError, DlcliError
from dlcli.registry import did_you_mean

FILENAME = "feature_space.json"  # in the run directory
DEFAULT_MISSING = ["", "NA"]
OTHER_DELIMITERS = (";", "\t", "|", ",")

# the preprocessing state of the run a command works on (see `stored`): used instead of adapting again
_stored: contextvars.ContextVar = contextvars.ContextVar("dlcli_table_state", default=None)


class TableError(DlcliError):
    """Bad table input: a usage error (exit 2), raised before anything is written."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


@dataclass
class Column:
    """One parsed column: values (float64, int64, str or datetime64[D]; a filler where missing) and the mask."""

    values: np.ndarray
    missing: np.ndarray

    def take(self, index) -> "Column":
        return Column(self.values[index], self.missing[index])


@dataclass
class Table:
    """Raw cells by column name (str arrays), each row's line number in its file (row number for Parquet and
    JSON: `unit`), and where a typed format had nulls (None: only `missing` cells are missing)."""

    file: str
    header: list[str]
    cells: dict
    lines: np.ndarray
    nulls: dict | None = None
    unit: str = "line"

    def __len__(self):
        return len(self.lines)

    def take(self, index) -> "Table":
        nulls = None if self.nulls is None else {k: v[index] for k, v in self.nulls.items()}
        return Table(self.file, self.header, {k: v[index] for k, v in self.cells.items()}, self.lines[index], nulls,
                     self.unit)

    def where(self, i: int) -> str:
        """Row i's place in the file, for messages."""
        return f"{self.unit} {self.lines[i]}"

    def absent(self, name: str, missing: list[str]) -> np.ndarray:
        """Which cells of a column are missing: one of `missing`, or null in a typed file."""
        absent = np.isin(np.char.strip(self.cells[name]), list(missing))
        return absent if self.nulls is None else absent | self.nulls[name]


# --- reading ---------------------------------------------------------------------------------------------------------
def read_csv(file: Path, delimiter: str = ",", header: bool | None = True) -> Table:
    """A CSV, strictly UTF-8 (a byte-order mark is allowed), every row as wide as the first: the one CSV reader of
    dlcli's data (tables, `type: csv`, time series, predict's rows; data.stream checks its head and finds a bad row
    with the same rules). header None: a first row of numbers is data, and the columns are named 0, 1, ..."""
    try:
        raw = Path(file).read_bytes()
    except OSError as e:
        raise TableError(f"{file}: cannot read ({e.strerror or e})") from None
    text = _text(file, raw)
    rows, lines = [], []
    names = None
    for row, line in csv_rows(file, io.StringIO(text, newline=""), delimiter, header):
        if names is None:
            names = row
            continue
        rows.append(row)
        lines.append(line)
    if names is None:
        raise TableError(f"{file}: empty (a CSV needs a header row and data rows)")
    if not rows:
        raise TableError(f"{file}: only a header row, no data rows")
    columns = list(zip(*rows))
    return Table(str(file), names, {h: np.array(c, dtype=str) for h, c in zip(names, columns)},
                 np.asarray(lines, np.int64))


def _text(file, raw: bytes, partial: bool = False) -> str:
    """UTF-8 text of a CSV's bytes (of its head when `partial`: a character cut at the end is dropped)."""
    if b"\0" in raw[:65536]:
        line = raw[:raw.index(b"\0")].count(b"\n") + 1
        raise TableError(f"{file}, line {line}: binary data (a NUL byte): not a CSV text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if partial and e.start >= len(raw) - 3 and e.reason == "unexpected end of data":
            return raw[:e.start].decode("utf-8-sig")
        line = raw[:e.start].count(b"\n") + 1
        raise TableError(f"{file}, line {line}: byte 0x{raw[e.start]:02x} is not UTF-8; save the file as UTF-8 "
                         f"(e.g. iconv -f latin1 -t utf-8)") from None


def csv_rows(file, stream, delimiter: str, header: bool | None = True):
    """(row, line) of each non-blank CSV row of a text stream, the header first (its names stripped and unique;
    with header False or None-and-numbers, the names 0, 1 ... come first and the first row is data), every row as
    wide as the header; a problem raises a TableError naming the line."""
    reader = csv.reader(stream, delimiter=delimiter, strict=True)
    width = None
    try:
        for row in reader:
            if not row or not any(c.strip() for c in row):
                continue
            if width is None:
                width = len(row)
                if header is False or (header is None and all(_is_number(c.strip()) for c in row)):
                    yield [str(i) for i in range(width)], 0
                else:
                    names = [h.strip() for h in row]
                    repeated = [h for h in names if names.count(h) > 1]
                    if repeated:
                        raise TableError(f"{file}, line {reader.line_num}: column name '{repeated[0]}' appears "
                                         f"twice in the header")
                    yield names, reader.line_num
                    continue
            if len(row) != width:
                others = [d for d in OTHER_DELIMITERS if d != delimiter and d in "".join(row)]
                hint = f" (it holds {others[0]!r}: mixed delimiters? data.delimiter is {delimiter!r})" if others else ""
                raise TableError(f"{file}, line {reader.line_num}: {len(row)} fields, the header has {width}{hint}")
            yield row, reader.line_num
    except csv.Error as e:
        raise TableError(f"{file}, line {reader.line_num}: not valid CSV ({e})") from None


HEAD_BYTES = 1 << 20


def check_head(file, delimiter: str) -> list[str]:
    """A CSV's header, after read_csv's checks on its first MiB (data.stream reads the rest in chunks)."""
    try:
        with open(file, "rb") as f:
            raw = f.read(HEAD_BYTES)
    except OSError as e:
        raise TableError(f"{file}: cannot read ({e.strerror or e})") from None
    text = _text(file, raw, partial=True)
    whole = len(raw) < HEAD_BYTES
    head = text if whole else text[:text.rfind("\n") + 1]
    rows = csv_rows(file, io.StringIO(head, newline=""), delimiter)
    names = next(rows, None)
    if names is None:
        raise TableError(f"{file}: empty (a CSV needs a header row and data rows)")
    if next(rows, None) is None:
        raise TableError(f"{file}: only a header row, no data rows")
    for _ in rows:
        pass
    return names[0]


def first_bad_row(file, delimiter: str):
    """Read the whole CSV line by line (bounded memory), raising read_csv's message at its first problem."""
    try:
        with open(file, "rb") as f:
            for _ in csv_rows(file, _decoded_lines(file, f), delimiter):
                pass
    except OSError as e:
        raise TableError(f"{file}: cannot read ({e.strerror or e})") from None


def _decoded_lines(file, lines):
    for number, raw in enumerate(lines, 1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise TableError(f"{file}, line {number}: byte 0x{raw[e.start]:02x} is not UTF-8; save the file as UTF-8 "
                             f"(e.g. iconv -f latin1 -t utf-8)") from None


def read_records(file: Path) -> Table:
    """Rows for predict from JSON: a list of objects (or one object), or JSON lines; null is a missing cell."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TableError(f"{file}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TableError(f"{file}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
        records, unit = (data, "record") if isinstance(data, list) else ([data], "record")
        lines = list(range(1, len(records) + 1))  # record numbers
    except json.JSONDecodeError:
        records, lines, unit = [], [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TableError(f"{file}, line {number}: not JSON ({e.msg})") from None
                lines.append(number)
    return records_table(records, str(file), lines, unit)


def records_table(records: list, file: str, lines: list[int], unit: str) -> Table:
    """Parsed JSON objects of column -> value as a Table (null is a missing cell); `file` names them in messages."""
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad or not records:
        raise TableError(f"{file}: expected JSON objects of column -> value (a list of them or one per line)"
                         + (f"; record {bad[0] + 1} is {type(records[bad[0]]).__name__}" if bad else ""))
    header = list(dict.fromkeys(k for r in records for k in r))
    cells = {h: np.array(["" if r.get(h) is None else str(r[h]) for r in records], dtype=str) for h in header}
    nulls = {h: np.array([r.get(h) is None for r in records], bool) for h in header}
    return Table(file, header, cells, np.asarray(lines, np.int64), nulls, unit)


def read_parquet(file: Path) -> Table:
    """A Parquet file through pyarrow (the `tables` extra): each column's values as text, nulls as missing, so
    the feature types parse them exactly as they parse CSV cells."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"{file}: reading Parquet needs pyarrow: pip install 'dlcli[tables]'") from None
    try:
        data = pq.read_table(file)
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{file}: cannot read as Parquet ({e})") from None
    cells, nulls = {}, {}
    for name, column in zip(data.column_names, data.columns):
        try:
            text = pc.cast(column, pa.string())
        except pa.ArrowException:  # types Arrow cannot cast to text: Python's str of each value
            text = pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
        nulls[name] = np.asarray(text.is_null().to_numpy(zero_copy_only=False), bool)
        cells[name] = np.array(pc.fill_null(text, "").to_numpy(zero_copy_only=False), dtype=str)
    if data.num_rows == 0:
        raise TableError(f"{file}: no rows")
    return Table(str(file), list(data.column_names), cells, np.arange(1, data.num_rows + 1), nulls, "row")


PARQUET_SUFFIXES = (".parquet", ".pq")


def read_table(file: Path, delimiter: str = ",") -> Table:
    """A CSV, a Parquet file (.parquet, .pq) or JSON records (.json, .jsonl), by the file's suffix."""
    suffix = Path(file).suffix.lower()
    if suffix in (".json", ".jsonl"):
        return read_records(file)
    if suffix in PARQUET_SUFFIXES:
        return read_parquet(file)
    return read_csv(file, delimiter)


# --- parsing cells by feature type -----------------------------------------------------------------------------------
def require_columns(table: Table, names, what: str = "data.features"):
    absent = [n for n in names if n not in table.cells]
    others = [d for d in OTHER_DELIMITERS if len(table.header) == 1 and d in table.header[0]]
    if absent and others:
        raise TableError(f"{table.file}, line 1: the header is one column holding {others[0]!r}; is the delimiter "
                         f"{others[0]!r}? (set data.delimiter)")
    if absent:
        hints = "; ".join(f"no column '{n}'{did_you_mean(n, table.header)}" for n in absent)
        raise TableError(f"{table.file}: {hints} (named in {what}); its columns: {', '.join(table.header)}")


def parse_column(table: Table, name: str, kind: str, missing: list[str]) -> Column:
    """The cells of `name` as the feature type reads them; a cell that is not a number, an integer or a date names
    its line."""
    cells = np.char.strip(table.cells[name])
    absent = table.absent(name, missing)
    present = cells[~absent]
    if kind in fs.NUMERIC or kind in fs.INTEGER:
        values = np.zeros(len(cells), np.float64)
        try:
            values[~absent] = present.astype(np.float64)
        except ValueError:
            _bad_cell(table, name, cells, absent, _is_number, "a number", kind, missing)
        absent = absent | np.isnan(values)  # "nan" reads as missing too
        if kind in fs.INTEGER:
            fractional = ~absent & (values != np.round(values))
            if fractional.any():
                _bad_cell(table, name, cells, ~fractional, lambda v: False, "an integer", kind, missing)
            return Column(np.where(absent, 0, values).astype(np.int64), absent)
        return Column(np.where(absent, 0.0, values), absent)
    if kind == "date":
        days = np.zeros(len(cells), "datetime64[D]")
        try:
            days[~absent] = np.char.replace(np.char.partition(present, "T")[:, 0].astype("U10"), "/", "-") \
                .astype("datetime64[D]")
        except ValueError:
            _bad_cell(table, name, cells, absent, _is_date, "a date (yyyy-mm-dd or yyyy/mm/dd)", kind, missing)
        return Column(days, absent)
    return Column(np.where(absent, "", cells), absent)


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _is_date(v: str) -> bool:
    try:
        np.datetime64(v.partition("T")[0][:10].replace("/", "-"), "D")
        return True
    except ValueError:
        return False


def _bad_cell(table, name, cells, skip, ok, expected, kind, missing):
    for i in np.flatnonzero(~skip):
        if not ok(str(cells[i])):
            raise TableError(f"{table.file}, {table.where(i)}, column '{name}': {str(cells[i])!r} is not "
                             f"{expected} ({name} is {kind}; cells read as missing: {missing})")
    raise AssertionError("no bad cell found")


def parse_columns(table: Table, state_or_specs: dict, missing: list[str]) -> dict:
    specs = state_or_specs.get("features", state_or_specs)
    require_columns(table, specs)
    return {name: parse_column(table, name, spec["type"], missing) for name, spec in specs.items()}


# --- features: auto ---------------------------------------------------------------------------------------------------
CATEGORICAL_MAX = 20  # distinct whole numbers up to this are categories, not quantities
IDENTIFIER_SHARE = 0.5  # text columns with more distinct values than this share of rows are names or free text


def infer_features(table: Table, label: str, missing: list[str]) -> tuple[dict, dict]:
    """`features: auto`: a type per column from its cells ({name: type}), and the columns left out with the
    reason. Numbers: integer_categorical when at most 20 distinct whole numbers, else float_normalized; dates
    (yyyy-mm-dd, yyyy/mm/dd): date; text: string_categorical, unless most values are distinct (an identifier or
    free text, left out)."""
    inferred, left_out = {}, {}
    for name in table.header:
        if name == label:
            continue
        absent = table.absent(name, missing)
        present = np.char.strip(table.cells[name])[~absent]
        distinct = np.unique(present)
        if len(distinct) == 0:
            left_out[name] = "every cell is missing"
            continue
        try:
            numbers = distinct.astype(np.float64)
        except ValueError:
            numbers = None
        if numbers is not None:
            whole = bool(np.all(numbers == np.round(numbers)))
            inferred[name] = "integer_categorical" if whole and len(distinct) <= CATEGORICAL_MAX \
                else "float_normalized"
        elif all(_is_date(v) and v[:4].isdigit() for v in distinct.tolist()):
            inferred[name] = "date"
        elif len(distinct) > IDENTIFIER_SHARE * len(present) and len(distinct) > CATEGORICAL_MAX:
            left_out[name] = (f"{len(distinct):,} distinct values in {len(present):,} rows: an identifier or free "
                              f"text")
        else:
            inferred[name] = "string_categorical"
    if not inferred:
        raise TableError(f"{table.file}: features: auto found no usable column besides the label '{label}' "
                         f"({'; '.join(f'{k}: {v}' for k, v in left_out.items())})")
    return inferred, left_out


def inferred_yaml(state: dict) -> list[str]:
    """The section `features: auto` inferred, ready to paste into data.features."""
    auto = state.get("inferred")
    if not auto:
        return []
    return (["features:"] + [f"  {name}: {kind}" for name, kind in auto["features"].items()]
            + [f"  # {name}: left out ({why})" for name, why in auto["left_out"].items()])


# --- labels ----------------------------------------------------------------------------------------------------------
def parse_labels(table: Table, label: str, missing: list[str], classes: list | None = None):
    """(targets, classes or None, rows kept): text labels become class indices (sorted names, or `classes` given);
    numbers are regression targets. Rows without a label are dropped."""
    require_columns(table, [label], "data.label")
    cells = np.char.strip(table.cells[label])
    keep = ~table.absent(label, missing)
    cells = cells[keep]
    if classes is None:
        try:
            return cells.astype(np.float64).astype(np.float32), None, keep
        except ValueError:
            classes = sorted(set(cells.tolist()))
    if len(classes) < 2:
        raise TableError(f"{table.file}, column '{label}': the label has one class ({classes[0]!r}) in "
                         f"{int(keep.sum())} rows; a classifier needs two or more")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(cells.tolist()) - set(index))
    if unknown:
        first = int(np.flatnonzero(cells == unknown[0])[0])
        raise TableError(f"{table.file}, {table.where(np.flatnonzero(keep)[first])}, column '{label}': label "
                         f"{unknown[0]!r} is "
                         f"not among the training classes {classes}")
    return np.array([index[c] for c in cells.tolist()], np.int64), list(classes), keep


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


def check_input_names(names: list[str], features: list[str]):
    """A model's inputs are the table's features and crosses, each once (output_mode dict)."""
    unknown = [n for n in names if n not in features]
    if unknown or len(names) != len(features):
        hints = "; ".join(f"model input '{n}' is not a table feature{did_you_mean(n, features)}"
                          for n in unknown) or f"the model reads {len(names)} of them"
        raise ConfigError(f"{hints} (data.output_mode dict gives one input per feature and cross, each to be a "
                          f"model input: {', '.join(features)})")


@contextlib.contextmanager
def stored(run_dir_or_state):
    """While the block runs, tables use this preprocessing state (a dict, or a run directory's feature_space.json
    when it has one) instead of adapting on the data again."""
    state = run_dir_or_state
    if state is not None and not isinstance(state, dict):
        path = Path(state) / FILENAME
        state = json.loads(path.read_text()) if path.is_file() else None
    token = _stored.set(state)
    try:
        yield
    finally:
        _stored.reset(token)


def read_state(run_dir) -> dict:
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise DlcliError(f"{run_dir} has no {FILENAME}: it was not trained on a table (data.type table)")
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
