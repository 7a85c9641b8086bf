"""`data: {type: table, stream: true}`: a CSV larger than memory, read in chunks by pyarrow's streaming CSV reader
(the `tables` extra) in three passes, each holding one chunk of cells at a time:

1. the label column alone: targets (class indices or numbers) and which rows have a label, so the split (seeded,
   stratified) is the one the in-memory path makes;
2. the feature columns of the training rows, in file order, into dlcli.data.features' Adapter (the same
   accumulator, over the same fixed blocks of rows, as the in-memory path: the state is identical);
3. every kept row encoded to its compact integer or float codes (features.encode: a category's index, a bin, a
   normalised value: ~35 bytes a row for penguins), from which each batch is expanded to one-hot blocks on demand
   (features.expand), the same functions the in-memory path uses.

Cells are parsed exactly as the in-memory reader parses them (dlcli.data.table_file.parse_column), so a bad cell names
its file, line and column; lines count one per row after the header (a blank line is skipped, not counted).
"""
from pathlib import Path

import numpy as np

from dlcli.data import features as fs
from dlcli.data.source import Source
from dlcli.data.table_file import (Table, TableError, check_head, check_input_names, first_bad_row, parse_columns,
                                   parse_labels, require_columns)
from dlcli.errors import ConfigError, require

CHUNK_BYTES = 4 << 20  # pyarrow's block (it reads a few ahead): ~20,000 rows of a 200-byte-row CSV at a time


def csv_chunks(file: Path, delimiter: str, columns: list[str]):
    """Tables of at most CHUNK_BYTES of the CSV holding `columns` (raw text cells), in file order. The head is
    checked as the in-memory reader checks a whole file (UTF-8, NUL bytes, header); a row pyarrow cannot parse is
    found again by the in-memory rules, so the message names its line."""
    pa = require("pyarrow", "tables", "data.stream")
    import pyarrow.csv as pcsv

    header = check_head(file, delimiter)
    require_columns(Table(str(file), header, {h: np.zeros(0, str) for h in header}, np.zeros(0, np.int64)), columns,
                    "data.features or data.label")
    try:
        reader = pcsv.open_csv(file, read_options=pcsv.ReadOptions(block_size=CHUNK_BYTES, use_threads=False),
                               parse_options=pcsv.ParseOptions(delimiter=delimiter),
                               convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                                   include_columns=list(columns),
                                                                   strings_can_be_null=False))
        line = 2
        for batch in reader:
            cells = {name: np.asarray(batch.column(name).to_numpy(zero_copy_only=False), dtype=str)
                     for name in columns}
            yield Table(str(file), header, cells, np.arange(line, line + batch.num_rows))
            line += batch.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        first_bad_row(file, delimiter)  # raises the in-memory reader's one-line message for that row
        raise TableError(f"{file}: not a CSV pyarrow can read ({str(e).splitlines()[0][:160]})") from None


class EncodedSource(Source):
    """Rows held as their compact codes (features.encode), or the rows `rows` of them (a split shares the codes of
    the whole file); a batch is expanded to the model's float32 inputs on demand: one vector, or (output_mode dict)
    one block per feature and cross, in `order`."""

    def __init__(self, codes: dict, state: dict, order: list[str] | None = None, rows: np.ndarray | None = None):
        self.codes, self.state, self.order, self.rows = codes, state, order, rows
        dict_mode = state.get("output_mode") == "dict"
        self.input_names = list(order or fs.widths(state)) if dict_mode else None
        widths = fs.widths(state)
        self._shapes = [(widths[n],) for n in self.input_names] if dict_mode else [(state["width"],)]

    def __len__(self):
        return len(self.rows) if self.rows is not None else len(next(iter(self.codes.values()))[0])

    @property
    def sample_shapes(self):
        return self._shapes

    def take(self, index):
        index = self.rows[index] if self.rows is not None else index
        blocks = fs.expand(self.state, {k: tuple(a[index] for a in v) for k, v in self.codes.items()})
        if self.input_names is not None:
            return [blocks[n] for n in self.input_names]
        return [np.concatenate(list(blocks.values()), axis=1)]

    def subset(self, index):
        rows = np.arange(len(self))[index] if self.rows is None else self.rows[index]
        return EncodedSource(self.codes, self.state, self.order, np.asarray(rows, np.int64))

    def for_inputs(self, names):

        check_input_names(names, self.input_names)
        return EncodedSource(self.codes, self.state, list(names), self.rows)

    def adapted_on(self, index):
        raise ConfigError("train.kfold adapts the preprocessing again on each fold's rows, which a streamed table "
                          "(data.stream: true) has only as codes; train the folds without stream")

    def describe(self):
        return {}


def labels(file: Path, delimiter: str, label: str, missing: list[str], classes: list | None):
    """Pass 1: (targets of the rows with a label, classes or None for numbers, which rows have one). Each distinct
    label is parsed once, by the in-memory rules (table_file.parse_labels), at the line it first appears on."""

    codes, kept, first = [], [], {}
    for chunk in csv_chunks(file, delimiter, [label]):
        keep = ~chunk.absent(label, missing)
        values, where, inverse = np.unique(np.char.strip(chunk.cells[label])[keep], return_index=True,
                                           return_inverse=True)
        lines = chunk.lines[keep][where]
        ids = np.array([first.setdefault(v, (len(first), int(n)))[0] for v, n in zip(values.tolist(), lines)],
                       np.int64)
        codes.append(ids[inverse.reshape(-1)])
        kept.append(keep)
    names = list(first)
    distinct = Table(str(file), [label], {label: np.array(names, dtype=str)},
                     np.array([first[n][1] for n in names], np.int64))
    codes = np.concatenate(codes)
    targets, classes, _ = parse_labels(distinct, label, missing, classes, labelled=len(codes))
    return targets[codes], classes, np.concatenate(kept)


def adapt(file: Path, delimiter: str, specs: dict, crosses: list, missing: list[str], kept: np.ndarray,
          train_rows: np.ndarray) -> dict:
    """Pass 2: the feature space adapted on the training rows (`train_rows`: positions among the kept rows)."""

    adapter = fs.Adapter(specs, crosses)
    is_train = np.zeros(int(kept.sum()), bool)
    is_train[train_rows] = True
    position = 0
    for start, chunk in _row_chunks(file, delimiter, list(specs)):
        keep = kept[start:start + len(chunk)]
        rows = is_train[position:position + int(keep.sum())]
        position += int(keep.sum())
        columns = parse_columns(chunk, specs, missing)
        adapter.update({k: c.take(np.flatnonzero(keep)[rows]) for k, c in columns.items()})
    return adapter.result()


def encode(file: Path, delimiter: str, state: dict, missing: list[str], kept: np.ndarray) -> dict:
    """Pass 3: every kept row's codes, written chunk by chunk into arrays sized once (no second copy)."""

    codes, at = None, 0
    for start, chunk in _row_chunks(file, delimiter, list(state["features"])):
        keep = np.flatnonzero(kept[start:start + len(chunk)])
        columns = parse_columns(chunk, state, missing)
        part = fs.encode(state, {k: c.take(keep) for k, c in columns.items()})
        if codes is None:
            rows = int(kept.sum())
            codes = {k: tuple(np.empty((rows, *a.shape[1:]), a.dtype) for a in v) for k, v in part.items()}
        for k, v in part.items():
            for target, a in zip(codes[k], v):
                target[at:at + len(a)] = a
        at += len(keep)
    return codes


def _row_chunks(file, delimiter, columns):
    start = 0
    for chunk in csv_chunks(file, delimiter, columns):
        yield start, chunk
        start += len(chunk)
