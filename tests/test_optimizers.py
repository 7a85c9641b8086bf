"""Optimizers against updates computed by hand from Keras 3's formulas (scalar Python arithmetic), clipping,
schedules, lr_mult, and state save/restore continuing bit-identically."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from dlcli import optimizers
from dlcli.engine.layer import Param
from dlcli.errors import ConfigError, DlcliError


def _param(values, dtype=np.float64, lr_mult=None):
    layer = None if lr_mult is None else SimpleNamespace(lr_mult=lr_mult, name="layer")
    return Param("w", np.array(values, dtype), layer=layer)


def _run(opt, grads, w0=1.0):
    """Apply scalar gradients in turn to a one-element parameter; the values after each step."""
    p = _param([w0])
    out = []
    for g in grads:
        p.grad[...] = g
        opt.apply([p])
        out.append(float(p.value[0]))
    return out


G = [0.5, -0.2, 0.3]


def test_sgd_plain():
    assert _run(optimizers.SGD(learning_rate=0.1), G) == pytest.approx([0.95, 0.97, 0.94])


def test_sgd_momentum():
    # m = 0.9 m - 0.1 g; w += m
    m1 = -0.05
    m2 = 0.9 * m1 + 0.02  # -0.025
    m3 = 0.9 * m2 - 0.03  # -0.0525
    expected = [1 + m1, 1 + m1 + m2, 1 + m1 + m2 + m3]
    assert _run(optimizers.SGD(learning_rate=0.1, momentum=0.9), G) == pytest.approx(expected, abs=1e-12)


def test_sgd_nesterov():
    # m = 0.9 m - 0.1 g; w += 0.9 m - 0.1 g
    m1 = -0.05
    w1 = 1 + 0.9 * m1 - 0.05  # 0.905
    m2 = 0.9 * m1 + 0.02
    w2 = w1 + 0.9 * m2 + 0.02
    assert _run(optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True), G[:2]) == \
        pytest.approx([w1, w2], abs=1e-12)


def test_rmsprop_keras_docstring_example():
    # keras.optimizers.RMSprop(learning_rate=0.1) on loss var^2/2 from var=10 -> 9.683772
    assert _run(optimizers.RMSprop(learning_rate=0.1), [10.0], w0=10.0) == pytest.approx([9.683772], abs=1e-6)


def test_rmsprop():
    v1 = 0.1 * 0.25  # 0.9 * 0 + 0.1 * 0.5^2
    w1 = 1 - 0.1 * 0.5 / math.sqrt(v1 + 1e-7)
    v2 = 0.9 * v1 + 0.1 * 0.04
    w2 = w1 + 0.1 * 0.2 / math.sqrt(v2 + 1e-7)
    assert _run(optimizers.RMSprop(learning_rate=0.1), G[:2]) == pytest.approx([w1, w2], abs=1e-12)


def test_rmsprop_centered_with_momentum():
    v1, a1 = 0.025, 0.05  # a = 0.9 a + 0.1 g
    inc1 = 0.1 * 0.5 / math.sqrt(v1 - a1 ** 2 + 1e-7)
    m1 = inc1
    v2, a2 = 0.9 * v1 + 0.1 * 0.04, 0.9 * a1 - 0.02
    inc2 = 0.1 * -0.2 / math.sqrt(v2 - a2 ** 2 + 1e-7)
    m2 = 0.5 * m1 + inc2
    opt = optimizers.RMSprop(learning_rate=0.1, momentum=0.5, centered=True)
    assert _run(opt, G[:2]) == pytest.approx([1 - m1, 1 - m1 - m2], abs=1e-12)


def _adam_by_hand(grads, lr=0.1, b1=0.9, b2=0.999, eps=1e-7, amsgrad=False, decay=0.0, w=1.0):
    m = v = v_hat = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        w -= w * decay * lr
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        v_hat = max(v_hat, v)
        alpha = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        w -= m * alpha / (math.sqrt(v_hat if amsgrad else v) + eps)
        out.append(w)
    return out


def test_adam_first_step_by_hand():
    # t=1: m = 0.05, v = 0.00025, alpha = 0.1 * sqrt(0.001) / 0.1; step = m * alpha / (sqrt(v) + 1e-7)
    step = 0.05 * math.sqrt(0.001) / (math.sqrt(0.00025) + 1e-7)
    assert _run(optimizers.Adam(learning_rate=0.1), [0.5]) == pytest.approx([1 - step], abs=1e-12)
    assert step == pytest.approx(0.1, rel=1e-5)  # Adam's first step is ~lr


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam(amsgrad):
    grads = [0.5, 0.01, -0.3]  # v shrinks at step 2, so AMSGrad's max matters
    expected = _adam_by_hand(grads, amsgrad=amsgrad)
    assert _run(optimizers.Adam(learning_rate=0.1, amsgrad=amsgrad), grads) == pytest.approx(expected, abs=1e-12)
    if amsgrad:
        assert expected != pytest.approx(_adam_by_hand(grads), abs=1e-9)


def test_adamw_decays_before_the_adam_step():
    opt = optimizers.get("adamw")
    assert opt.weight_decay == 0.004 and opt.current_lr == 0.001
    expected = _adam_by_hand(G, lr=0.001, decay=0.004, w=2.0)
    assert _run(opt, G, w0=2.0) == pytest.approx(expected, abs=1e-12)


def test_adagrad():
    acc1 = 0.1 + 0.25
    w1 = 1 - 0.1 * 0.5 / math.sqrt(acc1 + 1e-7)
    acc2 = acc1 + 0.04
    w2 = w1 + 0.1 * 0.2 / math.sqrt(acc2 + 1e-7)
    assert _run(optimizers.Adagrad(learning_rate=0.1), G[:2]) == pytest.approx([w1, w2], abs=1e-12)


def test_keras_defaults():
    assert optimizers.get("sgd").get_config() == {"type": "sgd", "learning_rate": 0.01, "momentum": 0.0,
                                                  "nesterov": False}
    assert optimizers.get("rmsprop").get_config() == {"type": "rmsprop", "learning_rate": 0.001, "rho": 0.9,
                                                      "momentum": 0.0, "epsilon": 1e-7, "centered": False}
    assert optimizers.get("adam").get_config() == {"type": "adam", "learning_rate": 0.001, "beta_1": 0.9,
                                                   "beta_2": 0.999, "epsilon": 1e-7, "amsgrad": False}
    assert optimizers.get("adamw").get_config()["weight_decay"] == 0.004
    assert optimizers.get("adagrad").get_config() == {"type": "adagrad", "learning_rate": 0.001,
                                                      "initial_accumulator_value": 0.1, "epsilon": 1e-7}


def test_clipnorm_is_per_tensor_and_leaves_grads_untouched():
    a, b = _param([0.0, 0.0]), _param([0.0])
    a.grad[...] = [3.0, 4.0]  # norm 5 -> scaled to norm 1
    b.grad[...] = [0.5]  # norm 0.5 < 1 -> unchanged
    optimizers.SGD(learning_rate=1.0, clipnorm=1.0).apply([a, b])
    np.testing.assert_allclose(a.value, [-0.6, -0.8])
    np.testing.assert_allclose(b.value, [-0.5])
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])


def test_global_clipnorm():
    a, b = _param([0.0]), _param([0.0])
    a.grad[...], b.grad[...] = 3.0, 4.0  # global norm 5 -> scale 2/5
    optimizers.SGD(learning_rate=1.0, global_clipnorm=2.0).apply([a, b])
    np.testing.assert_allclose([a.value[0], b.value[0]], [-1.2, -1.6])


def test_clipvalue():
    p = _param([0.0, 0.0, 0.0])
    p.grad[...] = [-2.0, 0.1, 3.0]
    optimizers.SGD(learning_rate=1.0, clipvalue=0.5).apply([p])
    np.testing.assert_allclose(p.value, [0.5, -0.1, -0.5])


def test_only_one_clipping_option():
    with pytest.raises(ConfigError, match="only one of clipnorm"):
        optimizers.get({"type": "adam", "clipnorm": 1.0, "clipvalue": 0.5})


def test_lr_mult_scales_the_step():
    fast, slow, frozen = _param([1.0], lr_mult=1.0), _param([1.0], lr_mult=0.5), _param([1.0], lr_mult=0.0)
    for p in (fast, slow, frozen):
        p.grad[...] = 1.0
    optimizers.SGD(learning_rate=0.1).apply([fast, slow, frozen])
    assert (fast.value[0], slow.value[0], frozen.value[0]) == pytest.approx((0.9, 0.95, 1.0))


def test_params_without_grad_are_skipped_and_slots_follow_list_order():
    stats = Param("moving_mean", np.ones(2, np.float32), trainable=False)
    w = _param([1.0, 2.0], np.float32)
    w.grad[...] = 1.0
    opt = optimizers.Adam()
    opt.apply([stats, w])
    np.testing.assert_array_equal(stats.value, [1.0, 1.0])
    state = opt.get_state()
    assert sorted(state) == ["iterations", "learning_rate", "momentum/1", "velocity/1", "weight_paths"]
    assert list(state["weight_paths"]) == ["moving_mean", "w"]  # each index's weight, by path
    assert opt.iterations == 1 and w.value.dtype == np.float32


def test_schedule_is_called_with_the_step_count():
    opt = optimizers.SGD(learning_rate=lambda step: 0.1 / (1 + step))
    assert _run(opt, [1.0, 1.0]) == pytest.approx([0.9, 0.85])
    assert opt.current_lr == pytest.approx(0.1 / 3) and opt.learning_rate == pytest.approx(0.1 / 3)
    with pytest.raises(DlcliError, match="schedule"):
        opt.learning_rate = 0.01


def test_learning_rate_can_be_set():
    opt = optimizers.SGD(learning_rate=0.1)
    opt.learning_rate = 0.01
    assert opt.current_lr == 0.01 and _run(opt, [1.0]) == pytest.approx([0.99])
    assert opt.get_config()["learning_rate"] == 0.01


@pytest.mark.parametrize("config", [
    {"type": "nadam", "learning_rate": 0.01}, {"type": "ftrl", "l1_regularization_strength": 0.01},
    {"type": "sgd", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
    {"type": "rmsprop", "momentum": 0.5, "centered": True},
    {"type": "adam", "amsgrad": True, "clipnorm": 1.0},
    {"type": "adamw", "learning_rate": 0.01},
    {"type": "adagrad", "learning_rate": 0.1},
    {"type": "MultiOptimizer", "optimizer_map": {"default_optimizer": "adam", "optimizer_map": {
        "w0": {"type": "sgd", "momentum": 0.9}, "w[12]": {"type": "nadam", "use_ema": True}}}},
])
def test_state_round_trip_continues_bit_identically(config, tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    grads = [[rng.normal(0, 1, s).astype(np.float32) for s in shapes] for _ in range(6)]

    def params():
        init = np.random.default_rng(1)
        return [Param(f"w{i}", init.normal(0, 1, s).astype(np.float32)) for i, s in enumerate(shapes)]

    def step(opt, ps, gs):
        for p, g in zip(ps, gs):
            p.grad[...] = g
        opt.apply(ps)

    reference, ref_params = optimizers.get(dict(config)), params()
    for gs in grads:
        step(reference, ref_params, gs)

    first, ps = optimizers.get(dict(config)), params()
    for gs in grads[:3]:
        step(first, ps, gs)
    np.savez(tmp_path / "opt.npz", **first.get_state())
    assert yaml.safe_load(yaml.safe_dump(first.get_config())) == first.get_config()
    resumed = optimizers.get(first.get_config())
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as state:
        resumed.set_state(dict(state))
    assert resumed.iterations == 3
    for gs in grads[3:]:
        step(resumed, ps, gs)
    for a, b in zip(ps, ref_params):
        np.testing.assert_array_equal(a.value, b.value)
        assert a.value.dtype == np.float32


def test_get():
    opt = optimizers.get({"type": "RMSprop", "learning_rate": 0.01, "rho": 0.8})
    assert isinstance(opt, optimizers.RMSprop) and opt.rho == 0.8 and opt.current_lr == 0.01
    assert optimizers.get(opt) is opt
    with pytest.raises(ConfigError, match="did you mean 'adam'"):
        optimizers.get("adma")
    with pytest.raises(ConfigError, match="did you mean 'momentum'"):
        optimizers.get({"type": "sgd", "momentun": 0.9})
    with pytest.raises(ConfigError, match="momentum"):
        optimizers.get({"type": "sgd", "momentum": 1.5})
    with pytest.raises(ConfigError, match="learning_rate"):
        optimizers.get({"type": "sgd", "learning_rate": "fast"})


def test_against_torch():
    torch = pytest.importorskip("torch", reason="torch not installed: reference comparison skipped")
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 1, 5)
    grads = [rng.normal(0, 1, 5) for _ in range(4)]
    # Keras' Adam epsilon sits outside sqrt(v) without bias correction; with eps tiny both agree closely.
    for ours, theirs in [
        (optimizers.Adam(learning_rate=0.01, epsilon=1e-12),
         lambda p: torch.optim.Adam([p], lr=0.01, eps=1e-12)),
        (optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True),
         lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)),
    ]:
        p = _param(w0)
        tp = torch.tensor(w0, requires_grad=True)
        topt = theirs(tp)
        for g in grads:
            p.grad[...] = g
            ours.apply([p])
            tp.grad = torch.tensor(g)
            topt.step()
        np.testing.assert_allclose(p.value, tp.detach().numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec,slots", [
    ({"type": "sgd"}, 0), ({"type": "sgd", "momentum": 0.9}, 1), ({"type": "rmsprop"}, 1),
    ({"type": "rmsprop", "momentum": 0.9, "centered": True}, 3), ({"type": "adam"}, 2),
    ({"type": "adamw", "amsgrad": True}, 3), ({"type": "adagrad"}, 1), ({"type": "nadam"}, 2),
    ({"type": "adamax"}, 2), ({"type": "adadelta"}, 2), ({"type": "lion"}, 1), ({"type": "ftrl"}, 2),
    ({"type": "lamb"}, 2)])
def test_slot_count_matches_the_state_an_update_creates(spec, slots):
    from dlcli import optimizers
    from dlcli.engine.layer import Param

    opt = optimizers.get(dict(spec))
    p = Param("w", np.ones(3, np.float32))
    p.grad[...] = 0.5
    opt.apply([p])
    assert opt.slot_count() == slots == sum(len(s) for s in opt.slots.values())


def test_multi_optimizer_gives_each_weight_its_optimizer_as_keras_does():
    opt = optimizers.get({"type": "MultiOptimizer", "optimizer_map": {
        "default_optimizer": {"type": "sgd", "learning_rate": 0.5},
        "optimizer_map": {"enc/kernel": "adam", "enc/.*": {"type": "sgd", "learning_rate": 0.1}}}})
    pick = opt.optimizer_map
    assert type(pick("enc/kernel")).__name__ == "Adam"  # an exact key wins over a pattern it also matches
    assert pick("enc/bias").current_lr == 0.1 and pick("head/kernel") is pick.default_optimizer
    assert pick("enc") is pick.default_optimizer  # patterns match whole paths (re.fullmatch)
    assert opt.current_lr == 0.5 and opt.slot_count() == 2
    with pytest.raises(DlcliError, match="no one learning rate"):
        opt.learning_rate = 0.01
    p, q = Param("a", np.ones(2, np.float32)), Param("b", np.ones(2, np.float32))
    p.grad[...], q.grad[...] = 1.0, 1.0
    opt.apply([p, q])  # neither path is mapped: both take the default SGD(0.5)
    np.testing.assert_array_equal([p.value, q.value], [[0.5, 0.5], [0.5, 0.5]])
    assert opt.iterations == 1 and pick.default_optimizer.iterations == 1 and pick("enc/kernel").iterations == 0
    twice = optimizers.get({"type": "MultiOptimizer", "optimizer_map": {
        "default_optimizer": "sgd", "optimizer_map": {"e.*": "adam", ".*c": "sgd"}}})
    with pytest.raises(ConfigError, match="matches several OptimizerMap keys"):
        twice.optimizer_map("etc")
    with pytest.raises(ConfigError, match="cannot hold another"):
        optimizers.get({"type": "MultiOptimizer", "optimizer_map": {"default_optimizer": {
            "type": "MultiOptimizer", "optimizer_map": {"default_optimizer": "sgd"}}}})
    with pytest.raises(ConfigError, match="takes default_optimizer and optimizer_map"):
        optimizers.get({"type": "MultiOptimizer", "optimizer_map": {"optimizer_map": {}}})
