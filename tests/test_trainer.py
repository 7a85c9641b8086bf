"""The trainer: class_weight / sample_weight, per-layer control (trainable, lr_mult, train.freeze), exact resume
from an in-process checkpoint, and the stop on a non-finite loss with the weights that caused it intact."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from dlcli import checkpoint
from dlcli.callbacks import Callback
from dlcli.data.dataset import Dataset
from dlcli.divergence import DivergenceError
from dlcli.layers import Dense, Dropout
from dlcli.models import Sequential
from dlcli.run_files import RunDir
from dlcli.trainer import Run


def _model(lr=0.1, optimizer="sgd", dropout=False, **dense_kw):
    layers = [Dense(4, activation="relu", input_shape=(3,), name="h", **dense_kw)]
    layers += [Dropout(0.3, name="drop")] if dropout else []
    layers += [Dense(2, activation="softmax", name="out")]
    model = Sequential(layers)
    model.build(rng=np.random.default_rng(5))  # the same initial weights and layer RNGs every time
    model.compile({"type": optimizer, "learning_rate": lr}, "sparse_categorical_crossentropy", ["accuracy"])
    return model


def _data(n=12):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def _fit(model, x, y, **kw):
    model.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0, seed=0, **kw)
    return model.get_weights()


def test_class_weight_equals_the_matching_sample_weight():
    x, y = _data()
    a = _fit(_model(), x, y, class_weight={0: 2.0, 1: 0.5})
    b = _fit(_model(), x, y, sample_weight=np.where(y == 0, 2.0, 0.5))
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=1e-6)


def test_uniform_sample_weight_scales_the_sgd_step():
    x, y = _data()
    ones = _fit(_model(lr=0.1), x, y, sample_weight=np.ones(len(x)))
    plain = _fit(_model(lr=0.1), x, y)
    doubled = _fit(_model(lr=0.1), x, y, sample_weight=np.full(len(x), 2.0))
    double_lr = _fit(_model(lr=0.2), x, y)
    for u, v in zip(ones, plain):
        np.testing.assert_array_equal(u, v)
    for u, v in zip(doubled, double_lr):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_frozen_layer_keeps_its_weights_and_lr_mult_scales_sgd_steps():
    x, y = _data()
    frozen = _model(trainable=False)
    before = frozen.get_layer("h").get_weights()
    _fit(frozen, x, y)
    for u, v in zip(before, frozen.get_layer("h").get_weights()):
        np.testing.assert_array_equal(u, v)
    base, half = _model(), _model(lr_mult=0.5)
    start = base.get_layer("h").get_weights()
    half.set_weights(base.get_weights())
    _fit(base, x, y)
    _fit(half, x, y)
    step_full = base.get_layer("h").get_weights()[0] - start[0]
    step_half = half.get_layer("h").get_weights()[0] - start[0]
    np.testing.assert_allclose(step_half, 0.5 * step_full, rtol=1e-5, atol=1e-7)  # float32 rounding of w - step


def _freeze_after_first_epoch(layer):
    class Freeze(Callback):
        def on_epoch_end(self, epoch, logs=None):
            layer.trainable = False
    return Freeze()


def _three_fits(model, x, y, frozen: bool):
    """Fit, fit with the first layer out of training, fit with it back. frozen: through `trainable` (turned off
    during the first fit's last epoch: as in Keras, from the next fit on); else through lr_mult 0, which leaves it
    in the step (its gradient computed, cleared and applied at rate 0): the reference."""
    first = model.get_layer("h")
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, seed=0,
              callbacks=[_freeze_after_first_epoch(first)] if frozen else [])
    first.lr_mult = 1.0 if frozen else 0.0
    kept = first.get_weights()
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, seed=1)
    for u, v in zip(kept, first.get_weights()):
        np.testing.assert_array_equal(u, v)  # out of training either way
    weights = model.get_weights()
    first.trainable, first.lr_mult = True, 1.0
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, seed=2)
    return weights, model.get_weights()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_layer_frozen_for_a_fit_leaves_no_gradient_and_no_optimizer_state_behind(optimizer):
    """A layer frozen mid-fit or between fits (Python API): its backward still adds to its weights' gradients, and
    the step cleared only the trainable weights', so the fit that unfroze it applied every gradient it had summed
    while frozen (fails before with SGD); and the optimizer's state, kept by index in the trainable list, passed a
    frozen first layer's moments to the next weight (fails before with Adam: the second fit differs). Now each step
    clears every gradient and each weight keeps its own state (Keras 3 keys it by variable), so the fits equal the
    reference with lr_mult 0 bit for bit (with Adam until the unfreezing: the reference's moments moved meanwhile,
    the frozen layer's waited aside, as in Keras)."""
    x, y = _data(16)
    frozen, reference = _model(optimizer=optimizer), _model(optimizer=optimizer)
    (second, third), (second_ref, third_ref) = _three_fits(frozen, x, y, True), _three_fits(reference, x, y, False)
    for u, v in zip(second, second_ref):
        np.testing.assert_array_equal(u, v)
    if optimizer == "sgd":  # stateless: the fit after unfreezing too
        for u, v in zip(third, third_ref):
            np.testing.assert_array_equal(u, v)


def test_a_frozen_base_computes_no_weight_gradient_and_trains_again_once_unfrozen():
    """Fine-tuning as in Chollet ch. 8: a frozen conv base under a Dense head. Keras takes no gradient for a
    non-trainable variable; the base's backward computed its kernels' (and BatchNormalization's gamma/beta) products
    all the same, for nothing (fails before: the frozen weights held gradient arrays). Its input gradient is still
    computed: the layer under it is trainable. Unfrozen, the next fit trains it."""
    from dlcli.layers import BatchNormalization, Conv2D, Flatten

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 8, 8, 1)).astype(np.float32), np.arange(8) % 2
    model = Sequential([Conv2D(4, 3, activation="relu", input_shape=(8, 8, 1), name="first"),
                        Conv2D(4, 3, name="base"), BatchNormalization(name="bn"), Flatten(),
                        Dense(2, activation="softmax", name="head")])
    model.build(rng=np.random.default_rng(1))
    model.compile("adam", "sparse_categorical_crossentropy")
    for name in ("base", "bn"):
        model.get_layer(name).trainable = False
    frozen = [p for name in ("base", "bn") for p in model.get_layer(name).weights]
    kept = [p.value.copy() for p in frozen]
    first = model.get_layer("first").get_weights()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, seed=0)
    assert all(p.grad is None for p in frozen)
    assert all(np.array_equal(p.value, v) for p, v in zip(frozen, kept))
    assert not np.array_equal(first[0], model.get_layer("first").get_weights()[0])  # the gradient went through
    for name in ("base", "bn"):
        model.get_layer(name).trainable = True
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, seed=0)
    assert all(p.grad is not None for p in model.trainable_weights)
    assert not np.array_equal(kept[0], model.get_layer("base").get_weights()[0])


