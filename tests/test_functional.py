"""The functional API: graphs with fan-out, merges and shared layers, in Python and YAML; multi-input/-output."""
import shutil
import warnings

import numpy as np
import pytest

from dlcli import builder, layers, models
from dlcli.config import parse_config
from dlcli.errors import ConfigError, ShapeError
from tests.gradcheck import assert_close, numeric_grad


def to_float64(model):
    for layer in model.layers:
        layer.dtype = "float64"
        for p in layer.weights:
            p.value = p.value.astype(np.float64)
            if p.grad is not None:
                p.grad = np.zeros_like(p.value)


def check_model_gradients(model, xs, ys, training=False):
    """dLoss/dparam of the whole compiled model (losses, loss weights, fused softmax) vs central differences."""
    to_float64(model)

    def loss():
        return model.compute_loss(ys, model.graph.forward(xs, training), with_grads=False)[0]

    _, _, grads = model.compute_loss(ys, model.graph.forward(xs, training))
    model.graph.backward(grads)
    checked = 0
    for p in model.trainable_weights:
        analytic = p.grad.copy()
        assert_close(analytic, numeric_grad(loss, p.value, max_checks=20), p.path)
        checked += 1
    return checked


def fanout_merge_shared_model():
    """a, b -> shared encoder (two calls); enc(a) fans out to a Dense, an Add and an auxiliary head."""
    a, b = layers.Input((5,), name="a"), layers.Input((5,), name="b")
    enc = layers.Dense(4, activation="tanh", name="enc")
    ea, eb = enc(a), enc(b)
    h = layers.Dense(4, activation="sigmoid", name="h")(ea)
    merged = layers.Add(name="sum")([ea, eb, h])
    both = layers.Concatenate(name="cat")([merged, layers.Multiply(name="gate")([ea, h])])
    out = layers.Dense(3, activation="softmax", name="out")(both)
    aux = layers.Dense(1, name="aux")(ea)
    return models.Model([a, b], [out, aux], name="net")


def data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return ([rng.normal(size=(n, 5)), rng.normal(size=(n, 5))],
            [rng.integers(0, 3, n), rng.normal(size=(n, 1))])


def test_whole_graph_gradients_with_fanout_merge_and_shared_layer():
    model = fanout_merge_shared_model()
    model.compile("sgd", loss={"out": "sparse_categorical_crossentropy", "aux": "mse"},
                  loss_weights={"out": 1.0, "aux": 0.3})
    assert model.fused[0] is not None  # the softmax + cross-entropy shortcut is part of what is checked
    xs, ys = data()
    assert check_model_gradients(model, xs, ys) == 8  # enc, h, out, aux kernels and biases
    assert sum(layer is model.get_layer("enc") for layer in model.layers) == 1


def test_shared_layer_gradient_is_the_sum_of_both_calls():
    a, b = layers.Input((3,), name="a"), layers.Input((3,), name="b")
    enc = layers.Dense(2, name="enc", use_bias=False)
    model = models.Model([a, b], layers.Add()([enc(a), enc(b)]))
    x1, x2 = np.ones((1, 3)), 2 * np.ones((1, 3))
    model.graph.forward([x1, x2])
    model.graph.backward([np.ones((1, 2))])
    np.testing.assert_allclose(enc.kernel.grad, (x1 + x2).T @ np.ones((1, 2)))


def test_multi_output_weighted_loss_and_keras_metric_names():
    model = fanout_merge_shared_model()
    model.compile("adam", loss={"out": "sparse_categorical_crossentropy", "aux": "mse"},
                  loss_weights={"out": 2.0, "aux": 0.5}, metrics={"out": ["accuracy"], "aux": ["mae"]})
    (xa, xb), (y_out, y_aux) = data(8)
    logs = model.evaluate({"a": xa, "b": xb}, {"out": y_out, "aux": y_aux}, return_dict=True)
    assert list(logs) == ["loss", "out_loss", "aux_loss", "out_accuracy", "aux_mae"]
    p_out, p_aux = model.predict([xa, xb])
    ce = -np.log(p_out[np.arange(8), y_out]).mean()
    mse = ((p_aux - y_aux) ** 2).mean()
    assert logs["out_loss"] == pytest.approx(ce, rel=1e-5) and logs["aux_loss"] == pytest.approx(mse, rel=1e-5)
    assert logs["loss"] == pytest.approx(2.0 * ce + 0.5 * mse, rel=1e-5)
    assert logs["aux_mae"] == pytest.approx(np.abs(p_aux - y_aux).mean(), rel=1e-5)
    history = model.fit([xa, xb], [y_out, y_aux], epochs=1, batch_size=4, verbose=0, validation_split=0.25, seed=0)
    assert {"out_loss", "aux_loss", "out_accuracy", "val_out_accuracy", "val_aux_mae"} <= set(history.history)


