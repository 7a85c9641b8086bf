"""Text classification as integer word-index sequences with Keras' imdb conventions: 0 padding, 1 start of
sequence, 2 out-of-vocabulary, word of frequency rank r (1 = most frequent in the training texts) -> r + index_from.
The vocabulary is a JSON-ready dict (Dataset.extra["vocabulary"]) so a run can encode new text with encode_texts."""
import gzip
import json
import re
from collections import Counter, defaultdict
from itertools import chain
from pathlib import Path

import numpy as np

from dlcli.data.dataset import DATASETS, Dataset
from dlcli.data.paths import candidate_dirs
from dlcli.data.split import check_limit
from dlcli.errors import ConfigError, DlcliError

# Words: runs of letters/digits, with apostrophes inside a word kept ("don't"); everything else separates.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
SIDES = ("pre", "post")


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


def encode_tokens(token_lists, vocabulary: dict, maxlen: int | None = None, padding: str | None = None,
                  truncating: str | None = None) -> np.ndarray:
    v = vocabulary
    maxlen = v["maxlen"] if maxlen is None else maxlen
    padding, truncating = padding or v["padding"], truncating or v["truncating"]
    oov, start = v["oov_char"], v["start_char"]
    # A defaultdict lookup through map() runs in C; a miss (OOV word) costs one Python call, then is cached.
    index = defaultdict(lambda: oov, {w: i + 1 + v["index_from"] for i, w in enumerate(v["words"])})
    lookup = index.__getitem__
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
    return encode_tokens([tokenize(t) for t in texts], vocabulary, maxlen, padding, truncating)


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


@DATASETS.register("imdb")
def load_imdb(path: str | None = None, num_words: int | None = 10000, maxlen: int | None = 200,
              padding: str = "pre", truncating: str = "pre", limit: int | None = None, seed: int = 113,
              start_char: int = 1, oov_char: int = 2, index_from: int = 3) -> Dataset:
    """IMDB movie reviews (25,000 train + 25,000 test), 0 negative / 1 positive, as Keras encodes them:
    x (N, maxlen) int32 word indices, y int64. Both splits are shuffled with `seed` (Keras' 113; the files are
    sorted by label) before `limit` takes the first N of each. The vocabulary is built from the training texts
    used (after limit) and returned in extra["vocabulary"]."""
    check_limit(limit)
    _check_side("padding", padding)
    _check_side("truncating", truncating)
    if num_words is not None and num_words <= index_from + 1:
        raise ConfigError(f"data.num_words must exceed index_from + 1 = {index_from + 1} (indices below it are "
                          f"reserved); got {num_words}")
    if maxlen is not None and maxlen < 1:
        raise ConfigError(f"data.maxlen must be a positive integer or null; got {maxlen}")
    train_file, test_file, source = _locate_imdb(path)
    rng = np.random.default_rng(seed)
    splits = []
    for file in (train_file, test_file):
        texts, labels = _read_jsonl(file)
        order = rng.permutation(len(texts))[:limit]
        splits.append(([tokenize(texts[i]) for i in order], labels[order]))
    (train_tokens, y_train), (test_tokens, y_test) = splits
    vocabulary = build_vocabulary(train_tokens, num_words, index_from, start_char, oov_char, maxlen, padding,
                                  truncating)
    return Dataset(x_train=encode_tokens(train_tokens, vocabulary), y_train=y_train,
                   x_test=encode_tokens(test_tokens, vocabulary), y_test=y_test, classes=["negative", "positive"],
                   source=source, extra={"vocabulary": vocabulary}, name="imdb")
