"""A table file read into named columns of text cells: CSV (the one CSV reader of dlcli: `type: csv`, time series
and predict's rows use it too), JSON records and Parquet; columns parsed to numbers, dates or categories with the
line and column of a bad cell; the label column; what `features: auto` infers. dlcli.data.table builds datasets on
it and dlcli.data.table_stream streams a CSV too large for memory through the same checks."""
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlcli.data import features as fs
from dlcli.errors import ConfigError, DlcliError, require
from dlcli.registry import did_you_mean

DEFAULT_MISSING = ["", "NA"]
OTHER_DELIMITERS = (";", "\t", "|", ",")



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
    pa = require("pyarrow", "tables", "reading Parquet")
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

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
def parse_labels(table: Table, label: str, missing: list[str], classes: list | None = None,
                 labelled: int | None = None):
    """(targets, classes or None, rows kept): text labels become class indices (sorted names, or `classes` given);
    numbers are regression targets. Rows without a label are dropped. `labelled` is the file's count of labelled rows
    for the messages, where `table` holds only the distinct labels (a streamed file)."""
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
                         f"{labelled or int(keep.sum()):,} rows; a classifier needs two or more")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(cells.tolist()) - set(index))
    if unknown:
        first = int(np.flatnonzero(cells == unknown[0])[0])
        raise TableError(f"{table.file}, {table.where(np.flatnonzero(keep)[first])}, column '{label}': label "
                         f"{unknown[0]!r} is "
                         f"not among the training classes {classes}")
    return np.array([index[c] for c in cells.tolist()], np.int64), list(classes), keep


def check_input_names(names: list[str], features: list[str]):
    """A model's inputs are the table's features and crosses, each once (output_mode dict)."""
    unknown = [n for n in names if n not in features]
    if unknown or len(names) != len(features):
        hints = "; ".join(f"model input '{n}' is not a table feature{did_you_mean(n, features)}"
                          for n in unknown) or f"the model reads {len(names)} of them"
        raise ConfigError(f"{hints} (data.output_mode dict gives one input per feature and cross, each to be a "
                          f"model input: {', '.join(features)})")
