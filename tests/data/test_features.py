"""dlcli.data.features against Keras 3's preprocessing layers: the expected values are the outputs Keras documents
in its layers' docstrings (hashing.py, hashed_crossing_test.py, discretization.py, string_lookup.py), and
Fingerprint64 against the FarmHash C++ library (pyfarmhash bindings)."""
import random

import numpy as np
import pytest

from dlcli.data import features as fs
from dlcli.data.farmhash import fingerprint64
from dlcli.data.table_file import Column
from dlcli.errors import ConfigError


def column(values, missing=None):
    values = np.asarray(values)
    return Column(values, np.zeros(len(values), bool) if missing is None else np.asarray(missing))


def test_fingerprint64_matches_farmhash_for_every_length_branch():
    farmhash = pytest.importorskip("farmhash")
    rng = random.Random(0)
    for n in [*range(0, 130), 255, 256, 257, 1000]:  # 0-16, 17-32, 33-64 and the 64-byte loop
        text = "".join(chr(rng.randrange(32, 0x250)) for _ in range(n))
        assert fingerprint64(text) == farmhash.fingerprint64(text), n


def test_hashing_matches_keras_documented_bins():
    # keras.layers.Hashing(num_bins=3)([["A"], ["B"], ["C"], ["D"], ["E"]]) -> [1, 0, 1, 1, 2]
    assert fs.hash_to_bins(np.array(list("ABCDE")), 3).tolist() == [1, 0, 1, 1, 2]


def test_hashed_crossing_matches_keras_test():
    # HashedCrossing(num_bins=5)((["A", "B", "A", "B", "A"], [101, 101, 101, 102, 102])) -> [1, 4, 1, 1, 3]
    crossed = fs.hashed_cross([np.array(list("ABABA")), np.array([101, 101, 101, 102, 102])], 5)
    assert crossed.tolist() == [1, 4, 1, 1, 3]


def test_discretization_adapt_matches_keras_docstring():
    values = np.array([-1.5, 1.0, 3.4, .5, 0.0, 3.0, 1.3, 0.0])
    state = fs.adapt({"x": {"type": "float_discretized", "num_bins": 4, "bin_boundaries": None,
                            "output_mode": "one_hot"}}, [], {"x": column(values)})
    block = fs.transform(state, {"x": column(values)})
    assert block.argmax(1).tolist() == [0, 2, 3, 2, 1, 3, 3, 1]  # Keras: [[0, 2, 3, 2], [1, 3, 3, 1]]
    assert state["features"]["x"]["width"] == 4


def test_string_lookup_vocabulary_order_and_oov_match_keras():
    specs, _ = fs.feature_specs({"s": "string_categorical"})
    data = np.array(["a", "c", "d", "d", "z", "b"])
    state = fs.adapt(specs, [], {"s": column(data)})
    assert state["features"]["s"]["vocabulary"] == ["d", "z", "c", "b", "a"]  # by count, ties by inverse order
    index = fs.lookup(column(data), state["features"]["s"]["vocabulary"], 1, strings=True)
    assert index.tolist() == [5, 3, 1, 1, 2, 4]  # Keras: [[5, 3, 1], [1, 2, 4]]
    unseen = fs.lookup(column(np.array(["m", "z", "b"])), ["a", "b", "c", "d"], 2, strings=True)
    assert unseen.tolist() == [0, 1, 3]  # StringLookup(vocabulary=abcd, num_oov_indices=2): m -> 0, z -> 1


def test_integer_lookup_floormod_oov_max_tokens_and_missing():
    specs, _ = fs.feature_specs({"i": {"type": "integer_categorical", "max_tokens": 4, "num_oov_indices": 2}})
    data = column(np.array([7, 7, 7, 3, 3, 9, 5]), np.array([0, 0, 0, 0, 0, 0, 1], bool))
    f = fs.adapt(specs, [], {"i": data})["features"]["i"]
    assert f["vocabulary"] == [7, 3] and f["width"] == 4  # max_tokens counts the two OOV indices; 5 was missing
    index = fs.lookup(column(np.array([7, 3, 9, 10, 5])), f["vocabulary"], 2, strings=False)
    assert index.tolist() == [2, 3, 1, 0, 1]  # unseen values: value % 2 (Keras' oov_method floormod)