def test_compile_rejects_unknown_output_names():
    model = fanout_merge_shared_model()
    with pytest.raises(ConfigError, match=r"unknown output 'aux2' \(did you mean 'aux'\?\)"):
        model.compile("adam", loss={"out": "mse", "aux2": "mse"})


def test_sequential_equals_the_same_chain_as_a_graph():
    seq = models.Sequential([layers.Dense(6, activation="relu", input_shape=(4,)), layers.Dropout(0.0),
                             layers.Dense(3, activation="softmax")])
    inp = layers.Input((4,))
    x = layers.Dense(6, activation="relu")(inp)
    x = layers.Dropout(0.0)(x)
    graph = models.Model(inp, layers.Dense(3, activation="softmax")(x))
    graph.set_weights(seq.get_weights())
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 4)).astype(np.float32), rng.integers(0, 3, 5)
    np.testing.assert_array_equal(seq.predict(x), graph.predict(x))
    grads = []
    for model in (seq, graph):
        model.compile("sgd", loss="sparse_categorical_crossentropy")
        _, _, g = model.compute_loss([y], model.graph.forward([x], training=True))
        model.graph.backward(g)
        grads.append([p.grad.copy() for p in model.trainable_weights])
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


RESIDUAL = """
name: residual
data: {type: npz, path: data.npz, x: {img: x_img, side: x_side}, y: {out: y, aux: y_aux}}
model:
  type: functional
  inputs: [{name: img, shape: [6, 6, 1]}, {name: side, shape: [3]}]
  layers:
    - {name: c1, type: Conv2D, filters: 4, kernel_size: 3, padding: same, activation: relu, inputs: img}
    - {name: c2, type: Conv2D, filters: 4, kernel_size: 3, padding: same, inputs: c1}
    - {name: skip, type: Add, inputs: [c1, c2]}
    - {name: gap, type: GlobalAveragePooling2D, inputs: skip}
    - {name: s1, type: Dense, units: 4, activation: tanh, inputs: side}
    - {name: s2, shares: s1, inputs: side_again}
    - {name: side_again, type: Dense, units: 3, inputs: side}
    - {name: joined, type: Concatenate, inputs: [gap, s1, s2]}
    - {name: out, type: Dense, units: 2, activation: softmax, inputs: joined}
    - {name: aux, type: Dense, units: 1, inputs: s2}
  outputs: [out, aux]
compile:
  optimizer: adam
  loss: {out: sparse_categorical_crossentropy, aux: mse}
  loss_weights: {out: 1.0, aux: 0.25}
  metrics: {out: [accuracy]}
train: {epochs: 2, batch_size: 8, validation_split: 0.25}
"""


def build(text, *sets):
    from dlcli.builder import build_model

    return build_model(parse_config(text, "test.yaml", list(sets)))


def test_yaml_graph_builds_in_any_order_with_shares_and_round_trips():
    model = build(RESIDUAL)
    assert model.input_names == ["img", "side"] and model.output_names == ["out", "aux"]
    rows = {r["name"]: r for r in model.summary_rows()}
    assert rows["skip"]["connected_to"] == ["c1", "c2"]
    assert rows["s2 (shares s1)"]["connected_to"] == ["side_again"] and rows["s2 (shares s1)"]["params"] == 0
    assert rows["joined"]["connected_to"] == ["gap", "s1", "s2"]
    again = builder.model_from_config(model.get_config())
    assert again.get_config() == model.get_config()
    again.set_weights(model.get_weights())
    x = [np.random.default_rng(0).normal(size=(2, 6, 6, 1)), np.ones((2, 3))]
    for a, b in zip(model.predict(x), again.predict(x)):
        np.testing.assert_array_equal(a, b)


