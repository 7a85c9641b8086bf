"""A ReLU that only feeds a max pooling runs after the pooling (engine/graph.py): outputs and every gradient must be
exactly those of the layers run as written, ties included, and nothing may move where another reader sees it."""
import numpy as np
import pytest

from dlcli import layers, models


class Watcher:
    """A graph observer that records nothing: observed passes run the layers as written."""

    def forward(self, node, output):
        pass

    def backward(self, node, output_grad, input_grad):
        pass


def _net():
    """Every kind of move: a conv's own relu, a standalone relu Activation, padded and overlapping windows. The first
    conv reads 8 channels: on fewer it would pool its own output in training (tests/test_pooled_conv.py)."""
    img = layers.Input((9, 9, 8), name="img")
    x = layers.Conv2D(4, 3, activation="relu", padding="same", bias_initializer="ones", name="conv")(img)
    x = layers.MaxPooling2D(2, name="pool")(x)  # 9 -> 4: the last row and column belong to no window
    x = layers.Conv2D(3, 2, name="conv_linear")(x)
    x = layers.Activation("relu", name="relu")(x)
    x = layers.MaxPooling2D(2, strides=1, padding="same", name="pool_same")(x)  # overlapping, -inf padding
    x = layers.Flatten()(x)
    out = layers.Dense(3, activation="softmax")(x)
    return models.Model(img, out)


def _pass(model, xs, observer):
    for p in model.trainable_weights:
        p.grad[...] = 0
    outs = model.graph.forward(xs, training=True, observer=observer)
    grads = [np.ones_like(outs[0]) * np.arange(outs[0].shape[-1])]
    dx = model.graph.backward(grads, need_input_grads=True, observer=observer)[0]
    inference = model.graph.forward(xs, training=False, observer=observer)[0]
    return [outs[0], dx, inference] + [p.grad.copy() for p in model.trainable_weights] + [
        p.value.copy() for p in model.weights]


def test_outputs_and_gradients_are_exactly_those_of_the_layers_as_written():
    model = _net()
    assert [(a.name, b.name) for a, b, _ in model.graph.movable] == [("conv", "pool"), ("relu", "pool_same")]
    rng = np.random.default_rng(0)
    # mostly zeros, like MNIST's background: many windows tie, at the (positive) bias and at 0
    x = (rng.random((5, 9, 9, 8)) < 0.2).astype(np.float32) * rng.integers(1, 3, (5, 9, 9, 8))
    moved, as_written = _pass(model, [x], None), _pass(model, [x], Watcher())
    for a, b in zip(moved, as_written):
        assert np.array_equal(a, b)
    assert model.layers[0].activation_moved is False  # the observed pass put it back


def test_nothing_moves_where_another_reader_sees_the_activation():
    img = layers.Input((6, 6, 1))
    conv = layers.Conv2D(2, 3, activation="relu")
    features = conv(img)
    pooled = layers.Flatten()(layers.MaxPooling2D(2)(features))
    fan_out = models.Model(img, [pooled, layers.Flatten()(features)])
    assert fan_out.graph.movable == []
    extractor = models.Model(img, features)  # the same conv, its output a model output
    assert extractor.graph.movable == []
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 1)).astype(np.float32)
    chain = models.Model(img, pooled)
    assert len(chain.graph.movable) == 1
    chain.graph.forward([x])  # moves conv's relu into the pooling ...
    assert extractor.graph.forward([x])[0].min() >= 0  # ... and the extractor still sees relu outputs


def _residual_net():
    """A ReLU layer after a BatchNormalization and after an Add (absorbed), one after a BatchNormalization feeding
    a max pooling (moved into the pooling instead), one whose BatchNormalization has a second reader (left alone)."""
    img = layers.Input((6, 6, 3), name="img")
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(img)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    pooled = layers.MaxPooling2D(2, name="pool")(x)
    y = layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(pooled)
    y = layers.BatchNormalization(name="bn1")(y)
    y = layers.ReLU(name="relu1")(y)
    y = layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv2")(y)
    y = layers.BatchNormalization(name="bn2")(y)
    y = layers.Add(name="add")([y, pooled])
    y = layers.Activation("relu", name="out_relu")(y)
    shared_bn = layers.BatchNormalization(name="bn3")(layers.Conv2D(4, 1, name="conv3")(y))
    z = layers.Add(name="add2")([layers.Activation("relu", name="relu3")(shared_bn), shared_bn])
    out = layers.Dense(3, activation="softmax")(layers.Flatten()(z))
    return models.Model(img, out)


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_relus_absorbed_by_batch_norm_and_add_give_the_layers_as_written_bit_for_bit(monkeypatch, path):
    monkeypatch.setenv("DLCLI_KERNELS", path)
    model = _residual_net()
    assert [(a.name, b.name) for a, b, _ in model.graph.movable] == [("stem_relu", "pool")]
    assert [(a.name, b.name) for a, b, _ in model.graph.absorbed] == [("bn1", "relu1"), ("add", "out_relu")]
    # bn2 makes the sum (and its ReLU) in training; add2's inputs are not a BatchNormalization read by it alone
    assert [(node.layer.name, add.name, other.name) for node, add, other, _ in model.graph.summed] == [
        ("bn2", "add", "pool")]
    sums, merge = [], layers.Add._merge
    monkeypatch.setattr(layers.Add, "_merge", lambda self, xs: sums.append(self.name) or merge(self, xs))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6, 6, 3)).astype(np.float32)
    for _ in range(2):  # the second time from the moving statistics the first left
        start = [p.value.copy() for p in model.weights]
        moved = _pass(model, [x], None)
        assert sums == ["add2", "add", "add2"]  # training, then inference (nothing summed there)
        for p, value in zip(model.weights, start):
            p.value = value
        as_written = _pass(model, [x], Watcher())
        assert sums == ["add2", "add", "add2"] + ["add", "add2"] * 2
        sums.clear()
        for a, b in zip(moved, as_written):
            assert np.array_equal(a, b)
    assert model.get_layer("bn1").post_activation is None  # the observed pass put it back
    assert model.get_layer("relu1").activation_moved is False


