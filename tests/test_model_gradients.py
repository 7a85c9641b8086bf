"""What the optimizer actually receives: the gradients in place when `Model.train_step` and the trainer's step
(`fit`'s, with its divergence gate) hand the weights over to `optimizer.apply`, against central differences of loss + regularisation loss, on a graph with a Conv2D
called twice (shared weights), an LSTM and L1/L2 regularisers. Layer-level checks cannot see a gradient assigned
instead of accumulated (only a shared layer calls backward twice) or a regulariser's gradient scaled wrong."""
import numpy as np
import pytest

from dlcli.builder import build_model
from dlcli.config import Config
from dlcli.diagnostics import to_float64
from dlcli.trainer import Run

MODEL = {
    "type": "functional",
    "inputs": [{"name": "img", "shape": [5, 5, 2]}, {"name": "seq", "shape": [4, 3]}],
    "layers": [
        {"name": "conv", "type": "Conv2D", "filters": 2, "kernel_size": 3, "padding": "same", "activation": "tanh",
         "kernel_regularizer": {"l2": 0.3}, "bias_regularizer": {"l1": 0.2}, "inputs": "img"},
        {"name": "conv_again", "shares": "conv", "inputs": "conv"},
        {"name": "pool", "type": "GlobalAveragePooling2D", "inputs": "conv_again"},
        {"name": "lstm", "type": "LSTM", "units": 3, "kernel_regularizer": {"l2": 0.1},
         "recurrent_regularizer": {"l2": 0.05}, "inputs": "seq"},
        {"name": "cat", "type": "Concatenate", "inputs": ["pool", "lstm"]},
        {"name": "out", "type": "Dense", "units": 2, "kernel_regularizer": {"l1": 0.01, "l2": 0.02}, "inputs": "cat"},
    ],
    "outputs": ["out"],
}


def _model():
    cfg = {"name": "grads", "seed": 0, "data": {"type": "none"}, "model": MODEL,
           "compile": {"optimizer": {"type": "sgd", "learning_rate": 0.0}, "loss": "mse"}}
    model = build_model(Config.model_validate(cfg))  # every default filled in
    to_float64(model)
    rng = np.random.default_rng(1)
    for p in model.weights:  # biases away from zero: the L1 kink is not at the checked point
        p.value += rng.normal(0, 0.2, p.value.shape)
    xs = [rng.normal(size=(3, 5, 5, 2)), rng.normal(size=(3, 4, 3))]
    ys = [rng.normal(size=(3, 2))]
    return model, xs, ys


def optimizer_gradients(model, xs, ys, step) -> dict:
    received = {}
    apply = model.optimizer.apply

    def capture(params):
        received.update({p.path: p.grad.copy() for p in params})
        apply(params)

    model.optimizer.apply = capture
    if step == "Model.train_step":
        received["loss"], _, _ = model.train_step(xs, ys)
    else:
        received["loss"], _, _ = Run(model, verbose=0).step(xs, ys)
    return received


@pytest.mark.parametrize("step", ["Model.train_step", "Run.step"])
def test_train_step_hands_the_optimizer_the_gradient_of_loss_plus_regularisation(step):
    model, xs, ys = _model()
    received = optimizer_gradients(model, xs, ys, step)

    def objective():
        total, _, _ = model.compute_loss(ys, model.graph.forward(xs, training=True), with_grads=False)
        return total + model.regularization_loss()

    assert received["loss"] == pytest.approx(objective(), rel=1e-12)  # the loss it reports includes the penalty
    paths = {p.path for p in model.trainable_weights}
    assert {"conv/kernel", "conv/bias", "lstm/recurrent_kernel", "out/kernel"} <= paths
    assert len(model.get_layer("conv").nodes) == 2  # called twice: its gradient is the sum of both calls'
    rng = np.random.default_rng(2)
    eps = 1e-6
    for p in model.trainable_weights:
        analytic = received[p.path]
        for i in rng.choice(p.value.size, min(8, p.value.size), replace=False):
            old = p.value.flat[i]
            p.value.flat[i] = old + eps
            up = objective()
            p.value.flat[i] = old - eps
            down = objective()
            p.value.flat[i] = old
            numeric = (up - down) / (2 * eps)
            a = analytic.flat[i]
            assert abs(a - numeric) <= 1e-7 + 1e-6 * max(abs(a), abs(numeric)), \
                f"{p.path}[{i}]: optimizer receives {a:.10g}, the loss' derivative is {numeric:.10g}"

