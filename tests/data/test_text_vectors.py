"""Text as vectors (Keras TextVectorization's multi_hot / count / tf_idf) built per batch, and type: text_folder."""
import numpy as np
import pytest

from dlcli.data import load_dataset
from dlcli.data.text import encode_texts, vector_vocabulary
from dlcli.errors import DlcliError
from tests.conftest import require_dataset


def test_vector_modes_follow_text_vectorization():
    docs = [["a", "b", "a"], ["b", "c"], ["d"]]
    multi, count, tfidf = (vector_vocabulary(docs, 4, m) for m in ("multi_hot", "count", "tf_idf"))
    assert multi["words"] == ["a", "b", "c"]  # num_words - 1 words after the OOV column
    text = ["a a b zebra", "c"]
    assert encode_texts(text, multi).tolist() == [[1, 1, 1, 0], [0, 0, 0, 1]]  # column 0: out of vocabulary
    assert encode_texts(text, count).tolist() == [[1, 2, 1, 0], [0, 0, 0, 1]]
    idf = np.log(1 + 3 / (1 + np.array([1, 2, 1])))  # Keras: log(1 + documents / (1 + document frequency))
    np.testing.assert_allclose(tfidf["idf"], [idf.mean(), *idf])  # OOV: the mean weight, as Keras pads it
    np.testing.assert_allclose(encode_texts(text, tfidf), [[idf.mean(), 2 * idf[0], idf[1], 0], [0, 0, 0, idf[2]]],
                               rtol=1e-6)


@pytest.mark.slow
def test_imdb_multi_hot_is_built_per_batch():
    folder = str(require_dataset("imdb-reviews"))
    d = load_dataset({"type": "imdb", "path": folder, "num_words": 1000, "output_mode": "multi_hot", "limit": 300})
    assert len(d.x_train) == 300 and d.x_train.sample_shapes == [(1000,)]
    assert d.x_train.ids.nbytes < 300 * 1000  # token ids, not the dense matrix
    batch = d.x_train.take(np.array([0, 5, 9]))[0]
    assert batch.shape == (3, 1000) and set(np.unique(batch)) == {0.0, 1.0}
    words = d.extra["vocabulary"]["words"]
    from dlcli.data.text import _locate_imdb, _read_jsonl, tokenize

    texts, _ = _read_jsonl(_locate_imdb(folder)[0])
    order = np.random.default_rng(113).permutation(len(texts))
    first = set(tokenize(texts[order[0]]))
    assert {words[c - 1] for c in np.flatnonzero(batch[0]) if c} == first & set(words)


@pytest.fixture
def reviews(tmp_path):
    for split, n in (("train", 12), ("test", 4)):
        for label, word in (("neg", "awful"), ("pos", "great")):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.txt").write_text(f"A {word} film, truly {word}. Number {i}.", encoding="utf-8")
    return tmp_path


def test_text_folder_int_and_vectors(reviews):
    d = load_dataset({"type": "text_folder", "directory": str(reviews / "train"),
                      "test_directory": str(reviews / "test"), "maxlen": 6, "num_words": 20})
    assert d.classes == ["neg", "pos"] and d.x_train.shape == (24, 6) and d.x_test.shape == (8, 6)
    assert d.y_train.tolist() == [0] * 12 + [1] * 12
    v = load_dataset({"type": "text_folder", "directory": str(reviews / "train"), "output_mode": "count",
                      "label_mode": "binary", "num_words": 20})
    assert v.y_train.shape == (24, 1) and v.x_train.take(slice(0, 2))[0].shape == (2, 20)
    (reviews / "train" / "neg" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DlcliError, match=r"neg/bad\.txt: cannot read as UTF-8"):
        load_dataset({"type": "text_folder", "directory": str(reviews / "train")})
    skipped = load_dataset({"type": "text_folder", "directory": str(reviews / "train"), "on_bad_file": "skip"})
    assert len(skipped.x_train) == 24 and len(skipped.extra["folder"]["skipped"]) == 1


def test_text_folder_max_length_cuts_characters_in_training_and_predict(tmp_path):
    """Keras' max_length keeps a text's first N characters before tokenizing; predict reads a folder the same way."""
    from dlcli import run_files
    from dlcli.data.inputs import read_inputs

    for label, word in (("neg", "awful"), ("pos", "great")):
        (tmp_path / "texts" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "texts" / label / f"{i}.txt").write_text(f"the film {i} was " + f"{word} " * 5)
    spec = {"type": "text_folder", "directory": str(tmp_path / "texts"), "max_length": 14, "maxlen": 8}
    d = load_dataset(spec)
    assert d.extra["vocabulary"]["words"] == ["the", "film", "was", "0", "1", "2"]  # "the film 0 was" is 14
    assert (d.x_train[:, :3] == 0).all() and (d.x_train[:, 3:] > 0).all()  # 4 words and the start mark, padded
    run_files.atomic_write_json(tmp_path / "vocabulary.json", d.extra["vocabulary"])
    x, labels = read_inputs([tmp_path / "texts"], tmp_path, spec, model=None)
    assert len(labels) == 6
    np.testing.assert_array_equal(x[0], d.x_train)


def test_text_folder_run_predicts_a_folder(reviews, tmp_path):
    from typer.testing import CliRunner

    from dlcli.cli import app

    config = tmp_path / "text.yaml"
    config.write_text(f"""\
name: reviews
seed: 0
data: {{type: text_folder, directory: {reviews / 'train'}, test_directory: {reviews / 'test'},
        output_mode: multi_hot, num_words: 30}}
model:
  input_shape: [30]
  layers: [{{type: Dense, units: 1, activation: sigmoid}}]
compile: {{optimizer: {{type: adam, learning_rate: 0.1}}, loss: binary_crossentropy, metrics: [accuracy]}}
train: {{epochs: 15, batch_size: 8}}
""")
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(config), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "found 24 files in 2 classes (neg 12, pos 12)" in result.output
    (run,) = (tmp_path / "runs").iterdir()
    result = runner.invoke(app, ["predict", str(run), str(reviews / "test"), "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    rows = [r.split(",") for r in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert len(rows) == 8 and [r[1] for r in rows] == ["pos" if "/pos/" in r[0] else "neg" for r in rows]
    # files named one by one are documents too, as training reads them (not one text per line), and a sigmoid
    # unit's outputs are written as Keras' predict gives them, (N, 1)
    by_file = {r[0]: r for r in rows}
    one, two = reviews / "test" / "pos" / "0.txt", reviews / "test" / "neg" / "1.txt"
    one.write_text("A great film,\ntruly great.\nNumber 0.", encoding="utf-8")  # one document over three lines
    result = runner.invoke(app, ["predict", str(run), str(one), str(two), "-o", str(tmp_path / "p.npy")])
    assert result.exit_code == 0, result.output
    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (2, 1)
    np.testing.assert_allclose(probs[:, 0], [float(by_file[str(f)][3]) for f in (one, two)], rtol=1e-5)
    assert runner.invoke(app, ["predict", str(run), str(one), "-o", str(tmp_path / "one.npy")]).exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), probs[:1])
