"""Text classification: reviews and documents as word-index sequences or as vectors.

output_mode "int": integer sequences with Keras' imdb conventions (0 padding, 1 start of sequence, 2
out-of-vocabulary, word of frequency rank r (1 = most frequent in the training texts) -> r + index_from).
output_mode "multi_hot" | "count" | "tf_idf": Keras TextVectorization's vectors of width num_words (= max_tokens):
column 0 the out-of-vocabulary token, column r the word of rank r; multi_hot 1 where a word occurs, count its
occurrences, tf_idf the count times log(1 + documents / (1 + documents containing the word)) (OOV: the mean
weight). Vectors are built per batch from the stored token ids (TokenSource), so 25,000 x 10,000 floats never exist.
The vocabulary is a JSON-ready dict (Dataset.extra["vocabulary"]) so a run can encode new text with encode_texts."""
import gzip
import json
import re
from collections import Counter, defaultdict
from itertools import chain
from pathlib import Path

import numpy as np

from dlcli.data.dataset import Dataset, DatasetType, register
from dlcli.data.paths import candidate_dirs
from dlcli.data.source import Source
from dlcli.data.split import check_limits
from dlcli.errors import ConfigError, DlcliError

# Words: runs of letters/digits, with apostrophes inside a word kept ("don't"); everything else separates.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
SIDES = ("pre", "post")
OUTPUT_MODES = ("int", "multi_hot", "count", "tf_idf")


def tokenize(text: str) -> list[str]:
    """Lowercase, drop IMDB's "<br />" line breaks, split into words."""
    return _WORD.findall(text.lower().replace("<br />", " "))


def build_vocabulary(token_lists, num_words: int | None = 10000, index_from: int = 3, start_char: int = 1,
                     oov_char: int = 2, maxlen: int | None = None, padding: str = "pre",
                     truncating: str = "pre") -> dict:
    """Words by descending frequency (ties: first seen first), keeping those whose index is below num_words
    (Keras: num_words counts the reserved indices too)."""
    counts = Counter(chain.from_iterable(token_lists))
    words = [w for w, _ in counts.most_common()]
    if num_words is not None:
        words = words[: max(num_words - index_from - 1, 0)]
    return {"tokenizer": "lowercase; remove '<br />'; words are letter/digit runs with inner apostrophes",
            "num_words": num_words, "index_from": index_from, "start_char": start_char, "oov_char": oov_char,
            "maxlen": maxlen, "padding": padding, "truncating": truncating, "words": words}


def pad_sequences(sequences: list, maxlen: int | None = None, padding: str = "pre", truncating: str = "pre",
                  value: int = 0, dtype=np.int32) -> np.ndarray:
    """Keras' pad_sequences (same defaults: pad and truncate at the front), vectorised over all sequences."""
    _check_side("padding", padding)
    _check_side("truncating", truncating)
    lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
    flat = np.fromiter(chain.from_iterable(sequences), dtype, int(lengths.sum()))
    width = int(lengths.max(initial=0)) if maxlen is None else maxlen
    kept = np.minimum(lengths, width)
    out = np.full((len(sequences), width), value, dtype)
    src_start = np.cumsum(lengths) - lengths + (lengths - kept if truncating == "pre" else 0)
    dst_start = width - kept if padding == "pre" else np.zeros_like(kept)
    within = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
    rows = np.repeat(np.arange(len(sequences)), kept)
    out[rows, np.repeat(dst_start, kept) + within] = flat[np.repeat(src_start, kept) + within]
    return out


def word_lookup(vocabulary: dict):
    """word -> index of an int-mode vocabulary (its oov_char for unknown words), as a C-speed callable for map():
    a miss (OOV word) costs one Python call, then is cached."""
    v = vocabulary
    oov = v["oov_char"]
    return defaultdict(lambda: oov, {w: i + 1 + v["index_from"] for i, w in enumerate(v["words"])}).__getitem__


def encode_tokens(token_lists, vocabulary: dict, maxlen: int | None = None, padding: str | None = None,
                  truncating: str | None = None) -> np.ndarray:
    v = vocabulary
    maxlen = v["maxlen"] if maxlen is None else maxlen
    padding, truncating = padding or v["padding"], truncating or v["truncating"]
    start = v["start_char"]
    lookup = word_lookup(v)
    head = [] if start is None else [start]
    if maxlen is not None:  # only the tokens truncation keeps need encoding
        token_lists = [t[-maxlen:] for t in token_lists] if truncating == "pre" else [t[:maxlen] for t in token_lists]
    sequences = [head + list(map(lookup, tokens)) for tokens in token_lists]
    return pad_sequences(sequences, maxlen, padding, truncating)