def test_numeric_missing_cells_take_the_mean_and_get_an_indicator_column():
    specs, _ = fs.feature_specs({"n": "float_normalized", "r": {"type": "float_rescaled", "scale": 2.0,
                                                              "offset": 1.0}})
    cols = {"n": column(np.array([1.0, 3.0, 0.0]), np.array([0, 0, 1], bool)), "r": column(np.array([1.0, 2.0, 3.0]))}
    state = fs.adapt(specs, [], cols)
    out = fs.transform(state, cols)
    assert state["width"] == 3  # n: value + was-missing; r: value (none missing)
    np.testing.assert_allclose(out[:, 0], [-1, 1, 0])  # (x - 2) / 1, the missing cell is the mean
    np.testing.assert_array_equal(out[:, 1], [0, 0, 1])
    np.testing.assert_allclose(out[:, 2], [3, 5, 7])


def test_date_is_year_and_cyclic_month_weekday_day_of_year():
    days = np.array(["2012-01-01", "2012-07-01", "2013-12-31"], "datetime64[D]")
    specs, _ = fs.feature_specs({"d": "date"})
    out = fs.transform(fs.adapt(specs, [], {"d": column(days)}), {"d": column(days)})
    assert out.shape == (3, 7)
    np.testing.assert_allclose(out[0, 1:3], [0, 1], atol=1e-6)  # January: angle 0
    np.testing.assert_allclose(out[1, 1:3], [np.sin(np.pi), np.cos(np.pi)], atol=1e-6)  # July: half a turn
    assert out[0, 3] == pytest.approx(np.sin(2 * np.pi * 6 / 7))  # 2012-01-01 was a Sunday (Monday = 0)


def test_concatenation_order_is_sorted_features_then_crosses():
    specs, crosses = fs.feature_specs({"b": "string_categorical", "a": "float"},
                                      [{"features": ["b", "b"], "crossing_dim": 4}])
    cols = {"a": column(np.array([5.0, 6.0])), "b": column(np.array(["x", "y"]))}
    state = fs.adapt(specs, crosses, cols)
    assert [name for name, _, _ in fs.describe(state)] == ["a", "b", "b_X_b"]
    out = fs.transform(state, cols)
    assert out.shape == (2, 1 + 3 + 4) and out[:, 0].tolist() == [5.0, 6.0]


def test_bad_specs_are_reported_together():
    with pytest.raises(ConfigError) as e:
        fs.feature_specs({"a": "string_categorica", "b": {"type": "float_discretized", "num_bin": 3}},
                         [{"features": ["a", "zz"]}])
    message = str(e.value)
    assert "did you mean 'string_categorical'" in message and "num_bin" in message and "'zz'" in message


def test_text_is_textvectorization_multi_hot_count_and_tf_idf_with_oov_column_0():
    docs = np.array(["the cat sat", "the dog", "the cat and the hat", ""])
    cols = {"t": column(docs, np.array([0, 0, 0, 1], bool))}
    for mode in ("multi_hot", "count", "tf_idf"):
        specs, _ = fs.feature_specs({"t": {"type": "text", "max_tokens": 4, "output_mode": mode}})
        state = fs.adapt(specs, [], cols)
        words = state["features"]["t"]["vocabulary"]["words"]
        assert words == ["the", "cat", "sat"] and state["width"] == 4  # 3 most frequent words + the OOV column
        out = fs.transform(state, {"t": column(np.array(["the the cat zebra"]))})
        expected = {"multi_hot": [1, 1, 1, 0], "count": [1, 2, 1, 0]}.get(mode)
        if expected is None:  # tf_idf: count x log(1 + documents / (1 + documents with the word)), OOV the mean
            idf = np.log(1 + 3 / (1 + np.array([3, 2, 1])))
            expected = [idf.mean(), 2 * idf[0], idf[1], 0]
        np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="multi_hot, count, tf_idf"):
        fs.feature_specs({"t": {"type": "text", "output_mode": "int"}})
