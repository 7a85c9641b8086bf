"""Losses: float64 central-difference gradient checks (plain, from_logits and fused paths), Keras' documented
values, label handling and identifier round trips."""
import numpy as np
import pytest

from dlcli import losses
from dlcli.engine import activations
from dlcli.engine.activations import sigmoid, softmax
from dlcli.errors import ConfigError, DlcliError, ShapeError
from tests.gradcheck import assert_close, numeric_grad

rng = np.random.default_rng(0)


def _onehot(labels, classes):
    return np.eye(classes)[labels]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _positive(shape):
    return rng.uniform(0.05, 1.0, shape)  # unnormalised probabilities: exercises Keras' renormalisation too


# name -> (loss, y_true, y_pred, input kind): kind "probs" checks d/dy_pred, "logits" d/dy_pred of a
# from_logits loss, "fused:<act>" d/dlogits with y_pred = act(logits).
labels_2d = rng.integers(0, 5, 4)
labels_seq = rng.integers(0, 5, (3, 6))
CASES = {
    "cce_probs": (losses.CategoricalCrossentropy(), _onehot(labels_2d, 5), _positive((4, 5)), "probs"),
    "cce_smooth": (losses.CategoricalCrossentropy(label_smoothing=0.1), _onehot(labels_2d, 5), _positive((4, 5)),
                   "probs"),
    "cce_logits": (losses.CategoricalCrossentropy(from_logits=True), _onehot(labels_2d, 5),
                   rng.normal(0, 2, (4, 5)), "logits"),
    "cce_fused": (losses.CategoricalCrossentropy(label_smoothing=0.2), _onehot(labels_2d, 5),
                  rng.normal(0, 2, (4, 5)), "fused:softmax"),
    "cce_seq_fused": (losses.CategoricalCrossentropy(), _onehot(labels_seq, 5), rng.normal(0, 2, (3, 6, 5)),
                      "fused:softmax"),
    "scce_probs": (losses.SparseCategoricalCrossentropy(), labels_2d, _positive((4, 5)), "probs"),
    "scce_probs_col": (losses.SparseCategoricalCrossentropy(), labels_2d[:, None], _positive((4, 5)), "probs"),
    "scce_logits": (losses.SparseCategoricalCrossentropy(from_logits=True), labels_2d, rng.normal(0, 2, (4, 5)),
                    "logits"),
    "scce_fused": (losses.SparseCategoricalCrossentropy(), labels_2d, rng.normal(0, 2, (4, 5)), "fused:softmax"),
    "scce_seq_probs": (losses.SparseCategoricalCrossentropy(), labels_seq, _positive((3, 6, 5)), "probs"),
    "scce_seq_fused": (losses.SparseCategoricalCrossentropy(), labels_seq, rng.normal(0, 2, (3, 6, 5)),
                       "fused:softmax"),
    "bce_probs": (losses.BinaryCrossentropy(), rng.integers(0, 2, (4, 3)), rng.uniform(0.05, 0.95, (4, 3)),
                  "probs"),
    "bce_smooth_seq": (losses.BinaryCrossentropy(label_smoothing=0.1), rng.integers(0, 2, (3, 4, 2)),
                       rng.uniform(0.05, 0.95, (3, 4, 2)), "probs"),
    "bce_logits": (losses.BinaryCrossentropy(from_logits=True), rng.uniform(0, 1, (4, 3)), rng.normal(0, 3, (4, 3)),
                   "logits"),
    "bce_fused": (losses.BinaryCrossentropy(), rng.integers(0, 2, (4, 1)), rng.normal(0, 3, (4, 1)),
                  "fused:sigmoid"),
    "mse": (losses.MeanSquaredError(), rng.normal(0, 1, (4, 3)), rng.normal(0, 1, (4, 3)), "probs"),
    "mse_seq": (losses.MeanSquaredError(), rng.normal(0, 1, (3, 5, 2)), rng.normal(0, 1, (3, 5, 2)), "probs"),
    "mae": (losses.MeanAbsoluteError(), np.zeros((4, 3)), rng.choice([-1, 1], (4, 3)) * rng.uniform(0.1, 1, (4, 3)),
            "probs"),
    # errors kept away from the kinks at 0 and +-delta
    "huber": (losses.Huber(delta=1.0), np.zeros((4, 3)),
              rng.choice([-1, 1], (4, 3)) * np.array([0.3, 0.7, 2.0])[rng.integers(0, 3, (4, 3))], "probs"),
    "hinge_01": (losses.Hinge(), rng.integers(0, 2, (4, 3)), rng.normal(0, 1, (4, 3)), "probs"),
    "hinge_pm": (losses.Hinge(), rng.choice([-1.0, 1.0], (4, 3)), rng.normal(0, 1, (4, 3)), "probs"),
    "squared_hinge": (losses.SquaredHinge(), rng.integers(0, 2, (3, 4, 2)), rng.normal(0, 1, (3, 4, 2)), "probs"),
    "categorical_hinge": (losses.CategoricalHinge(), _onehot(labels_2d, 5), rng.normal(0, 1, (4, 5)), "probs"),
    "cosine_similarity": (losses.CosineSimilarity(), rng.normal(0, 1, (4, 3)), rng.normal(0, 1, (4, 3)), "probs"),
    "kl_divergence": (losses.KLDivergence(), _positive((4, 5)) / 3, _positive((4, 5)), "probs"),
    "log_cosh": (losses.LogCosh(), rng.normal(0, 1, (4, 3)), rng.normal(0, 2, (4, 3)), "probs"),
    "mape": (losses.MeanAbsolutePercentageError(), rng.normal(0, 1, (4, 3)), rng.normal(0, 1, (4, 3)), "probs"),
    "msle": (losses.MeanSquaredLogarithmicError(), _positive((4, 3)), _positive((4, 3)), "probs"),
    "poisson": (losses.Poisson(), rng.integers(0, 4, (4, 3)), _positive((4, 3)), "probs"),
    "binary_focal": (losses.BinaryFocalCrossentropy(), rng.integers(0, 2, (4, 3)), rng.uniform(0.05, 0.95, (4, 3)),
                     "probs"),
    "binary_focal_balanced_logits": (
        losses.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=1.5, from_logits=True, label_smoothing=0.1),
        rng.integers(0, 2, (4, 3)), rng.normal(0, 2, (4, 3)), "logits"),
    "categorical_focal": (losses.CategoricalFocalCrossentropy(), _onehot(labels_2d, 5), _positive((4, 5)), "probs"),
    "categorical_focal_logits": (losses.CategoricalFocalCrossentropy(alpha=0.5, gamma=3.0, from_logits=True,
                                                                     label_smoothing=0.1),
                                 _onehot(labels_2d, 5), rng.normal(0, 2, (4, 5)), "logits"),
    "dice_batch": (losses.Dice(), rng.integers(0, 2, (4, 3)), _positive((4, 3)), "batch"),
    "dice_axes": (losses.Dice(axis=[1, 2]), rng.integers(0, 2, (3, 4, 4, 2)), _positive((3, 4, 4, 2)), "probs"),
    "tversky_batch": (losses.Tversky(alpha=0.3, beta=0.7), rng.integers(0, 2, (4, 3)), _positive((4, 3)), "batch"),
    "tversky_axis": (losses.Tversky(axis=-1), rng.integers(0, 2, (4, 5)), _positive((4, 5)), "probs"),
    "generalized_cross_entropy": (losses.CategoricalGeneralizedCrossEntropy(q=0.7), labels_2d, _positive((4, 5)),
                                  "probs"),
    # every embedding is compared with the whole batch: only the batch mean has a gradient ("batch"); one sample
    # (label 3) has no positive pair and is left out of the mean
    "circle": (losses.Circle(gamma=8.0), np.array([0, 1, 0, 1, 2, 2, 3]),
               _unit(rng.normal(0, 1, (7, 4))), "batch"),
    "circle_with_diagonal": (losses.Circle(gamma=20.0, margin=0.3, remove_diagonal=False),
                             np.array([0, 1, 0, 1, 1]), _unit(rng.normal(0, 1, (5, 3))), "batch"),
    # labels padded with 0 (the blank), a repeated label, an empty sequence; gradients w.r.t. the logits
    "ctc": (losses.CTC(), np.array([[1, 2, 2], [3, 0, 0], [0, 0, 0], [2, 1, 3]]), rng.normal(0, 1, (4, 7, 4)),
            "logits"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient(case, kernel_path):
    loss, y_true, x, kind = CASES[case]
    x = x.astype(np.float64).copy()
    # checks every sample's gradient, not only their sum; a loss over the whole batch ("batch": Dice and Tversky
    # with axis=None) has no per-sample gradient, only the batch mean's
    weights = np.ones(len(x)) / len(x) if kind == "batch" else rng.normal(0, 1, len(x))

    def evaluate():
        if kind.startswith("fused:"):
            y_pred = softmax(x) if kind.endswith("softmax") else sigmoid(x)
            return loss.compute(y_true, y_pred, logits=x)
        return loss.compute(y_true, x)

    per_sample, grad = evaluate()
    assert per_sample.shape == (len(x),) and per_sample.dtype == np.float64
    assert grad.shape == x.shape and grad.dtype == x.dtype
    weighted = grad * (weights.reshape((-1,) + (1,) * (x.ndim - 1)) if kind != "batch" else weights.mean())
    assert_close(weighted, numeric_grad(lambda: float(evaluate()[0] @ weights), x), case, rtol=1e-5, atol=1e-8)


def test_every_registered_loss_has_a_gradient_check():
    checked = {type(loss) for loss, *_ in CASES.values()}
    assert {losses.LOSSES.get(name) for name in losses.LOSSES} <= checked


# Values from the examples in Keras' loss docstrings.
def test_keras_documented_values():
    y_true, y_pred = np.array([[0, 1, 0], [0, 0, 1.0]]), np.array([[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    assert losses.get("categorical_crossentropy")(y_true, y_pred) == pytest.approx(1.177, abs=1e-3)
    assert losses.get("sparse_categorical_crossentropy")(np.array([1, 2]), y_pred) == pytest.approx(1.177, abs=1e-3)
    y_true, y_pred = np.array([[0, 1], [0, 0.0]]), np.array([[0.6, 0.4], [0.4, 0.6]])
    assert losses.get("binary_crossentropy")(y_true, y_pred) == pytest.approx(0.815, abs=1e-3)
    assert losses.get("huber")(y_true, y_pred) == pytest.approx(0.155, abs=1e-3)
    y_true, y_pred = np.array([[0, 1], [0, 0.0]]), np.array([[1, 1], [1, 0.0]])
    assert losses.get("mse")(y_true, y_pred) == pytest.approx(0.5)
    assert losses.get("mae")(y_true, y_pred) == pytest.approx(0.5)
    bce = losses.BinaryCrossentropy(from_logits=True)
    assert bce(np.array([0, 1, 0, 0.0])[:, None], np.array([-18.6, 0.51, 2.94, -12.8])[:, None]) == \
        pytest.approx(0.865, abs=1e-3)


def test_per_sample_values_by_hand():
    # CE: -log of the renormalised true-class probability; the clip bounds an impossible prediction at -log(1e-7).
    per_sample, _ = losses.CategoricalCrossentropy().compute(np.array([[0, 1.0], [1, 0]]), np.array([[1, 3.0], [0, 1]]))
    assert per_sample == pytest.approx([-np.log(0.75), -np.log(1e-7)])
    # Sequence outputs: per-sample value is the mean over time steps.
    y_pred = np.array([[[0.5, 0.5], [0.9, 0.1]]])
    per_sample, _ = losses.SparseCategoricalCrossentropy().compute(np.array([[0, 0]]), y_pred)
    assert per_sample == pytest.approx([(-np.log(0.5) - np.log(0.9)) / 2])
    # Huber on both sides of delta: 0.5 * 0.5^2 and 2 * (3 - 1).
    per_sample, _ = losses.Huber(delta=2.0).compute(np.zeros((1, 2)), np.array([[0.5, -3.0]]))
    assert per_sample == pytest.approx([(0.125 + 4.0) / 2])


@pytest.mark.parametrize("name,act", [("categorical_crossentropy", "softmax"),
                                      ("sparse_categorical_crossentropy", "softmax"),
                                      ("binary_crossentropy", "sigmoid")])
def test_fused_path_matches_probabilities(name, act):
    loss = losses.get(name)
    assert loss.fuses_with(act) and not loss.fuses_with("relu")
    assert not losses.get({"type": name, "from_logits": True}).fuses_with(act)
    z = rng.normal(0, 1, (5, 4))
    y_pred = softmax(z) if act == "softmax" else sigmoid(z)
    y_true = {"sparse_categorical_crossentropy": rng.integers(0, 4, 5),
              "categorical_crossentropy": _onehot(rng.integers(0, 4, 5), 4)}.get(name, rng.integers(0, 2, (5, 4)))
    fused, grad_z = loss.compute(y_true, y_pred, logits=z)
    plain, grad_p = loss.compute(y_true, y_pred)
    np.testing.assert_allclose(fused, plain, rtol=1e-9)
    activation = activations.get(act)
    activation.forward(z)
    np.testing.assert_allclose(grad_z, activation.backward(grad_p), rtol=1e-7, atol=1e-12)  # chain rule
    assert not losses.get("mse").fuses_with("softmax")


def test_float32_in_float32_out():
    y_pred = softmax(rng.normal(0, 1, (6, 3))).astype(np.float32)
    for loss, y_true in [(losses.get("categorical_crossentropy"), _onehot(rng.integers(0, 3, 6), 3)),
                         (losses.get("sparse_categorical_crossentropy"), rng.integers(0, 3, 6).astype(np.uint8)),
                         (losses.get("mse"), rng.normal(0, 1, (6, 3)))]:
        per_sample, grad = loss.compute(y_true, y_pred)
        assert grad.dtype == np.float32 and per_sample.dtype == np.float64
        per_sample, grad = loss.compute(y_true, y_pred, logits=np.log(y_pred))
        assert grad.dtype == np.float32


def test_sparse_label_errors():
    scce = losses.get("sparse_categorical_crossentropy")
    y_pred = softmax(rng.normal(0, 1, (3, 4)))
    with pytest.raises(DlcliError, match="class label 4.*4 units"):
        scce.compute(np.array([0, 4, 1]), y_pred)
    with pytest.raises(DlcliError, match="label -1"):
        scce.compute(np.array([0, -1, 1]), y_pred)
    with pytest.raises(ShapeError, match="categorical_crossentropy"):
        scce.compute(_onehot([0, 1, 2], 4), y_pred)
    with pytest.raises(DlcliError, match="non-integer"):
        scce.compute(np.array([0.5, 1, 2]), y_pred)
    per_sample, _ = scce.compute(np.array([0.0, 1, 2]), y_pred)  # float-typed integer labels are fine
    assert per_sample.shape == (3,)
    with pytest.raises(ShapeError, match="sparse_categorical_crossentropy"):
        losses.get("categorical_crossentropy").compute(np.array([0, 1, 2]), y_pred)


def test_targets_reshaped_to_single_unit_outputs():
    per_sample, grad = losses.get("binary_crossentropy").compute(np.array([0, 1, 1]), np.full((3, 1), 0.5))
    assert per_sample == pytest.approx([np.log(2)] * 3) and grad.shape == (3, 1)


def test_get_and_serialize():
    assert isinstance(losses.get("mse"), losses.MeanSquaredError)
    assert isinstance(losses.get("SparseCategoricalCrossentropy"), losses.SparseCategoricalCrossentropy)
    huber = losses.get({"type": "huber", "delta": 2.5})
    assert huber.delta == 2.5 and losses.serialize(huber) == {"type": "huber", "delta": 2.5}
    assert losses.serialize(losses.get("mae")) == "mean_absolute_error"
    cce = losses.CategoricalCrossentropy(label_smoothing=0.1)
    assert losses.get(losses.serialize(cce)).get_config() == cce.get_config()
    assert losses.get(cce) is cce
    with pytest.raises(ConfigError, match="did you mean 'huber'"):
        losses.get("hubber")
    with pytest.raises(ConfigError, match="did you mean 'delta'"):
        losses.get({"type": "huber", "detla": 1})



def test_against_torch():
    torch = pytest.importorskip("torch", reason="torch not installed: reference comparison skipped")
    z = rng.normal(0, 2, (6, 5))
    labels = rng.integers(0, 5, 6)
    zt = torch.tensor(z, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(zt, torch.tensor(labels), reduction="none")
    ref.sum().backward()
    per_sample, grad = losses.get("sparse_categorical_crossentropy").compute(labels, softmax(z), logits=z)
    np.testing.assert_allclose(per_sample, ref.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-14)
    t = rng.integers(0, 2, (6, 3)).astype(np.float64)
    zt = torch.tensor(z[:, :3], requires_grad=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(zt, torch.tensor(t), reduction="none").mean(-1)
    ref.sum().backward()
    per_sample, grad = losses.BinaryCrossentropy(from_logits=True).compute(t, z[:, :3])
    np.testing.assert_allclose(per_sample, ref.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_reduction_as_keras_and_refused_when_unknown():
    y_true, y_pred = rng.normal(0, 1, (4, 5, 3)), rng.normal(0, 1, (4, 5, 3))
    weight = np.array([0.5, 1.0, 2.0, 0.0])
    per_sample, _ = losses.MeanSquaredError().compute(y_true, y_pred)
    squares = ((y_true - y_pred) ** 2).mean(-1)  # Keras' values: (batch, 5)
    for reduction, expected in [("sum_over_batch_size", (squares * weight[:, None]).mean()),
                                ("sum", (squares * weight[:, None]).sum()),
                                ("mean_with_sample_weight", (squares * weight[:, None]).sum() / (5 * weight.sum())),
                                (None, (squares * weight[:, None]).mean())]:
        loss = losses.get({"type": "mse", "reduction": reduction})
        value, factor = loss.reduce(per_sample, y_pred, weight)
        assert value == pytest.approx(expected, rel=1e-12) and value == pytest.approx(per_sample @ factor)
    assert losses.serialize(losses.get({"type": "mse", "reduction": "sum"})) == {"type": "mean_squared_error",
                                                                                  "reduction": "sum"}
    assert losses.serialize(losses.get("mse")) == "mean_squared_error"
    with pytest.raises(ConfigError, match="reduction must be one of sum_over_batch_size, mean, sum"):
        losses.get({"type": "mse", "reduction": "average"})
    with pytest.raises(DlcliError, match="circle.*sample or class weights"):
        losses.Circle().reduce(np.ones(3), np.ones((3, 2)), np.ones(3))


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    steps = np.array([[1, 1, 0, 1, 2, 2, 0], [0, 0, 3, 3, 3, 0, 0]])
    decoded = losses.ctc_greedy_decode(np.eye(4)[steps])
    np.testing.assert_array_equal(decoded, [[1, 1, 2, -1, -1, -1, -1], [3, -1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(losses.ctc_greedy_decode(np.eye(4)[steps], merge_repeated=False)[0, :5],
                                  [1, 1, 1, 2, 2])