def test_a_weight_back_in_training_takes_back_its_own_optimizer_state():
    x, y = _data(16)
    model = _model(optimizer="adam")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, seed=0)
    optimizer, first = model.optimizer, model.get_layer("h")
    moments = {name: [a.copy() for _, a in sorted(per.items())] for name, per in optimizer.slots.items()}
    first.trainable = False
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, seed=1)
    assert all(len(per) == 2 for per in optimizer.slots.values())  # the output layer's kernel and bias
    for name, per in optimizer.slots.items():  # the output layer's moments moved on, at its new indices
        assert [a.shape for _, a in sorted(per.items())] == [(4, 2), (2,)]
        assert not np.array_equal(per[0], moments[name][2])
    first.trainable = True
    optimizer.follow(model.trainable_weights)
    for name, per in optimizer.slots.items():  # the first layer's own, untouched while it was frozen
        np.testing.assert_array_equal(per[0], moments[name][0])
        np.testing.assert_array_equal(per[1], moments[name][1])


def test_freeze_patterns_and_inspect_shapes_show_frozen(tmp_path):
    from typer.testing import CliRunner

    from dlcli.cli import app

    path = tmp_path / "f.yaml"
    path.write_text("""
name: f
data: {type: npz, path: x.npz}
model:
  input_shape: [3]
  layers:
    - {type: Dense, units: 4, name: h1}
    - {type: Dense, units: 4, name: h2, lr_mult: 0.1}
    - {type: Dense, units: 2, name: out, trainable: false}
compile: {optimizer: sgd, loss: mse}
train: {freeze: ["h1"]}
""")
    result = CliRunner().invoke(app, ["inspect-shapes", str(path)])
    assert result.exit_code == 0, result.output
    assert "h1 (frozen)" in result.output and "out (frozen)" in result.output and "h2 (frozen)" not in result.output
    assert "trainable 20, non-trainable 26" in result.output


class StopAfter(Callback):
    def __init__(self, trainer, batches):
        self.trainer, self.left = trainer, batches

    def on_train_batch_end(self, batch, logs=None):
        self.left -= 1
        if self.left == 0:
            self.trainer.stop()