def test_yaml_two_input_two_output_model_trains_from_named_npz_arrays(tmp_path, monkeypatch):
    from dlcli.data.dataset import load_fitted
    from dlcli.run_files import RunDir
    from dlcli.trainer import Run

    rng = np.random.default_rng(0)
    n = 40
    np.savez(tmp_path / "data.npz", x_img=rng.normal(size=(n, 6, 6)), x_side=rng.normal(size=(n, 3)),
             y=rng.integers(0, 2, n), y_aux=rng.normal(size=(n, 1)))
    monkeypatch.chdir(tmp_path)
    config = parse_config(RESIDUAL, "test.yaml", ["data.test_split=0.25"])
    model = build(RESIDUAL)
    data = load_fitted(config, model)
    assert [a.shape for a in data.x_train.arrays] == [(22, 6, 6, 1), (22, 3)]  # (N, 6, 6) fed as (6, 6, 1)
    assert data.sizes() == {"train": 22, "validation": 8, "test": 10}
    run_dir = tmp_path / "run"
    (run_dir / "weights").mkdir(parents=True)
    result = Run.in_dir(RunDir(run_dir), config, model, data, verbose=0).train()
    assert result.status == "completed" and set(result.test) == {"loss", "out_loss", "aux_loss", "out_accuracy"}
    assert "val_out_accuracy" in result.history[-1]


@pytest.mark.parametrize("sets,error,match", [
    (["model.layers.2.inputs=[c1, skp]"], ConfigError, r"model.layers.2.inputs.1: unknown input or layer 'skp' "
                                                       r"\(did you mean 'skip'\?\)"),
    (["model.layers.5.shares=s11"], ConfigError, r"unknown layer 's11' \(did you mean 's1'\?\)"),
    (["model.outputs=[out, auxx]"], ConfigError, r"unknown layer 'auxx' \(did you mean 'aux'\?\)"),
    (["model.layers.1.filters=5"], ShapeError, r"model.layers\[2\] 'skip' \(reading c1, c2\): Add layer 'skip' "
                                              r"cannot merge inputs of shapes \(None, 6, 6, 4\), \(None, 6, 6, 5\)"),
    (["model.layers.0.inputs=skip"], ConfigError, r"the layers form a cycle: c1 -> skip -> c1 \(each reads"),
    (["model.layers.0.inputs=c2"], ConfigError, r"the layers form a cycle: c1 -> c2 -> c1"),
    (["model.layers.5.inputs=img"], ShapeError, r"'s1' was built for input shape \(None, 3\) but is now called on "
                                                r"\(None, 6, 6, 1\)"),
])
def test_graph_errors_name_the_node(sets, error, match):
    with pytest.raises(error, match=match):
        build(RESIDUAL, *sets)