def encode_texts(texts, vocabulary: dict, maxlen: int | None = None, padding: str | None = None,
                 truncating: str | None = None) -> np.ndarray:
    """Raw strings -> (N, maxlen) int32 word indices, as the dataset was encoded (maxlen/padding/truncating
    default to the vocabulary's)."""
    if isinstance(texts, str):
        texts = [texts]
    tokens = [tokenize(t) for t in texts]
    if vocabulary.get("output_mode", "int") != "int":
        source = TokenSource.encode(tokens, vocabulary)
        return source.take(slice(0, len(source)))[0]
    return encode_tokens(tokens, vocabulary, maxlen, padding, truncating)


def check_output_mode(output_mode: str) -> None:
    if output_mode not in OUTPUT_MODES:
        raise ConfigError(f"data.output_mode must be one of {', '.join(OUTPUT_MODES)} (Keras TextVectorization's "
                          f"modes); got {output_mode!r}")


def vector_vocabulary(token_lists, num_words: int | None, output_mode: str) -> dict:
    """TextVectorization's vocabulary for vector modes: the num_words - 1 most frequent words after the OOV column
    (ties: first seen first, as build_vocabulary), with idf weights for tf_idf."""
    if num_words is not None and num_words < 2:
        raise ConfigError(f"data.num_words must be at least 2 for output_mode {output_mode} (column 0 is the "
                          f"out-of-vocabulary token); got {num_words}")
    counts = Counter(chain.from_iterable(token_lists))
    words = [w for w, _ in counts.most_common()]
    if num_words is not None:
        words = words[: num_words - 1]
    vocabulary = {"tokenizer": "lowercase; remove '<br />'; words are letter/digit runs with inner apostrophes",
                  "output_mode": output_mode, "num_words": num_words, "words": words}
    if output_mode == "tf_idf":
        source = TokenSource.encode(token_lists, {**vocabulary, "output_mode": "count"})
        rows = np.repeat(np.arange(len(source)), np.diff(source.offsets))
        present = np.unique(rows.astype(np.int64) * source.width + source.ids)  # (document, word) pairs
        df = np.bincount(present % source.width, minlength=source.width)[1:]
        idf = np.log(1 + len(token_lists) / (1 + df))
        # Keras pads the OOV column with the mean weight: one pass cannot know the OOV words' frequency.
        vocabulary["idf"] = [float(idf.mean()) if len(idf) else 0.0] + idf.tolist()
    return vocabulary