@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("size", [6, 7])  # 7: the last row and column belong to no window
@pytest.mark.parametrize("pool", [2, 3])  # 2x2 windows have a kernel of their own
def test_a_batch_norm_pooling_its_relu_layer_and_max_pooling_gives_the_layers_as_written_bit_for_bit(monkeypatch, path,
                                                                                                      size, pool):
    """In training BN -> ReLU -> MaxPooling (a residual net's stem) is one pass of the BatchNormalization
    (graph._pooled_normalisations; compiled: kernels/normalization.normalise_pooled and its backward passes, else
    the layers' own functions in turn): outputs, input and weight gradients and moving statistics are the bits of
    the layers run apart, windows of tied values and the uncovered edge included."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    monkeypatch.setattr("dlcli.layers.normalization.LANE_FLOATS", 1)  # the sums over several ranges of rows too
    img = layers.Input((size, size, 3), name="img")
    x = layers.BatchNormalization(name="bn")(img)
    x = layers.MaxPooling2D(pool, name="pool")(layers.Activation("relu", name="relu")(x))
    model = models.Model(img, layers.Dense(3, activation="softmax")(layers.Flatten()(x)))
    bn = model.get_layer("bn")
    assert [(a.name, b.name) for a, b in model.graph.pooled_norms] == [("bn", "pool")]
    rng = np.random.default_rng(7)
    # mostly zeros, like MNIST's background: many windows tie
    x = ((rng.random((5, size, size, 3)) < 0.3) * rng.integers(1, 3, (5, size, size, 3))).astype(np.float32)
    model.graph.forward([x], training=True)
    assert bn.pooled is not None and bn.pooled[-1] == (path == "numba")  # the compiled pass, or the twins in turn
    for _ in range(2):  # the second time from the moving statistics the first left
        start = [p.value.copy() for p in model.weights]
        pooled = _pass(model, [x], None)
        for p, value in zip(model.weights, start):
            p.value = value
        as_written = _pass(model, [x], Watcher())
        for a, b in zip(pooled, as_written):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert bn.pool_after is None and not model.get_layer("pool").pooled_before  # the observed pass put them back


def test_a_batch_norm_pooling_its_relu_layer_and_max_pooling_agrees_with_its_numpy_twin(monkeypatch):
    """The compiled pass and the twins (the layers' NumPy passes in turn) to float32 rounding: their BN sums differ
    in order only."""
    img = layers.Input((7, 7, 4), name="img")
    x = layers.BatchNormalization(name="bn")(img)
    x = layers.MaxPooling2D(2, name="pool")(layers.Activation("relu", name="relu")(x))
    model = models.Model(img, layers.Dense(3, activation="softmax")(layers.Flatten()(x)))
    x = (np.random.default_rng(8).standard_normal((6, 7, 7, 4)) * 3 + 1).astype(np.float32)
    start = [p.value.copy() for p in model.weights]
    results = []
    for path in ("numba", "numpy"):
        monkeypatch.setenv("DLCLI_KERNELS", path)
        for p, value in zip(model.weights, start):
            p.value = value.copy()
        results.append(_pass(model, [x], None))
        assert model.get_layer("bn").pooled is None  # _pass's inference forward ran the layers apart
    for compiled, twin in zip(*results):
        np.testing.assert_allclose(compiled, twin, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_absorbed_relus_gradients_match_central_differences(monkeypatch, path):
    from tests.test_functional import check_model_gradients

    monkeypatch.setenv("DLCLI_KERNELS", path)
    model = _residual_net()
    model.compile("sgd", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((4, 6, 6, 3)), rng.integers(0, 3, 4)
    assert check_model_gradients(model, [x], [y], training=True) == 15  # 4 conv kernels, a bias, 4 gammas and betas, dense


def test_a_conv_relu_before_a_batch_norm_stays_in_the_conv():
    """Only a max pooling takes the activation of the layer before it: BatchNormalization takes a ReLU layer after
    it, never a conv's own activation (relu then BN is not BN then relu)."""
    img = layers.Input((6, 6, 1))
    x = layers.BatchNormalization()(layers.Conv2D(2, 3, activation="relu")(img))
    model = models.Model(img, layers.MaxPooling2D(2)(x))
    assert model.graph.movable == [] and model.graph.absorbed == []


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_a_summed_add_of_two_dtypes_sums_in_the_adds_dtype(monkeypatch, path):
    """A float64 input added to a float32 BatchNormalization: the float32 Add takes it in float32 (Keras' autocast,
    graph.forward), so the sum is float32, the same bits whether the BatchNormalization or the Add makes it."""
    monkeypatch.setenv("DLCLI_KERNELS", path)
    img, wide = layers.Input((4, 4, 3), name="img"), layers.Input((4, 4, 3), name="wide", dtype="float64")
    bn = layers.BatchNormalization(name="bn")(layers.Conv2D(3, 1, name="conv")(img))
    model = models.Model([img, wide], layers.Add(name="add")([wide, bn]))
    assert len(model.graph.summed) == 1
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal((5, 4, 4, 3)).astype(np.float32), rng.standard_normal((5, 4, 4, 3))]
    summed, as_written = (model.graph.forward(xs, training=True, observer=o)[0] for o in (None, Watcher()))
    assert summed.dtype == as_written.dtype == np.float32
    assert np.array_equal(summed, as_written)