def test_in_process_stop_and_resume_is_bit_identical(tmp_path):
    x, y = _data(40)

    def trainer_for(model, path):
        return Run(model, verbose=0, rng=np.random.default_rng(7), files=RunDir(path), checkpoint_every=2)

    ref = _model(optimizer="adam", dropout=True)
    trainer_for(ref, tmp_path / "ref").fit(Dataset([x], [y]), epochs=3, batch_size=6)

    first = _model(optimizer="adam", dropout=True)
    t = trainer_for(first, tmp_path / "run")
    t.callbacks.append(StopAfter(t, 10))
    t.fit(Dataset([x], [y]), epochs=3, batch_size=6)
    assert t.position["epoch"] == 1 and t.position["batch"] == 3  # 7 batches per epoch
    state = checkpoint.load(tmp_path / "run")
    resumed = _model(optimizer="adam", dropout=True)
    resumed.get_layer("drop").rng = np.random.default_rng(0)  # resume must restore the layer RNG, not reuse it
    history = trainer_for(resumed, tmp_path / "run").fit(Dataset([x], [y]), epochs=3, batch_size=6, resume=state)
    for u, v in zip(ref.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(u, v)
    assert history.epoch == [1, 2]


def test_a_conv_that_pools_its_own_output_in_training_resumes_bit_identical(tmp_path):
    """A conv reading the inputs pools its own output in training (graph.poolable_in_training) and holds the pooling
    in `pool_after` after a step: the checkpoint must still name the pooling by its own name. It was saved as
    "conv/pool_after", so resuming the book convnet failed ("was written for layers ...")."""
    from dlcli.layers import Conv2D, Flatten, MaxPooling2D

    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 8, 8, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64)

    def model():
        m = Sequential([Conv2D(4, 3, activation="relu", input_shape=(8, 8, 1), name="conv"),
                        MaxPooling2D(2, name="pool"), Flatten(name="flat"), Dense(2, activation="softmax", name="out")])
        m.build(rng=np.random.default_rng(5))
        m.compile({"type": "rmsprop", "learning_rate": 0.01}, "sparse_categorical_crossentropy", ["accuracy"])
        return m

    def trainer_for(m, path):
        return Run(m, verbose=0, rng=np.random.default_rng(7), files=RunDir(path), checkpoint_every=2)

    ref = model()
    trainer_for(ref, tmp_path / "ref").fit(Dataset([x], [y]), epochs=2, batch_size=6)
    assert ref.layers[0].pool_after is ref.layers[1]  # the case: the conv pooled its output in training
    assert set(checkpoint.layer_paths(ref)) == {"conv", "pool", "flat", "out"}
    first = model()
    t = trainer_for(first, tmp_path / "run")
    t.callbacks.append(StopAfter(t, 5))
    t.fit(Dataset([x], [y]), epochs=2, batch_size=6)
    state = checkpoint.load(tmp_path / "run")
    assert set(state["header"]["rngs"]) == {"conv", "pool", "flat", "out"}
    rngs = state["header"]["rngs"]
    rngs["conv/pool_after"] = rngs.pop("pool")  # as the checkpoints written before: they resume too
    resumed = model()
    trainer_for(resumed, tmp_path / "run").fit(Dataset([x], [y]), epochs=2, batch_size=6, resume=state)
    for u, v in zip(ref.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(u, v)


def test_a_run_resumed_while_a_layer_is_frozen_continues_as_the_uninterrupted_one(tmp_path):
    """A fit with Adam, then a fit with the first layer frozen (its moments wait aside, Optimizer.follow) that is
    stopped and resumed in a new model from its checkpoint, then a fit with the layer unfrozen: the checkpoint kept
    only the trained weights' state, by index, so the resumed run's layer came back with no moments (fails before);
    now they are saved by weight path and the run ends bit for bit as the uninterrupted one. The same file state
    serves a saved model (Model.save, load_model) loaded and unfrozen."""
    from dlcli.builder import load_model

    x, y = _data(40)

    def frozen_after_one_fit():
        model = _model(optimizer="adam")
        model.fit(x, y, epochs=1, batch_size=6, verbose=0, seed=0)
        model.get_layer("h").trainable = False
        return model

    def second_fit(model, path, stop=None, resume=None):
        run = Run(model, verbose=0, rng=np.random.default_rng(7), files=RunDir(path), checkpoint_every=2)
        if stop:
            run.callbacks.append(StopAfter(run, stop))
        run.fit(Dataset([x], [y]), epochs=2, batch_size=6, resume=resume)

    def unfrozen_fit(model):
        model.get_layer("h").trainable = True
        model.fit(x, y, epochs=1, batch_size=6, verbose=0, seed=1)
        return model.get_weights()

    ref = frozen_after_one_fit()
    second_fit(ref, tmp_path / "ref")
    ref.save(tmp_path / "model.npz")
    want = unfrozen_fit(ref)
    second_fit(frozen_after_one_fit(), tmp_path / "run", stop=10)
    resumed = _model(optimizer="adam")
    resumed.get_layer("h").trainable = False
    second_fit(resumed, tmp_path / "run", resume=checkpoint.load(tmp_path / "run"))
    loaded = load_model(tmp_path / "model.npz")
    assert not loaded.get_layer("h").trainable  # Keras' get_config: the layer's trainable flag as it is
    for got in (unfrozen_fit(resumed), unfrozen_fit(loaded)):
        for u, v in zip(want, got):
            np.testing.assert_array_equal(u, v)


def test_batch_size_change_on_resume_is_refused(tmp_path):
    x, y = _data(12)
    model = _model()
    Run(model, verbose=0, files=RunDir(tmp_path)).fit(Dataset([x], [y]), epochs=1, batch_size=4)
    with pytest.raises(Exception, match="batch_size must not change"):
        Run(_model(), verbose=0).fit(Dataset([x], [y]), epochs=2, batch_size=6, resume=checkpoint.load(tmp_path))


def test_nan_loss_stops_before_the_update_and_names_the_layer():
    x, y = _data()
    model = _model()
    model.get_layer("out").params["kernel"].value[0, 0] = np.nan
    weights = model.get_weights()
    with pytest.raises(DivergenceError) as info:
        model.fit(x, y, epochs=1, batch_size=4, verbose=0, seed=0)
    report = info.value.report
    assert (report["epoch"], report["batch"], report["non_finite"]) == (1, 0, "loss")
    assert report["diagnosis"]["first_nonfinite_forward"] == "out"
    assert report["diagnosis"]["nonfinite_weights"] == ["out/kernel"]
    assert len(report["sample_indices"]) == 4 and "learning rate" in report["hint"]
    for u, v in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(u, v)  # nothing was applied
    assert "forward" not in vars(model.get_layer("h"))  # the checking wrappers are gone


def test_model_train_step_is_fits_step_with_its_divergence_gate():
    x, y = _data()
    model = _model()
    model.get_layer("out").params["kernel"].value[0, 0] = np.nan
    weights = model.get_weights()
    with pytest.raises(DivergenceError) as info:
        model.train_step([x[:5]], [y[:5]])
    assert info.value.report["non_finite"] == "loss" and info.value.report["sample_indices"] == [0, 1, 2, 3, 4]
    for u, v in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(u, v)  # nothing was applied


def test_diagnose_names_the_first_layer_gone_non_finite_and_leaves_layers_untouched():
    from dlcli.divergence import diagnose

    model = _model()
    x, y = _data()
    model.get_layer("out").params["kernel"].value[0, 0] = np.inf
    report = diagnose(model, [x], [y])
    assert report["first_nonfinite_forward"] == "out" and report["first_nonfinite_backward"] == "out"
    assert report["nonfinite_weights"] == ["out/kernel"] and report["nonfinite_inputs"] == []
    model.get_layer("out").params["kernel"].value[0, 0] = 0.0
    report = diagnose(model, [x], [y])
    assert report["first_nonfinite_forward"] is None and report["first_nonfinite_backward"] is None
    model.get_layer("h").params["kernel"].value[0, 0] = np.inf  # the first layer's output is already non-finite
    report = diagnose(model, [x], [y])
    assert report["first_nonfinite_forward"] == "h" and report["nonfinite_weights"] == ["h/kernel"]
    model.get_layer("h").params["kernel"].value[0, 0] = 0.0
    assert all("forward" not in vars(layer) and "backward" not in vars(layer) for layer in model.layers)
    assert all(not p.grad.any() for p in model.trainable_weights)


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_the_gates_norms_are_float64_sums_and_overflow_where_float32_passes_did(path, monkeypatch):
    from dlcli.trainer import _norms

    monkeypatch.setenv("DLCLI_KERNELS", path)
    rng = np.random.default_rng(0)
    params = [SimpleNamespace(value=rng.standard_normal(shape).astype(np.float32),
                              grad=rng.standard_normal(shape).astype(np.float32)) for shape in [(37, 29), (29,), (3,)]]
    exact = [math.sqrt(sum(float(np.sum(getattr(p, a).astype(np.float64) ** 2)) for p in params))
             for a in ("value", "grad")]
    np.testing.assert_allclose(_norms(params), exact, rtol=1e-12 if path == "numba" else 1e-6)  # NumPy: float32 sums
    params[0].grad[3, 4] = 2e19  # finite, but its square is beyond float32's largest value
    assert _norms(params)[1] == math.inf and math.isfinite(_norms(params)[0])
    params[0].grad[3, 4] = np.nan
    assert math.isnan(_norms(params)[1])


def test_norms_every_tenth_step_and_a_nonfinite_gradient_between_stops_before_the_epoch_ends():
    from dlcli.trainer import NORM_EVERY

    x, y = _data(12)
    trainer = Run(_model(), verbose=0, rng=np.random.default_rng(0))
    trainer.fit(Dataset([x], [y]), epochs=25, batch_size=12)  # 25 steps: norms at steps 0, 10, 20
    assert NORM_EVERY == 10 and len(trainer.norms) == 3
    model = _model()
    Run(model, verbose=0, rng=np.random.default_rng(0)).fit(Dataset([x], [y]), epochs=1, batch_size=12)  # step 0 checked
    model.get_layer("h").backward = lambda grad: (model.get_layer("h").params["kernel"].grad.fill(np.inf), grad)[1]

    class Ended(Callback):
        epochs = []

        def on_epoch_end(self, epoch, logs=None):  # where ModelCheckpoint writes weights
            self.epochs.append(epoch)

    with pytest.raises(DivergenceError) as info:
        Run(model, [Ended()], verbose=0, rng=np.random.default_rng(0)).fit(Dataset([x], [y]), epochs=3, batch_size=12)
    report = info.value.report
    assert (report["non_finite"], report["step"]) == ("weights", 2)  # the unchecked step 1 broke them
    assert "h/kernel" in report["diagnosis"]["nonfinite_weights"]
    assert Ended.epochs == [] and "Nothing was saved with these weights" in info.value.message


def _constant_model():
    """y_hat = 0 whatever x (zero weights, learning rate 0): each batch's MSE is the mean of its y**2."""
    model = Sequential([Dense(1, input_shape=(1,), kernel_initializer="zeros", name="out")])
    model.build(rng=np.random.default_rng(0))
    model.compile({"type": "sgd", "learning_rate": 0.0}, "mse")
    return model


def test_the_rise_rule_measures_against_a_first_loss_of_at_least_one():
    """A first batch loss of 0 must not make every later loss a 'rise': the base is floored at 1, so a loss of 9
    stays far below 1e4 times it."""
    x = np.zeros((8, 1), np.float32)
    y = np.repeat([0.0, 3.0], 4).astype(np.float32)[:, None]  # batch losses 0, then 9
    trainer = Run(_constant_model(), verbose=0, rng=np.random.default_rng(0))
    history = trainer.fit(Dataset([x], [y]), epochs=1, batch_size=4, shuffle=False)
    assert trainer.initial_loss == 0.0 and trainer.rise_base() == 1.0
    assert history.history["loss"] == [pytest.approx(4.5)]


def test_initial_loss_is_restored_on_resume(tmp_path):
    """The rise rule keeps the run's first loss across a resume: batch losses 100, 1, 100 with divergence_factor
    10 complete (100 < 10 * 100), also when resumed after the first batch, whose 1 must not become the base."""
    x = np.zeros((12, 1), np.float32)
    y = np.repeat([10.0, 1.0, 10.0], 4).astype(np.float32)[:, None]

    def trainer(path):
        return Run(_constant_model(), verbose=0, rng=np.random.default_rng(0), files=RunDir(path),
                       divergence_factor=10)

    trainer(tmp_path / "whole").fit(Dataset([x], [y]), epochs=1, batch_size=4, shuffle=False)
    first = trainer(tmp_path / "run")
    first.callbacks.append(StopAfter(first, 1))
    first.fit(Dataset([x], [y]), epochs=1, batch_size=4, shuffle=False)
    state = checkpoint.load(tmp_path / "run")
    assert state["header"]["position"]["batch"] == 1 and state["header"]["position"]["initial_loss"] == 100.0
    resumed = trainer(tmp_path / "run")
    resumed.fit(Dataset([x], [y]), epochs=1, batch_size=4, shuffle=False, resume=state)
    assert resumed.initial_loss == 100.0
