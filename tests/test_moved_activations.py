"""A ReLU that only feeds a max pooling runs after the pooling (engine/graph.py): outputs and every gradient must be
exactly those of the layers run as written, ties included, and nothing may move where another reader sees it."""
import numpy as np

from dlcli import layers, models


class Watcher:
    """A graph observer that records nothing: observed passes run the layers as written."""

    def forward(self, node, output):
        pass

    def backward(self, node, output_grad, input_grad):
        pass


def _net():
    """Every kind of move: a conv's own relu, a standalone relu Activation, padded and overlapping windows."""
    img = layers.Input((9, 9, 2), name="img")
    x = layers.Conv2D(4, 3, activation="relu", padding="same", bias_initializer="ones", name="conv")(img)
    x = layers.MaxPooling2D(2, name="pool")(x)  # 9 -> 4: the last row and column belong to no window
    x = layers.Conv2D(3, 2, name="conv_linear")(x)
    x = layers.Activation("relu", name="relu")(x)
    x = layers.MaxPooling2D(2, strides=1, padding="same", name="pool_same")(x)  # overlapping, -inf padding
    x = layers.Flatten()(x)
    out = layers.Dense(3, activation="softmax")(x)
    return models.Model(img, out)


def _pass(model, xs, observer):
    for p in model.weights:
        p.grad[...] = 0
    outs = model.graph.forward(xs, training=True, observer=observer)
    grads = [np.ones_like(outs[0]) * np.arange(outs[0].shape[-1])]
    dx = model.graph.backward(grads, need_input_grads=True, observer=observer)[0]
    inference = model.graph.forward(xs, training=False, observer=observer)[0]
    return [outs[0], dx, inference] + [p.grad.copy() for p in model.weights]


def test_outputs_and_gradients_are_exactly_those_of_the_layers_as_written():
    model = _net()
    assert [(a.name, b.name) for a, b, _ in model.graph.movable] == [("conv", "pool"), ("relu", "pool_same")]
    rng = np.random.default_rng(0)
    # mostly zeros, like MNIST's background: many windows tie, at the (positive) bias and at 0
    x = (rng.random((5, 9, 9, 2)) < 0.2).astype(np.float32) * rng.integers(1, 3, (5, 9, 9, 2))
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
