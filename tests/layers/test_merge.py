import numpy as np
import pytest

from dlcli import layers
from dlcli.errors import ShapeError
from tests.gradcheck import check_layer

# Gradient-check table: layer type -> list of (constructor args, list of input shapes without batch, check options).
GRADIENT_CASES = {
    "Add": [({}, [(4,), (4,)], {}), ({}, [(2, 3), (3,), (1, 3)], {})],
    "Subtract": [({}, [(2, 3), (2, 1)], {})],
    "Multiply": [({}, [(4,), (4,), (4,)], {}), ({}, [(2, 3), (1,)], {})],
    "Average": [({}, [(3, 2), (3, 2)], {}), ({}, [(2, 3), (3,)], {})],
    "Maximum": [({}, [(5,), (5,), (5,)], {}), ({}, [(2, 3), (1, 3)], {})],
    "Minimum": [({}, [(5,), (5,)], {})],
    "Concatenate": [({}, [(2, 3), (2, 1)], {}), ({"axis": 1}, [(2, 3), (4, 3), (1, 3)], {})],
    "Dot": [({"axes": 1}, [(4,), (4,)], {}), ({"axes": [2, 2]}, [(3, 4), (2, 4)], {}),
            ({"axes": [1, 2]}, [(3, 4), (2, 3)], {}), ({"axes": -1, "normalize": True}, [(2, 5), (3, 5)], {})],
}


@pytest.mark.parametrize("name,args,shapes,opts", [(n, a, s, o) for n, cases in GRADIENT_CASES.items()
                                                   for a, s, o in cases])
def test_gradients(name, args, shapes, opts):
    check_layer(layers.LAYERS.get(name)(**args), shapes, **opts)


def test_table_covers_every_merge_layer():
    from dlcli.layers import merge

    registered = {n for n in layers.LAYERS.names() if getattr(layers.LAYERS.get(n), "__module__", "") == merge.__name__}
    assert registered == set(GRADIENT_CASES)


def test_values_and_output_shapes_match_keras():
    rng = np.random.default_rng(0)
    # float32, the layers' dtype (a call casts its inputs to it, Keras' autocast): the NumPy sums below are the same
    a, b, c = (rng.normal(size=shape).astype(np.float32) for shape in [(2, 3, 4), (2, 4), (2, 1, 4)])
    add = layers.Add()
    # a lower-rank input gains axes after the batch axis (Keras' expand_dims(x, 1)): trailing axes line up
    assert add.output_shape([(3, 4), (4,), (1, 4)]) == (3, 4)
    np.testing.assert_allclose(add([a, b, c]), a + b[:, None] + c)
    np.testing.assert_allclose(layers.Subtract()([a, c]), a - c)
    np.testing.assert_allclose(layers.Multiply()([a, b]), a * b[:, None])
    np.testing.assert_allclose(layers.Average()([a, c]), (a + c) / 2)
    np.testing.assert_allclose(layers.Maximum()([a, c]), np.maximum(a, c))
    np.testing.assert_allclose(layers.Minimum()([a, c]), np.minimum(a, c))
    assert layers.Concatenate().output_shape([(3, 4), (3, 2)]) == (3, 6)
    assert layers.Concatenate(axis=1).output_shape([(3, 4), (2, 4)]) == (5, 4)
    np.testing.assert_allclose(layers.Concatenate(axis=1)([a, c]), np.concatenate([a, c], 1))


def test_dot_matches_keras_batch_dot():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    dot = layers.Dot(axes=1, dtype="float64")  # float64 data compared to NumPy's float64 at 1e-7
    assert dot.output_shape([(4,), (4,)]) == (1,)  # Keras keeps (batch, 1) for two vectors
    np.testing.assert_allclose(dot([x, y]), (x * y).sum(1, keepdims=True))
    cos = layers.Dot(axes=1, normalize=True, dtype="float64")([x, y])
    np.testing.assert_allclose(cos[:, 0], (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))
    p, q = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 6, 4))
    att = layers.Dot(axes=[2, 2], dtype="float64")
    assert att.output_shape([(5, 4), (6, 4)]) == (5, 6)
    np.testing.assert_allclose(att([p, q]), np.einsum("bik,bjk->bij", p, q))
    assert layers.Dot(axes=[1, 1]).output_shape([(5, 4), (5, 6)]) == (4, 6)


def test_merges_keep_float32():
    x = np.ones((2, 3), np.float32)
    for name in GRADIENT_CASES:
        layer = layers.LAYERS.get(name)(**({"axes": 1} if name == "Dot" else {}))
        assert layer([x, x]).dtype == np.float32, name


@pytest.mark.parametrize("layer,shapes,match", [
    (layers.Add(name="skip"), [(4,), (5,)], r"'skip' cannot merge inputs of shapes \(None, 4\), \(None, 5\)"),
    (layers.Multiply(name="gate"), [(3, 4), (2, 4)], r"'gate'.*\(None, 3, 4\), \(None, 2, 4\): sizes 3 and 2"),
    (layers.Subtract(name="diff"), [(4,), (4,), (4,)], "exactly 2 inputs; got 3"),
    (layers.Concatenate(name="cat"), [(3, 4), (2, 5)], r"'cat'.*except on axis -1; got shapes \(None, 3, 4\), "
                                                      r"\(None, 2, 5\)"),
    (layers.Concatenate(name="cat0", axis=0), [(3,), (3,)], "batch axis 0 cannot be joined"),
    (layers.Concatenate(name="rank"), [(3, 4), (4,)], "one rank"),
    (layers.Dot(axes=1, name="sim"), [(4,), (5,)], r"'sim' cannot contract inputs of shapes \(None, 4\) and "
                                                   r"\(None, 5\): size 4 \(axis 1\) != size 5"),
    (layers.Dot(axes=0, name="d0"), [(4,), (4,)], "batch axis 0 cannot be contracted"),
])
def test_shape_errors_name_the_layer_and_shapes(layer, shapes, match):
    with pytest.raises(ShapeError, match=match):
        layer.ensure_built(shapes)


def test_merge_on_one_tensor_is_a_clear_error():
    from dlcli.engine.graph import Input

    with pytest.raises(ShapeError, match="merges a list of inputs"):
        layers.Add(name="lonely")(Input((4,)))


def test_masks_combine_like_keras():
    a, b = np.zeros((2, 3, 4)), np.zeros((2, 3, 4))
    m1 = np.array([[1, 1, 0], [1, 0, 0]], bool)
    m2 = np.array([[1, 0, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(layers.Add().compute_mask([a, b], [m1, m2]), m1 & m2)
    np.testing.assert_array_equal(layers.Add().compute_mask([a, b], [m1, None]), m1)
    assert layers.Add().compute_mask([a, b], [None, None]) is None
    cat_time = layers.Concatenate(axis=1).compute_mask([a, b], [m1, None])
    np.testing.assert_array_equal(cat_time, np.concatenate([m1, np.ones((2, 3), bool)], 1))
