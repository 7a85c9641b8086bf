"""Language modelling on the IMDB review text: next-token prediction windows, and the tokenizers that make them.

Every review becomes START + its tokens (START = 1 marks where a review begins, 0 is padding and never occurs);
the training reviews, shuffled with `seed`, are joined into one stream and cut into non-overlapping windows of
sequence_length + 1 tokens: x is a window's first sequence_length tokens, y the same shifted by one (the next token
at every position, nanoGPT's layout). The test reviews make the test windows the same way.

Tokenizers, stored in the run as its vocabulary.json (dlcli generate encodes prompts and decodes samples with it):
- "word": dlcli's IMDB word tokenizer and vocabulary (lowercase words; 2 = out of vocabulary; word of frequency rank
  r -> r + 3), as the imdb dataset's int mode;
- "bpe": a byte-level BPE (HuggingFace `tokenizers`, GPT-2's pre-tokenizer) trained on the training texts with
  vocabulary size num_words, ids 0 and 1 reserved as above; its JSON is kept whole in the vocabulary.
"""
from itertools import chain

import numpy as np

from dlcli.data.dataset import Dataset, register
from dlcli.data.split import check_limits
from dlcli.data.text import _locate_imdb, _read_jsonl, build_vocabulary, tokenize, word_lookup
from dlcli.errors import ConfigError, require

PAD, START = 0, 1
TOKENIZERS = ("word", "bpe")
_BPE_SPECIALS = ["[PAD]", "[START]"]  # ids 0 and 1, as the word vocabulary's padding and start marks


def clean(text: str) -> str:
    """IMDB's "<br />" line breaks as spaces (the word tokenizer drops them too)."""
    return text.replace("<br />", " ")


def train_bpe(texts, vocabulary_size: int) -> dict:
    """A byte-level BPE of `vocabulary_size` tokens (the 256 bytes, merges, and the two reserved ids) trained on
    `texts`; the vocabulary record holds its JSON."""
    tk = require("tokenizers", "text", "the bpe tokenizer")
    if vocabulary_size < 256 + len(_BPE_SPECIALS):
        raise ConfigError(f"data.num_words must be at least {256 + len(_BPE_SPECIALS)} for the bpe tokenizer (its 256 "
                          f"byte tokens and [PAD], [START]); got {vocabulary_size}")
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocabulary_size, special_tokens=_BPE_SPECIALS, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return {"tokenizer": "bpe", "language_model": True, "num_words": bpe.get_vocab_size(), "start_char": START,
            "bpe": bpe.to_str()}


class TextCodec:
    """A language-model run's tokenizer: text -> ids (a review's START first) and ids -> text."""

    def __init__(self, vocabulary: dict):
        self.vocabulary = vocabulary
        self.kind = vocabulary.get("tokenizer")
        if self.kind == "bpe":
            self.bpe = require("tokenizers", "text", "the bpe tokenizer").Tokenizer.from_str(vocabulary["bpe"])
        else:
            self.lookup = word_lookup(vocabulary)
            self.words = ["[PAD]", "[START]", "[UNK]", *["[UNK]"] * (vocabulary["index_from"] - 2),
                          *vocabulary["words"]]

    @property
    def size(self) -> int:
        return self.bpe.get_vocab_size() if self.kind == "bpe" else len(self.words)

    def encode(self, texts) -> list[list[int]]:
        if self.kind == "bpe":
            return [[START, *e.ids] for e in self.bpe.encode_batch([clean(t) for t in texts])]
        return [[START, *map(self.lookup, tokenize(t))] for t in texts]

    def decode(self, ids) -> str:
        """The text of generated ids (no START); words are joined by spaces."""
        if self.kind == "bpe":
            return self.bpe.decode(list(map(int, ids)))
        return " ".join(self.words[i] for i in ids)


def windows(sequences, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists joined into one stream and cut into (N, length) inputs and their next-token targets."""
    stream = np.fromiter(chain.from_iterable(sequences), np.int32)
    n = (len(stream) - 1) // length
    return stream[:n * length].reshape(n, length), stream[1:n * length + 1].astype(np.int64).reshape(n, length)


@register("imdb_lm")
def load_imdb_lm(path: str | None = None, tokenizer: str = "word", num_words: int = 10000, sequence_length: int = 64,
                 limit: int | None = None, test_limit: int | None = None, seed: int = 113) -> Dataset:
    """The IMDB reviews' text (labels unused) as next-token windows: x (N, sequence_length) int32 token ids, y the
    same shifted by one (int64). `limit` / `test_limit` count reviews (shuffled with `seed` first), not windows."""
    check_limits(limit, test_limit)
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer must be one of {', '.join(TOKENIZERS)}; got {tokenizer!r}")
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or sequence_length < 1:
        raise ConfigError(f"data.sequence_length must be a positive integer; got {sequence_length!r}")
    train_file, test_file, source = _locate_imdb(path)
    rng = np.random.default_rng(seed)
    train_texts, test_texts = [], []
    for file, n, texts in ((train_file, limit, train_texts), (test_file, test_limit, test_texts)):
        everything, _ = _read_jsonl(file)
        texts.extend(everything[i] for i in rng.permutation(len(everything))[:n])
    if tokenizer == "bpe":
        vocabulary = train_bpe([clean(t) for t in train_texts], num_words)
    else:
        if num_words <= 4:
            raise ConfigError(f"data.num_words must exceed 4 (indices 0-3 are reserved); got {num_words}")
        vocabulary = {**build_vocabulary(map(tokenize, train_texts), num_words), "language_model": True}
    codec = TextCodec(vocabulary)
    (x_train, y_train), (x_test, y_test) = (windows(codec.encode(t), sequence_length)
                                            for t in (train_texts, test_texts))
    if not len(x_train):
        raise ConfigError(f"data: the training reviews make no window of sequence_length + 1 = {sequence_length + 1} "
                          f"tokens; raise data.limit or lower data.sequence_length")
    vocabulary["sequence_length"] = sequence_length
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test if len(x_test) else None,
                   y_test=y_test if len(x_test) else None, source=source, extra={"vocabulary": vocabulary},
                   name="imdb_lm")