def test_a_batch_norm_of_another_dtype_than_its_add_does_not_sum_it():
    """The Add casts a float64 BatchNormalization's output to float32 before it sums: the layer cannot sum for it."""
    img = layers.Input((4, 4, 3), name="img")
    bn = layers.BatchNormalization(dtype="float64")(layers.Conv2D(3, 1)(img))
    model = models.Model(img, layers.Add()([img, bn]))
    assert model.graph.summed == []


def _two_blocks():
    """A residual net's stem pooling its BN's ReLU, then two residual blocks: each block's input is read by its conv
    and by its Add, so its gradient is a fan-out's sum; the first block's Add (through the ReLU layer after it, which
    passes it on) reads its sum unadded."""
    img = layers.Input((6, 6, 3), name="img")
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(img)
    x = layers.BatchNormalization(name="stem_bn")(x)
    block = layers.MaxPooling2D(2, name="pool")(layers.Activation("relu", name="stem_relu")(x))
    for i in (1, 2):
        y = layers.Conv2D(4, 3, padding="same", use_bias=False, name=f"conv{i}")(block)
        y = layers.BatchNormalization(name=f"bn{i}")(y)
        block = layers.Activation("relu", name=f"out{i}")(layers.Add(name=f"add{i}")([y, block]))
    out = layers.Dense(3, activation="softmax")(layers.Flatten()(block))
    return models.Model(img, out)


@pytest.mark.parametrize("path", ["numba", "numpy"])
@pytest.mark.parametrize("strided", [True, False])
def test_a_fan_outs_gradients_read_unadded_give_the_layers_as_written_bit_for_bit(monkeypatch, path, strided):
    """The graph hands a fan-out's two gradients unadded (engine/layer.GradientSum) to a layer that reads them (the
    first Add's ReLU): outputs, gradients and moving statistics stay the bits of the layers run as written (an
    observed pass adds every sum itself), the conv's input gradient a strided view (cut from its padded one) or
    not."""
    from dlcli.engine import activations

    monkeypatch.setenv("DLCLI_KERNELS", path)
    model = _two_blocks()
    if not strided:
        conv = model.get_layer("conv2")
        backward = conv.backward
        monkeypatch.setattr(conv, "backward", lambda grad: np.ascontiguousarray(backward(grad)))
    read, backward_sum = [], activations.ReLU.backward_sum
    monkeypatch.setattr(activations.ReLU, "backward_sum", lambda self, a, b: read.append(b.flags.c_contiguous) or
                        backward_sum(self, a, b))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 6, 6, 3)).astype(np.float32)
    for _ in range(2):  # the second time from the moving statistics the first left
        start = [p.value.copy() for p in model.weights]
        summed = _pass(model, [x], None)
        assert read == [not strided]
        for p, value in zip(model.weights, start):
            p.value = value
        as_written = _pass(model, [x], Watcher())
        read.clear()
        for a, b in zip(summed, as_written):
            assert a.dtype == b.dtype and np.array_equal(a, b)
