import gzip
import json

import numpy as np
import pytest

from dlcli.data import load_dataset
from dlcli.data.language import START, TextCodec, windows
from dlcli.errors import ConfigError


@pytest.fixture
def tiny_reviews(tmp_path):
    texts = ("Bad, awful and boring. ", "A good film.<br />Great fun! ")
    rows = [{"label": i % 2, "text": texts[i % 2] * (i + 3)} for i in range(12)]
    for split in ("train", "test"):
        with gzip.open(tmp_path / f"{split}.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_windows_are_the_stream_and_its_next_tokens():
    x, y = windows([[1, 5, 6, 7], [1, 8, 9], [1, 4]], 3)
    assert x.tolist() == [[1, 5, 6], [7, 1, 8]] and y.tolist() == [[5, 6, 7], [1, 8, 9]]
    assert x.dtype == np.int32 and y.dtype == np.int64


@pytest.mark.parametrize("tokenizer", ["word", "bpe"])
def test_imdb_lm_predicts_the_next_token_of_the_review_text(tiny_reviews, tokenizer):
    d = load_dataset({"type": "imdb_lm", "path": str(tiny_reviews), "tokenizer": tokenizer, "num_words": 300,
                      "sequence_length": 8, "limit": 10, "test_limit": 4})
    assert d.x_train.shape[1] == 8 and d.y_train.shape == d.x_train.shape and len(d.x_train) > 10
    assert np.array_equal(d.x_train[1:, 0], d.y_train[:-1, -1])  # consecutive windows of one stream
    assert np.array_equal(d.x_train[:, 1:], d.y_train[:, :-1])
    assert (d.x_train == START).sum() >= 9 and not (d.x_train == 0).any()  # a START per review, no padding
    vocabulary = json.loads(json.dumps(d.extra["vocabulary"]))  # stored as JSON in the run
    assert vocabulary["language_model"] and vocabulary["sequence_length"] == 8
    codec = TextCodec(vocabulary)
    ids = codec.encode(["Great fun! A good film."])[0]
    assert ids[0] == START and max(ids) < codec.size <= 300
    text = codec.decode(ids[1:])
    assert text == ("great fun a good film" if tokenizer == "word" else "Great fun! A good film.")


def test_bpe_training_is_reproducible(tiny_reviews):
    spec = {"type": "imdb_lm", "path": str(tiny_reviews), "tokenizer": "bpe", "num_words": 300, "sequence_length": 8}
    first, second = load_dataset(spec), load_dataset(spec)
    assert first.extra["vocabulary"]["bpe"] == second.extra["vocabulary"]["bpe"]
    assert np.array_equal(first.x_train, second.x_train)


@pytest.mark.parametrize("change, message", [({"tokenizer": "chars"}, "data.tokenizer must be one of word, bpe"),
                                              ({"sequence_length": 0}, "data.sequence_length must be a positive"),
                                              ({"tokenizer": "bpe", "num_words": 100}, "at least 258"),
                                              ({"sequence_length": 100000}, "make no window")])
def test_imdb_lm_bad_settings_name_the_key(tiny_reviews, change, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset({"type": "imdb_lm", "path": str(tiny_reviews), "num_words": 300, **change})
