"""The categorical preprocessing layers against real Keras 3 (tests/fixtures/keras/make_preprocessing.py wrote the
fixture: Keras' outputs, and what its adapt learned), and the gradient table."""
import json
from pathlib import Path

import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ConfigError, DlcliError
from tests.gradcheck import check_layer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "keras"

# Gradient-check table: indices are piecewise constant, so only the (empty) parameter gradients are checked and
# backward must give an input gradient of zeros (int_high: integer inputs)
GRADIENT_CASES = {
    "Discretization": [({"bin_boundaries": [-0.5, 0.5], "output_mode": "one_hot"}, (1,), {"int_high": 3})],
    "IntegerLookup": [({"vocabulary": [0, 2], "output_mode": "multi_hot"}, (3,), {"int_high": 4})],
    "StringLookup": [({"vocabulary": ["a", "b"]}, (2,), {"int_high": 1, "inputs": [np.array([["a", "c"]] * 3)]})],
    "CategoryEncoding": [({"num_tokens": 4, "output_mode": "count"}, (3,), {"int_high": 4})],
    "Hashing": [({"num_bins": 3}, (2,), {"int_high": 9})],
    "HashedCrossing": [({"num_bins": 5}, [(1,), (1,)], {"int_high": 9})],
}


@pytest.mark.parametrize("name,args,shape,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                  for a, s, o in cases])
def test_gradients_and_config_round_trip(name, args, shape, opts):
    layer = layers.LAYERS.get(name)(**args)
    out = check_layer(layer, shape, **opts)
    grads = layer.backward(np.ones_like(out))
    for g in (grads if isinstance(grads, list) else [grads]):
        assert g is None if name == "StringLookup" else not g.any()
    config = layer.get_config()
    assert layers.LAYERS.get(name)(**{k: v for k, v in config.items() if k != "type"}).get_config() == config


def _cases():
    data = np.load(FIXTURES / "catalogue_preprocessing.npz")
    spec = json.loads(str(data["spec"]))
    return [pytest.param(case, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")},
                         id=f"{i}-{case['type']}") for i, case in enumerate(spec)]


@pytest.mark.parametrize("case,arrays", _cases())
def test_layer_matches_keras(case, arrays):
    layer = layers.LAYERS.get(case["type"])(**case["args"])
    if "adapt" in arrays:
        layer.adapt(arrays["adapt"], batch_size=len(arrays["adapt"]))  # one batch, as Keras was given it
        learned = {k: layer.get_config()[k] for k in case["adapted"]}
        np.testing.assert_allclose(learned.pop("bin_boundaries", 0), case["adapted"].pop("bin_boundaries", 0),
                                   rtol=1e-6)
        np.testing.assert_allclose(learned.pop("idf_weights", 0), case["adapted"].pop("idf_weights", 0), rtol=1e-6)
        assert learned == case["adapted"]
    xs = [arrays[f"x{k}"] for k in range(sum(k.startswith("x") for k in arrays))]
    xs = [x if x.dtype.kind == "U" else x.astype(np.float32) for x in xs]  # dlcli's numbers are float32
    y = layer(xs if len(xs) > 1 else xs[0])
    assert y.shape == arrays["y"].shape and y.dtype == np.float32
    np.testing.assert_allclose(y, arrays["y"].astype(np.float64), rtol=1e-6)
    shape = [x.shape[1:] for x in xs] if len(xs) > 1 else xs[0].shape[1:]
    assert layer.output_shape(shape) == y.shape[1:]


def test_discretization_adapts_chunk_by_chunk_as_keras_merges_batches():
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 3.0, 50_000).astype(np.float32)
    whole, chunked = layers.Discretization(num_bins=8), layers.Discretization(num_bins=8)
    whole.adapt(x, batch_size=len(x))
    chunked.adapt(x, batch_size=4096)
    # approximate quantiles: within the summary's epsilon of the true ones, whatever the chunking
    for layer in (whole, chunked):
        ranks = np.searchsorted(np.sort(x), layer.bin_boundaries) / len(x)
        np.testing.assert_allclose(ranks, np.arange(1, 8) / 8, atol=0.02)


def test_lookup_vocabulary_round_trips_through_the_config():
    lookup = layers.StringLookup(output_mode="one_hot")
    lookup.adapt(np.array([["b"], ["a"], ["b"], ["c"]]))
    config = lookup.get_config()
    assert config["vocabulary"] == ["b", "c", "a"]
    again = layers.StringLookup(**{k: v for k, v in config.items() if k != "type"})
    x = np.array([["a"], ["z"]])
    np.testing.assert_array_equal(again(x), lookup(x))
    # a vocabulary led by the special tokens (Keras' get_vocabulary(), a .keras asset) drops them
    assert layers.StringLookup(vocabulary=["[UNK]", "b", "c"]).vocabulary == ["b", "c"]


def test_refusals_name_the_reason():
    with pytest.raises(ConfigError, match="SipHash"):
        layers.Hashing(num_bins=3, salt=7)
    with pytest.raises(ConfigError, match="sparse"):
        layers.CategoryEncoding(num_tokens=3, sparse=True)
    with pytest.raises(ConfigError, match="text"):
        layers.StringLookup(vocabulary=["a"], invert=True)
    with pytest.raises(ConfigError, match="repeats"):
        layers.IntegerLookup(vocabulary=[1, 2, 1])
    with pytest.raises(DlcliError, match=r"outside \[0, 3\)"):
        layers.CategoryEncoding(num_tokens=3)(np.array([[1.0, 3.0]], np.float32))
    with pytest.raises(DlcliError, match="integers"):
        layers.IntegerLookup(vocabulary=[1])(np.array([[1.5]], np.float32))


def test_export_runs_lookups_discretization_and_encoding_in_onnxruntime_and_refuses_hashing(tmp_path):
    pytest.importorskip("onnxruntime")
    from dlcli.errors import ExportError
    from dlcli.interop.onnx_export import run_onnx, to_onnx
    from dlcli.models import Model

    colour, size, code = (layers.Input((1,), name="colour", dtype="string"), layers.Input((3,), name="size"),
                          layers.Input((2,), name="code"))
    parts = [layers.StringLookup(vocabulary=["red", "blue", "teal"], output_mode="one_hot")(colour),
             layers.Flatten()(layers.Discretization(bin_boundaries=[-1.0, 0.0, 2.5], output_mode="one_hot")(size)),
             layers.IntegerLookup(vocabulary=[42, 7, 3], output_mode="multi_hot")(code),
             layers.CategoryEncoding(num_tokens=5, output_mode="count")(
                 layers.IntegerLookup(vocabulary=[42, 7, 3])(code)),
             layers.Discretization(bin_boundaries=[0.0, 1.0], output_mode="count")(size)]
    model = Model([colour, size, code], layers.Concatenate()(parts))
    rng = np.random.default_rng(0)
    xs = [rng.choice(["red", "blue", "teal", "plum", ""], (9, 1)), rng.normal(1, 2, (9, 3)).astype(np.float32),
          rng.choice([42, 7, 3, 5, -1], (9, 2)).astype(np.float32)]
    want = model.predict(xs)
    got = run_onnx(to_onnx(model).SerializeToString(),
                   {"colour": xs[0].astype(object), "size": xs[1], "code": xs[2]})[0]
    np.testing.assert_array_equal(got, want)
    hashed = Model([colour], layers.Hashing(num_bins=4)(colour))
    with pytest.raises(ExportError, match="FarmHash"):
        to_onnx(hashed)
