"""Learning-rate schedules against their closed forms (Keras 3 formulas; one-cycle as PyTorch's OneCycleLR), and
their two uses: as an optimizer's learning_rate (called with the step) and through LearningRateScheduler."""
import math

import numpy as np
import pytest

from dlcli import optimizers, schedules
from dlcli.errors import ConfigError


def test_piecewise_constant_is_inclusive_on_the_right_as_in_keras():
    s = schedules.get({"type": "piecewise_constant", "boundaries": [100, 110], "values": [1.0, 0.5, 0.1]})
    assert [s(t) for t in (0, 100, 101, 110, 111, 10_000)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]
    assert schedules.get({"type": "step", "boundaries": [1], "values": [2.0, 1.0]})(2) == 1.0
    with pytest.raises(ConfigError, match="one more value"):
        schedules.get({"type": "PiecewiseConstantDecay", "boundaries": [1, 2], "values": [1.0]})


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay(staircase):
    s = schedules.get({"type": "ExponentialDecay", "initial_learning_rate": 0.1, "decay_steps": 10,
                       "decay_rate": 0.5, "staircase": staircase})
    for t in (0, 5, 10, 25):
        p = math.floor(t / 10) if staircase else t / 10
        assert s(t) == pytest.approx(0.1 * 0.5 ** p, rel=1e-12)


def test_cosine_decay_without_and_with_warmup():
    s = schedules.get({"type": "cosine_decay", "initial_learning_rate": 0.2, "decay_steps": 100, "alpha": 0.1})
    for t in (0, 25, 50, 100, 150):
        c = 0.5 * (1 + math.cos(math.pi * min(t, 100) / 100))
        assert s(t) == pytest.approx(0.2 * (0.9 * c + 0.1), rel=1e-12)
    w = schedules.get({"type": "cosine_decay", "initial_learning_rate": 0.0, "decay_steps": 100,
                       "warmup_target": 1.0, "warmup_steps": 10})
    assert [w(t) for t in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])  # linear warm-up to the peak
    assert w(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert w(110) == pytest.approx(0.0, abs=1e-15) and w(500) == pytest.approx(0.0, abs=1e-15)


def test_one_cycle_matches_pytorch_formula():
    s = schedules.get({"type": "one_cycle", "max_learning_rate": 1.0, "total_steps": 100})
    initial, final = 1.0 / 25, 1.0 / 25 / 1e4
    assert s(0) == pytest.approx(initial)
    assert s(29) == pytest.approx(1.0)  # the peak at pct_start * total_steps - 1
    assert s(99) == pytest.approx(final)
    mid = 29 + (99 - 29) / 2
    assert s(mid) == pytest.approx(final + (1.0 - final) / 2)
    lrs = [s(t) for t in range(100)]
    assert np.argmax(lrs) == 29 and all(a <= b for a, b in zip(lrs[:29], lrs[1:30]))


def test_schedule_as_optimizer_learning_rate_round_trips():
    spec = {"type": "sgd", "learning_rate": {"type": "exponential_decay", "initial_learning_rate": 0.1,
                                             "decay_steps": 1, "decay_rate": 0.5}}
    opt = optimizers.get(spec)
    assert opt.current_lr == pytest.approx(0.1)
    opt.iterations = 2
    assert opt.current_lr == pytest.approx(0.025)
    assert opt.get_config()["learning_rate"] == {"type": "exponential_decay", "initial_learning_rate": 0.1,
                                                 "decay_steps": 1, "decay_rate": 0.5, "staircase": False}


def test_schedule_in_a_config_trains():
    from dlcli.builder import build_model
    from dlcli.config import parse_config

    text = """
name: s
model: {input_shape: [3], layers: [{type: Dense, units: 2, activation: softmax, name: d}]}
data: {type: npz, path: x.npz}
compile:
  optimizer: {type: sgd, learning_rate: {type: cosine_decay, initial_learning_rate: 0.1, decay_steps: 4}}
  loss: sparse_categorical_crossentropy
"""
    model = build_model(parse_config(text, "s.yaml"))
    x, y = np.ones((8, 3), np.float32), np.zeros(8, np.int64)
    history = model.fit(x, y, epochs=3, batch_size=4, verbose=0, seed=0)
    lr = [0.1 * 0.5 * (1 + math.cos(math.pi * min(t, 4) / 4)) for t in (2, 4, 6)]  # after 2, 4, 6 steps
    assert history.history["learning_rate"] == pytest.approx(lr)


def test_unknown_schedule_suggests():
    with pytest.raises(ConfigError, match="did you mean 'cosine_decay'"):
        schedules.get({"type": "cosine_decy"})