def test_dangling_layers_warn_and_are_listed():
    with pytest.warns(builder.DanglingLayerWarning, match=r"aux reaches no output \(out\)"):
        model = build(RESIDUAL, "model.outputs=[out]", "compile.loss=sparse_categorical_crossentropy",
                      "compile.loss_weights=null", "compile.metrics=[accuracy]")
    assert model.dangling == ["aux"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(RESIDUAL)  # nothing dangles


def test_inspect_shapes_shows_connections_and_draws_the_graph(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dlcli import render
    from dlcli.cli import app

    path = tmp_path / "net.yaml"
    path.write_text(RESIDUAL)
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["inspect-shapes", str(path), "--graph", str(tmp_path / "net.md")])
    assert result.exit_code == 0, result.output
    assert "connected to" in result.output and "shares s1" in result.output
    md = (tmp_path / "net.md").read_text()
    assert md.count("-->") == 13 and "```mermaid" in md  # one arrow per tensor read
    result = runner.invoke(app, ["inspect-shapes", str(path), "--graph", str(tmp_path / "net.dot")])
    dot = (tmp_path / "net.dot").read_text()
    assert result.exit_code == 0 and dot.startswith('digraph "residual"') and dot.count("->") == 13
    if shutil.which("dot"):  # Graphviz draws it
        result = runner.invoke(app, ["inspect-shapes", str(path), "--graph", str(tmp_path / "drawn.svg")])
        assert result.exit_code == 0 and b"<svg" in (tmp_path / "drawn.svg").read_bytes(), result.output
    (tmp_path / "net.dot").unlink()
    monkeypatch.setattr(render.shutil, "which", lambda name: None)  # without Graphviz: the DOT text and how to draw
    result = runner.invoke(app, ["inspect-shapes", str(path), "--graph", str(tmp_path / "net.svg")])
    assert result.exit_code == 0 and "Graphviz 'dot' is not on PATH" in result.output, result.output
    assert not (tmp_path / "net.svg").exists() and (tmp_path / "net.dot").read_text() == dot
    result = runner.invoke(app, ["inspect-shapes", str(path), "--graph", str(tmp_path / "net.txt")])
    assert result.exit_code == 2 and ".svg, .png, .dot, .md" in result.output


@pytest.mark.parametrize("path,inputs,params", [("configs/fashion_mnist_resnet.yaml", ["img"], 152_106),
                                                ("configs/two_inputs.yaml", ["img", "side"], 176_074)])
def test_shipped_functional_configs_build(path, inputs, params):
    from pathlib import Path

    from dlcli.builder import build_model
    from dlcli.config import load_config

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dangles
        model = build_model(load_config(Path(__file__).parent.parent / path))
    assert model.input_names == inputs and model.count_params() == params


def test_image_views_feed_named_inputs():
    from dlcli.data.images import image_views
    from dlcli.errors import DlcliError

    images = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    views = image_views(images, {"img": "image", "side": "profiles", "mass": "ink"})
    assert views["img"] is images and views["side"].shape == (3, 56) and views["mass"].shape == (3, 1)
    np.testing.assert_allclose(views["side"][:, :28], images.mean(2), rtol=1e-6)
    with pytest.raises(DlcliError, match="unknown view 'profile' \\(did you mean 'profiles'\\?\\)"):
        image_views(images, {"side": "profile"})


def test_a_single_input_layer_given_two_inputs_is_a_shape_error():
    """Found by config fuzzing: Dense reading two tensors ended in a TypeError while sizing its kernel."""
    from dlcli.builder import build_model
    from dlcli.config import parse_config
    from dlcli.errors import ShapeError

    text = ("data: {type: npz, path: x.npz}\nmodel:\n  type: functional\n"
            "  inputs: [{name: a, shape: [4]}, {name: b, shape: [3]}]\n"
            "  layers:\n    - {name: d, type: Dense, units: 2, inputs: [a, b]}\n  outputs: [d]\ncompile: {loss: mse}\n")
    with pytest.raises(ShapeError, match="layer 'd' cannot build weight 'kernel'.*given several"):
        build_model(parse_config(text, "t.yaml"))


def test_zeroed_gradients_hold_only_the_next_steps_contributions():
    """Param.zero_grad leaves the last step's values in place; reading `grad` or Dense's in-place product must not
    see them, and a shared Dense still adds its second call to its first."""
    from dlcli.engine.layer import Param

    p = Param("w", np.ones((2, 3), np.float32))
    p.grad += 5
    p.zero_grad()
    assert p.blank_grad() is p.grad and not p.grad_zeroed and p.blank_grad() is None  # handed out once
    p.zero_grad()
    p.grad += 1
    np.testing.assert_array_equal(p.grad, np.ones((2, 3)))
    frozen = Param("count", np.zeros(()), trainable=False)
    frozen.zero_grad()
    assert frozen.grad is None and frozen.blank_grad() is None
    a, b = layers.Input((3,), name="a"), layers.Input((3,), name="b")
    enc = layers.Dense(2, name="enc")
    model = models.Model([a, b], layers.Add()([enc(a), enc(b)]))
    x1, x2 = np.ones((1, 3), np.float32), 2 * np.ones((1, 3), np.float32)
    for p in model.trainable_weights:
        p.grad[...] = 7  # a previous step's gradients
        p.zero_grad()
    model.graph.forward([x1, x2])
    model.graph.backward([np.ones((1, 2), np.float32)])
    np.testing.assert_allclose(enc.kernel.grad, (x1 + x2).T @ np.ones((1, 2)))
    np.testing.assert_allclose(enc.bias.grad, [2, 2])


def test_a_layer_after_layers_without_weights_on_the_data_skips_its_input_gradient():
    """A Dense after a Flatten of the images skips its input gradient as if it read the data (and so the Flatten its
    own); an observer, or a caller asking for the inputs' gradients, still gets every gradient. The weights'
    gradients are the same either way."""
    flat, first, second = layers.Flatten(), layers.Dense(6, activation="relu"), layers.Dense(3)
    m = models.Sequential([layers.Input((2, 4)), layers.Reshape((4, 2)), flat, first, second])
    m.build(rng=np.random.default_rng(0))
    called = []
    flat.backward = lambda grad, own=flat.backward: (called.append(1), own(grad))[1]
    x, g = np.random.default_rng(1).standard_normal((5, 2, 4)), np.ones((5, 3))
    m.graph.forward([x], training=True)
    assert m.graph.backward([g]) == [None]
    assert not called and not first.input_grad_needed and second.input_grad_needed
    grads = [p.grad.copy() for p in m.trainable_weights]
    for p in m.trainable_weights:
        p.zero_grad()
    m.graph.forward([x], training=True)
    dx = m.graph.backward([g], need_input_grads=True)[0]
    assert dx.shape == x.shape and called and first.input_grad_needed
    for p, want in zip(m.trainable_weights, grads):
        np.testing.assert_array_equal(p.grad, want)


def test_the_gradient_exchange_sends_zeros_for_a_gradient_no_layer_wrote():
    """The exchange sums its buffer itself (each p.grad is a view into it): a zeroed gradient's stale values must be
    written out first."""
    from dlcli.distributed import GradientExchange, World
    from dlcli.engine.layer import Param

    params = [Param("w", np.ones(3, np.float32)), Param("v", np.ones(2, np.float32))]
    exchange = GradientExchange(World(), params, 1)
    params[0].grad += 4
    params[1].grad += 9
    for p in params:
        p.zero_grad()
    params[1].grad += 1  # written this step; params[0] was not
    exchange(np.zeros(1), False)
    np.testing.assert_array_equal(exchange.buf[:5], [0, 0, 0, 1, 1])



def test_a_layer_called_on_arrays_autocasts_them_as_in_keras():
    """Keras 3's Layer.__call__ casts floating inputs to the layer's compute dtype (dtype_policy.convert_input), on
    arrays as on symbolic tensors: float64 data into a float32 Dense gives float32 (fails before: NumPy promoted the
    product to float64), float32 into a float64 layer float64, both inputs of an Add in its dtype, and integer ids
    reach an Embedding as they are."""
    x = np.random.default_rng(0).standard_normal((2, 4))
    dense = layers.Dense(3)
    assert dense(x).dtype == np.float32
    np.testing.assert_array_equal(dense(x), dense(x.astype(np.float32)))
    assert layers.Dense(3, dtype="float64")(x.astype(np.float32)).dtype == np.float64
    assert layers.Add()([x, x.astype(np.float32)]).dtype == np.float32
    ids = np.array([[1, 2]])
    embedding = layers.Embedding(5, 2)
    assert embedding(ids).dtype == np.float32
    np.testing.assert_array_equal(embedding(ids), embedding.embeddings.value[ids])


@pytest.mark.parametrize("make", [lambda: layers.TimeDistributed(layers.Dense(4)),
                                  lambda: layers.Bidirectional(layers.LSTM(3, return_sequences=True)),
                                  lambda: layers.TransformerEncoder(16, 2),
                                  lambda: layers.RNN(layers.StackedRNNCells([layers.LSTMCell(3), layers.GRUCell(2)]))])
def test_a_wrapper_called_on_float64_arrays_runs_its_inner_layers_in_their_dtype(make):
    """Keras' Bidirectional and KerasHub's blocks call their inner layers (Layer.__call__: cast to each one's dtype),
    TimeDistributed its layer's call on what its own __call__ cast: a wrapper's inner layers take its dtype (Wrapper),
    so the one cast at the wrapper is theirs and float64 data never reaches a float32 inner layer uncast."""
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    layer = make()
    y = layer(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, layer(x.astype(np.float32)))


def test_a_layer_autocasts_its_inputs_to_its_dtype_as_in_keras():
    """A float64 Conv2D between float32 layers (Keras 3's autocast): the config trains and predicts, the conv computes
    in float64, and each cast sends its gradient back in its input's dtype (fails before: NumPy refused the float32
    data in the float64 conv's out= product)."""
    model = builder.build_model({"name": "t", "seed": 0, "data": {"type": "mnist"}, "model": {
        "type": "sequential", "input_shape": [8, 8, 1], "layers": [
            {"type": "Conv2D", "filters": 4, "kernel_size": 3, "dtype": "float64"}, {"type": "Flatten"},
            {"type": "Dense", "units": 3, "activation": "softmax"}]},
        "compile": {"optimizer": "adam", "loss": "sparse_categorical_crossentropy"},
        "train": {"epochs": 1, "batch_size": 4}})
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 8, 8, 1)).astype(np.float32), np.array([0, 1, 2, 1])
    loss = model.train_step([x], [y])[0]
    assert np.isfinite(loss) and model.layers[0].params["kernel"].value.dtype == np.float64
    assert model.predict(x).dtype == np.float32 and model.predict(x).shape == (4, 3)

    img = layers.Input((8, 8, 1))
    first = layers.Conv2D(2, 3, name="first")
    wide = layers.Conv2D(3, 3, dtype="float64", name="wide")
    model = models.Model(img, layers.Dense(2)(layers.Flatten()(wide(first(img)))))
    seen = {}
    for layer in (first, wide):
        def backward(grad, layer=layer, own=layer.backward):
            seen[layer.name] = grad.dtype
            return own(grad)
        layer.backward = backward
    out = model.graph.forward([x], training=True)[0]
    grads = model.graph.backward([np.ones_like(out)], need_input_grads=True)
    assert out.dtype == np.float32 and grads[0].dtype == np.float32
    assert seen == {"first": np.float32, "wide": np.float64}
