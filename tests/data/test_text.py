import gzip
import json

import numpy as np
import pytest

from dlcli.data import load_dataset
from dlcli.data.text import build_vocabulary, encode_texts, pad_sequences, tokenize
from dlcli.errors import ConfigError, DlcliError

from tests.conftest import require_dataset


def test_tokenize():
    assert tokenize("Don't STOP<br /><br />me-now, 'quoted' 10/10!") == ["don't", "stop", "me", "now", "quoted",
                                                                        "10", "10"]


def test_pad_sequences_matches_keras_conventions():
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], []]
    assert pad_sequences(seqs, 3).tolist() == [[1, 2, 3], [0, 0, 4], [7, 8, 9], [0, 0, 0]]
    assert pad_sequences(seqs, 4, "post", "post").tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 7, 8],
                                                               [0, 0, 0, 0]]
    assert pad_sequences(seqs).shape == (4, 5)
    with pytest.raises(ConfigError, match="'pre' or 'post'"):
        pad_sequences(seqs, 3, padding="left")


def test_vocabulary_indices():
    tokens = [["b", "a", "b"], ["c", "b", "a", "d"]]
    v = build_vocabulary(tokens, num_words=7, maxlen=4)  # 7 - 3 reserved - 1 = 3 words
    assert v["words"] == ["b", "a", "c"]
    # 1 start, b=4, a=5, c=6, OOV d=2; 'pre' truncation keeps the last 4 (drops the start mark).
    assert encode_texts(["B a b", "c b a d", "zz"], v).tolist() == [[1, 4, 5, 4], [6, 4, 5, 2], [0, 0, 1, 2]]
    assert encode_texts("a", v, maxlen=3, padding="post").tolist() == [[1, 5, 0]]
    assert json.loads(json.dumps(v)) == v  # stored as JSON in the run directory


@pytest.fixture
def tiny_imdb(tmp_path):
    rows = [{"label": i % 2, "text": ("good great fun<br />" if i % 2 else "bad awful boring ") * (i + 1)}
            for i in range(10)]
    for split in ("train", "test"):
        with gzip.open(tmp_path / f"{split}.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_imdb_format_from_path(tiny_imdb):
    d = load_dataset({"type": "imdb", "path": str(tiny_imdb), "maxlen": 8, "limit": 6, "test_limit": 6})
    assert d.x_train.shape == (6, 8) and d.x_train.dtype == np.int32 and d.y_train.dtype == np.int64
    assert d.classes == ["negative", "positive"] and len(d.y_test) == 6
    vocab = d.extra["vocabulary"]
    positive = encode_texts(["good great fun"], vocab)[0]
    assert positive[-4] == 1 and set(positive[-3:]) <= set(range(4, 10))
    for x, y in zip(d.x_train, d.y_train):  # each review encodes its own words
        expected = encode_texts(["good great fun" if y else "bad awful boring"], vocab)[0][-3:]
        assert set(x[x > 1]) == set(expected)


def test_imdb_bad_file_and_missing(tiny_imdb, tmp_path):
    with gzip.open(tiny_imdb / "test.jsonl.gz", "wt") as f:
        f.write('{"label": 1, "text": "ok"}\n{"txt": "x"}\n')
    with pytest.raises(DlcliError, match=r"test.jsonl.gz, line 2: expected a JSON object with 'text' and 'label'"):
        load_dataset({"type": "imdb", "path": str(tiny_imdb)})
    with pytest.raises(DlcliError, match="were not found"):
        load_dataset({"type": "imdb"})
    with pytest.raises(ConfigError, match="num_words"):
        load_dataset({"type": "imdb", "path": str(tiny_imdb), "num_words": 3})


def test_real_imdb_small(monkeypatch):
    monkeypatch.setenv("DLCLI_DATA_DIR", str(require_dataset("imdb-reviews").parent))
    d = load_dataset({"type": "imdb", "limit": 400, "test_limit": 400, "maxlen": 100})
    assert d.x_train.shape == (400, 100) and d.x_test.shape == (400, 100)
    assert 120 < d.y_train.sum() < 280  # shuffled: the files are sorted by label
    assert d.x_train.max() < 10000 and (d.x_train == 1).sum() > 0
    assert d.extra["vocabulary"]["words"][0] == "the"