class TokenSource(Source):
    """Documents as token ids (0 = OOV, r = word of rank r) stored ragged (all ids in one array plus offsets);
    `take` builds the batch's (B, width) float32 vectors in output_mode."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, width: int, output_mode: str, idf=None):
        self.ids, self.offsets, self.width, self.output_mode = ids, offsets, width, output_mode
        self.idf = None if idf is None else np.asarray(idf, np.float32)

    @classmethod
    def encode(cls, token_lists, vocabulary: dict) -> "TokenSource":
        index = defaultdict(int, {w: i + 1 for i, w in enumerate(vocabulary["words"])})
        lookup = index.__getitem__
        lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
        ids = np.fromiter(chain.from_iterable(map(lookup, t) for t in token_lists), np.int32, int(lengths.sum()))
        width = vocabulary["num_words"] or len(vocabulary["words"]) + 1
        return cls(ids, np.concatenate([[0], np.cumsum(lengths)]), width, vocabulary["output_mode"],
                   vocabulary.get("idf"))

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def sample_shapes(self):
        return [(self.width,)]

    def take(self, index):
        docs = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        starts, lengths = self.offsets[docs], self.offsets[docs + 1] - self.offsets[docs]
        rows = np.repeat(np.arange(len(docs)), lengths)
        at = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
        ids = self.ids[at]
        if self.output_mode == "multi_hot":
            out = np.zeros((len(docs), self.width), np.float32)
            out[rows, ids] = 1.0
            return [out]
        out = np.bincount(rows * self.width + ids, minlength=len(docs) * self.width)
        out = out.reshape(len(docs), self.width).astype(np.float32)
        return [out * self.idf[:self.width] if self.output_mode == "tf_idf" else out]


def _check_side(key: str, value: str) -> None:
    if value not in SIDES:
        raise ConfigError(f"data.{key} must be 'pre' or 'post' (Keras' pad_sequences); got {value!r}")


def _read_jsonl(file: Path) -> tuple[list[str], np.ndarray]:
    opener = gzip.open if file.suffix == ".gz" else open
    texts, labels = [], []
    try:
        with opener(file, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                        texts.append(record["text"])
                        labels.append(int(record["label"]))
                    except (ValueError, KeyError, TypeError) as e:
                        raise DlcliError(f"{file}, line {number}: expected a JSON object with 'text' and 'label' "
                                         f"({e})") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DlcliError(f"{file}: cannot read ({e}); the file may be truncated or corrupt") from None
    return texts, np.asarray(labels, dtype=np.int64)


def _find_split(folder: Path, split: str) -> Path | None:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    return None


def _locate_imdb(path: str | None) -> tuple[Path, Path, str]:
    if path is not None:
        folder = Path(path).expanduser()
        train, test = _find_split(folder, "train"), _find_split(folder, "test")
        if not (train and test):
            raise DlcliError(f"data.path {folder}: needs train.jsonl.gz and test.jsonl.gz (one JSON object per "
                             f"line with 'text' and 'label')")
        return train, test, str(folder)
    tried = []
    for label, folder in candidate_dirs(["imdb-reviews", "imdb"]):
        train, test = _find_split(folder, "train"), _find_split(folder, "test")
        if train and test:
            return train, test, f"{folder} ({label})"
        tried.append(str(folder))
    raise DlcliError("the IMDB reviews (train.jsonl.gz, test.jsonl.gz) were not found in data.path or "
                     f"{', '.join(tried)}; set DLCLI_DATA_DIR to the folder holding imdb-reviews/ "
                     "(e.g. ../shared/datasets) or give data.path")


def encode_splits(train_tokens, test_tokens, output_mode: str, num_words: int | None, **int_mode) -> tuple:
    """(x_train, x_test, vocabulary) from tokenized texts: int sequences (int_mode: index_from, start_char,
    oov_char, maxlen, padding, truncating) or a TokenSource per split for the vector modes. The vocabulary comes
    from the training texts only."""
    if output_mode == "int":
        vocabulary = build_vocabulary(train_tokens, num_words, **int_mode)
        return (encode_tokens(train_tokens, vocabulary),
                None if test_tokens is None else encode_tokens(test_tokens, vocabulary), vocabulary)
    vocabulary = vector_vocabulary(train_tokens, num_words, output_mode)
    return (TokenSource.encode(train_tokens, vocabulary),
            None if test_tokens is None else TokenSource.encode(test_tokens, vocabulary), vocabulary)


@register("imdb")
def load_imdb(path: str | None = None, num_words: int | None = 10000, maxlen: int | None = 200,
              padding: str = "pre", truncating: str = "pre", limit: int | None = None, seed: int = 113,
              start_char: int = 1, oov_char: int = 2, index_from: int = 3, output_mode: str = "int",
              test_limit: int | None = None) -> Dataset:
    """IMDB movie reviews (25,000 train + 25,000 test), 0 negative / 1 positive, as Keras encodes them:
    x (N, maxlen) int32 word indices, y int64. Both splits are shuffled with `seed` (Keras' 113; the files are
    sorted by label) before `limit` takes the first N training reviews and `test_limit` the first N test ones. The
    vocabulary is built from the training texts used (after limit) and returned in extra["vocabulary"].
    output_mode multi_hot | count | tf_idf gives (N, num_words) float32 vectors instead, built per batch (maxlen,
    padding and the index options are for int)."""
    check_limits(limit, test_limit)
    check_output_mode(output_mode)
    _check_side("padding", padding)
    _check_side("truncating", truncating)
    if output_mode == "int" and num_words is not None and num_words <= index_from + 1:
        raise ConfigError(f"data.num_words must exceed index_from + 1 = {index_from + 1} (indices below it are "
                          f"reserved); got {num_words}")
    if maxlen is not None and maxlen < 1:
        raise ConfigError(f"data.maxlen must be a positive integer or null; got {maxlen}")
    train_file, test_file, source = _locate_imdb(path)
    rng = np.random.default_rng(seed)
    splits = []
    for file, n in ((train_file, limit), (test_file, test_limit)):
        texts, labels = _read_jsonl(file)
        order = rng.permutation(len(texts))[:n]
        splits.append(([tokenize(texts[i]) for i in order], labels[order]))
    (train_tokens, y_train), (test_tokens, y_test) = splits
    x_train, x_test, vocabulary = encode_splits(
        train_tokens, test_tokens, output_mode, num_words, index_from=index_from, start_char=start_char,
        oov_char=oov_char, maxlen=maxlen, padding=padding, truncating=truncating)
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=["negative", "positive"],
                   source=source, extra={"vocabulary": vocabulary}, name="imdb")


def _read_text_files(files, on_bad_file: str, max_length: int | None) -> tuple[list[str], dict[int, str]]:
    texts, bad = [], {}
    for i, file in enumerate(files):
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            if on_bad_file == "error":
                raise DlcliError(f"{file}: cannot read as UTF-8 text ({e}); fix or remove it (or set "
                                 f"data.on_bad_file: skip)") from None
            bad[i] = f"not UTF-8 text ({type(e).__name__})"
            continue
        texts.append(text[:max_length] if max_length else text)  # Keras' max_length cuts characters
    return texts, bad


class TextFiles(DatasetType):
    """Each .txt file one document cut to max_length characters, as training read the folder (not one text per
    line as for imdb runs)."""

    def read_files(self, paths, run_dir, model):
        from dlcli import run_files
        from dlcli.data.folders import prediction_files

        if not all(p.is_dir() or p.suffix.lower() == ".txt" for p in paths):
            return None
        files = prediction_files(paths, (".txt",))  # folders searched recursively
        texts, _ = _read_text_files(files, "error", self.spec.get("max_length"))
        return [encode_texts(texts, run_files.read_json(run_files.RunDir(run_dir).vocabulary))], [str(f) for f in files]

    def cut_texts(self, texts):
        cut = self.spec.get("max_length")  # Keras cuts characters
        return [t[:cut] for t in texts] if cut else texts


@register("text_folder", kind=TextFiles)
def load_text_folder(directory: str, test_directory: str | None = None, label_mode: str = "int",
                     class_names: list[str] | None = None, max_length: int | None = None,
                     output_mode: str = "int", num_words: int | None = 10000, maxlen: int | None = 200,
                     padding: str = "pre", truncating: str = "pre", start_char: int = 1, oov_char: int = 2,
                     index_from: int = 3, on_bad_file: str = "error", limit: int | None = None,
                     test_limit: int | None = None) -> Dataset:
    """.txt files in class sub-folders (Keras' text_dataset_from_directory names), through the imdb tokenizer
    and a vocabulary of the training texts (stored in the run): output_mode int gives (N, maxlen) word indices,
    multi_hot | count | tf_idf (N, num_words) vectors built per batch. max_length cuts each text to that many
    characters first. test_directory (same classes) is the test split."""
    from dlcli.data.folders import check_folder_options, encode_labels, limited, list_class_files

    check_limits(limit, test_limit)
    check_output_mode(output_mode)
    check_folder_options(label_mode, on_bad_file)
    splits = []
    for key, folder, n in (("data.directory", directory, limit), ("data.test_directory", test_directory, test_limit)):
        if folder is None:
            splits.append(None)
            continue
        files = list_class_files(folder, (".txt",), "text files", on_bad_file,
                                 class_names if not splits else splits[0][0].class_names, key=key)
        texts, bad = _read_text_files(files.files, on_bad_file, max_length)
        files = files.drop(bad) if bad else files
        keep = limited(len(texts), n)
        splits.append((files, [tokenize(texts[i]) for i in keep], files.labels[keep]))
    train, test = splits
    x_train, x_test, vocabulary = encode_splits(
        train[1], None if test is None else test[1], output_mode, num_words, index_from=index_from,
        start_char=start_char, oov_char=oov_char, maxlen=maxlen, padding=padding, truncating=truncating)
    classes = train[0].class_names
    extra = {"files_per_class": train[0].per_class(), "skipped": train[0].skipped + (test[0].skipped if test else []),
             "test_files_per_class": test[0].per_class() if test else None}
    return Dataset(x_train=x_train, y_train=encode_labels(train[2], len(classes), label_mode), x_test=x_test,
                   y_test=None if test is None else encode_labels(test[2], len(classes), label_mode),
                   classes=classes, source=str(train[0].directory), extra={"vocabulary": vocabulary, "folder": extra},
                   name="text_folder")
