"""dlcli against Keras 3 itself: activations, losses, metrics, optimizers and schedules evaluated by real Keras
(tests/fixtures/keras/make_catalogue.py wrote the fixtures, with the case specs, which dlcli takes as they are)."""
import json
from pathlib import Path

import numpy as np
import pytest

from dlcli import losses, metrics, optimizers, schedules
from dlcli.engine import activations, initializers
from dlcli.engine.layer import Param

FIXTURES = Path(__file__).parent / "fixtures" / "keras"


def _cases(family):
    data = np.load(FIXTURES / f"catalogue_{family}.npz")
    spec = json.loads(str(data["spec"]))
    return [pytest.param(case, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")},
                         id=f"{family}-{i}-{case['type']}") for i, case in enumerate(spec)]


def _batches(arrays):
    """The metric fixtures' batches in order: (y_true, y_pred, sample_weight or None, Keras' result after it)."""
    count = len({k.split("/")[0] for k in arrays})
    return [(arrays[f"{b}/y_true"], arrays[f"{b}/y_pred"], arrays.get(f"{b}/sample_weight"),
             arrays[f"{b}/result"].item()) for b in range(count)]  # F1Score(average=None) of one unit: shape (1,)


@pytest.mark.parametrize("spec,arrays", _cases("activations"))
def test_activation_matches_keras(spec, arrays):
    act = activations.get(dict(spec))
    y = act.forward(arrays["x"].copy())
    np.testing.assert_allclose(y, arrays["y"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(act.backward(arrays["r"]), arrays["grad"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec,arrays", _cases("losses"))
def test_loss_matches_keras(spec, arrays):
    loss = losses.get(dict(spec))
    per_sample, grad = loss.compute(arrays["y_true"], arrays["y_pred"].copy())
    value, factor = loss.reduce(per_sample, arrays["y_pred"], arrays.get("sample_weight"))  # as the model does
    assert value == pytest.approx(float(arrays["value"]), rel=1e-6, abs=1e-9)
    # Keras 3.15 computes circle and ctc in float32 whatever the dtype (torch's ctc_loss, circle's int32 labels),
    # so their gradients carry float32 rounding; dlcli's float64 ones also pass a numerical check (test_losses.py)
    rtol, atol = (1e-5, 1e-6) if spec["type"] in ("Circle", "CTC") else (1e-6, 1e-9)
    np.testing.assert_allclose(grad * factor.reshape((-1,) + (1,) * (grad.ndim - 1)), arrays["grad"], rtol=rtol,
                               atol=atol)
    if "per_sample" in arrays:
        np.testing.assert_allclose(per_sample, arrays["per_sample"], rtol=1e-6, atol=1e-9)


def test_sparsemax_follows_the_paper_not_keras_3_15():
    # keras-team/keras#23425: Keras 3.15 gives [0, 0, 0.25] for the first row; the projection onto the simplex is:
    y = activations.get("sparsemax").forward(np.array([[0.0, 0.5, 1.0, -3.0], [0.1, 0.2, 0.3, 0.4], [5, 0, 0, 0]]))
    np.testing.assert_allclose(y, [[0, 0.25, 0.75, 0], [0.1, 0.2, 0.3, 0.4], [1, 0, 0, 0]], atol=1e-12)
    z = np.random.default_rng(0).normal(0, 1, (50, 7))
    np.testing.assert_allclose(activations.get({"type": "sparsemax", "axis": 0}).forward(z).sum(0), 1, rtol=1e-12)


def test_activation_arguments_from_a_config_and_glu_halves_its_axis():
    from dlcli import layers

    layer = layers.LAYERS.get("Activation")(activation={"type": "glu"})
    assert layer.output_shape((3, 8)) == (3, 4)
    assert layer(np.ones((2, 3, 8), np.float32)).shape == (2, 3, 4)
    assert layer.get_config()["activation"] == {"type": "glu"}
    with pytest.raises(Exception, match="did you mean 'soft_shrink'"):
        activations.get("softshrink")
    with pytest.raises(Exception, match="has no argument 'treshold'.*did you mean 'threshold'"):
        activations.get({"type": "hard_shrink", "treshold": 1})



@pytest.mark.parametrize("spec,arrays", _cases("metrics"))
def test_metric_accumulates_over_batches_as_keras(spec, arrays):
    metric = metrics.get(dict(spec))
    for y_true, y_pred, weight, expected in _batches(arrays):
        metric.update(y_true, y_pred, weight)
        assert metric.result() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    state = metric.state()
    metric.reset()
    assert metric.result() == 0.0 and not any(metric.state())
    metric.set_state(state)
    assert metric.result() == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("spec,arrays", _cases("optimizers") + _cases("schedule_free"))
def test_optimizer_after_20_steps_matches_keras(spec, arrays):
    opt = optimizers.get(_schedule_spec(dict(spec)))
    params = [Param("w0", arrays["w0"].copy()), Param("w1", arrays["w1"].copy())]
    for g in arrays["grads"]:
        params[0].grad[...] = g[:12].reshape(3, 4)
        params[1].grad[...] = g[12:]
        opt.apply(params)
    np.testing.assert_allclose(params[0].value, arrays["after0"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(params[1].value, arrays["after1"], rtol=1e-6, atol=1e-9)
    if spec.get("use_ema"):
        opt.finalize_variable_values(params)
        np.testing.assert_allclose(params[0].value, arrays["average0"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(params[1].value, arrays["average1"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("spec,arrays", _cases("multi_optimizer"))
def test_multi_optimizer_after_20_steps_matches_keras(spec, arrays):
    """Keras 3.15.1 under JAX (make_catalogue.py multi_optimizer): each weight goes to the optimizer its path picks
    (an exact key, a pattern, the default), each inner optimizer clipping and counting steps on its own weights."""
    opt = optimizers.get(spec)
    names = [k.split("/", 1)[1] for k in arrays if k.startswith("start/")]
    params = [Param(name, arrays[f"start/{name}"].copy()) for name in names]
    for step in range(20):
        for p in params:
            p.grad[...] = arrays[f"grads/{p.name}"][step]
        opt.apply(params)
    for p in params:
        np.testing.assert_allclose(p.value, arrays[f"after/{p.name}"], rtol=1e-6, atol=1e-9)
    assert opt.iterations == 20 and all(o.iterations == 20 for o in opt.optimizers)


def _schedule_spec(spec):
    """Keras' serialized schedule {class_name, config} as dlcli's {type, ...} (the fixture keeps Keras' form)."""
    rate = spec.get("learning_rate")
    if isinstance(rate, dict) and "class_name" in rate:
        spec["learning_rate"] = {"type": rate["class_name"], **rate["config"]}
    return spec


@pytest.mark.parametrize("spec,arrays", _cases("schedules"))
def test_schedule_matches_keras(spec, arrays):
    schedule = schedules.get(dict(spec))
    steps = np.arange(len(arrays["rates"]))
    if spec["type"] == "CosineDecayRestarts" and spec.get("t_mul", 2.0) != 1.0:
        # Keras computes the restart index as floor(log(...) / log(t_mul)) in float32, which lands on either side
        # of a whole number at the first step of a period: those steps are left out
        starts = np.cumsum(spec["first_decay_steps"] * spec.get("t_mul", 2.0) ** np.arange(10))
        steps = steps[~np.isin(steps, starts)]
    rates = [schedule(int(step)) for step in steps]
    # Keras computes in float32: 1e-6 relative, and 1e-8 absolute for rates near 0
    np.testing.assert_allclose(rates, arrays["rates"][steps], rtol=1e-6, atol=1e-8)



@pytest.mark.parametrize("spec,arrays", _cases("initializers"))
def test_initializer_draws_like_keras(spec, arrays):
    # Keras' random streams differ from NumPy's: the distribution its arguments decide is compared, on 120,000 draws
    name = {"TruncatedNormal": "truncated_normal", "VarianceScaling": "variance_scaling", "Identity": "identity"}
    init = initializers.get({**spec, "type": name[spec["type"]]})
    w = init(tuple(arrays["shape"]), np.random.default_rng(0), dtype="float64")
    if "values" in arrays:
        np.testing.assert_array_equal(w, arrays["values"])
        return
    mean, std, largest = arrays["stats"]
    assert w.mean() == pytest.approx(mean, abs=0.01 * std) and w.std() == pytest.approx(std, rel=0.01)
    if spec.get("distribution") == "uniform":
        assert np.abs(w).max() == pytest.approx(largest, rel=0.01)  # the limit sqrt(3 scale / n)
    elif spec.get("distribution", "truncated_normal") == "truncated_normal":
        # cut at two standard deviations of the mean. Keras' torch backend keeps the first of four draws that is
        # inside, or the first draw when none is (one in 230,000), so its largest magnitude is no bound to compare
        cut = 2 * std / 0.87962566103423978
        assert np.abs(w - w.mean()).max() <= cut * 1.001 and np.abs(w - w.mean()).max() > cut * 0.99


@pytest.mark.parametrize("spec,arrays", _cases("reversible"))
def test_reversible_embedding_matches_keras(spec, arrays):
    """Keras 3.15.1 under JAX in float64 (make_catalogue.py reversible): the lookup, and the reverse projection
    tied or untied, with and without logit_soft_cap; input and weight gradients of sum(r * y). Keras' JAX tanh
    computes float64 input in float32, so the soft-capped cases are compared within float32 rounding."""
    from dlcli import layers

    layer = layers.LAYERS.get(spec["type"])(**{k: v for k, v in spec.items() if k != "type"})
    layer.dtype = "float64"
    layer.ensure_built(arrays["x"].shape[1:], np.random.default_rng(0))
    for name, p in layer.params.items():
        p.value, p.grad = arrays[f"weight/{name}"].copy(), np.zeros_like(arrays[f"weight/{name}"])
    atol = 1e-5 if spec.get("logit_soft_cap") else 1e-7
    np.testing.assert_allclose(layer.forward(arrays["x"].copy()), arrays["y"], rtol=1e-6, atol=atol)
    grad = layer.backward(arrays["r"])
    if "grad" in arrays:
        np.testing.assert_allclose(grad, arrays["grad"], rtol=1e-5, atol=atol)
    for name, p in layer.params.items():
        np.testing.assert_allclose(p.grad, arrays[f"weight_grad/{name}"], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("spec,arrays", _cases("layers"))
def test_layer_matches_keras(spec, arrays):
    from dlcli import layers

    layer = layers.LAYERS.get(spec["type"])(**{k: v for k, v in spec.items() if k != "type"})
    layer.dtype = "float64"
    x = arrays["x"]
    layer.ensure_built(x.shape[1:], np.random.default_rng(0))
    weights = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("weight/")}
    for name, value in weights.items():
        layer.params[name].value = value.copy()
        if layer.params[name].trainable:
            layer.params[name].grad = np.zeros_like(value)
    layer.input_mask = arrays.get("mask")
    training = bool(arrays.get("training", False))  # the layer changes its weights: compared after the call
    # SpectralNormalization's sigma in Keras carries float32 rounding (kernel / kernel_after is a float32 number
    # in the float64 fixture): 1e-5 there
    rtol = 1e-5 if training else 1e-6
    np.testing.assert_allclose(layer.forward(x.copy(), training), arrays["y"], rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(layer.backward(arrays["r"]), arrays["grad"], rtol=1e-5, atol=1e-7)
    for name in weights:
        if f"weight_grad/{name}" in arrays:
            np.testing.assert_allclose(layer.params[name].grad, arrays[f"weight_grad/{name}"], rtol=1e-5, atol=1e-7)
        if training:
            np.testing.assert_allclose(layer.params[name].value, arrays[f"weight_after/{name}"], rtol=rtol, atol=1e-9)
