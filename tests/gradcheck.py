"""One float64 central-difference gradient check for layers, activations and losses (Caffe's GradientChecker)."""
import numpy as np


def numeric_grad(f, x, eps=1e-6, max_checks=60, rng=None):
    """Central differences of scalar f() w.r.t. array x (in place), at up to `max_checks` random positions."""
    rng = rng or np.random.default_rng(0)
    flat = x.flat  # writes through whatever the memory order (reshape(-1) of a Fortran array is a copy)
    idx = np.arange(x.size) if x.size <= max_checks else rng.choice(x.size, max_checks, replace=False)
    out = {}
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        out[int(i)] = (up - down) / (2 * eps)
    return out


def assert_close(analytic, numeric: dict, what: str, rtol=1e-4, atol=1e-6):
    flat = np.asarray(analytic).reshape(-1)
    for i, n in numeric.items():
        a = flat[i]
        assert abs(a - n) <= atol + rtol * max(abs(a), abs(n)), f"{what}[{i}]: analytic {a:.8g} != numeric {n:.8g}"


def check_layer(layer, input_shape, batch=3, training=False, seed=0, mask=None, int_high=None, inputs=None,
                rtol=1e-4, atol=1e-6):
    """Check d(sum(r * layer(x)))/dx and /dparams for a float64 layer against central differences.

    `input_shape` excludes the batch axis (a list of shapes for multi-input layers). `int_high` makes integer
    inputs in [0, int_high) (Embedding), which get no input-gradient check. The layer's RNG is re-seeded before
    every forward so stochastic layers (Dropout) repeat the same noise.
    """
    rng = np.random.default_rng(seed)
    layer.dtype = "float64"
    multi = isinstance(input_shape, list)
    shapes = input_shape if multi else [input_shape]
    if inputs is None:
        if int_high is not None:
            inputs = [rng.integers(0, int_high, (batch, *s)) for s in shapes]
        else:
            inputs = [rng.normal(0, 1, (batch, *s)) for s in shapes]
    layer.ensure_built(input_shape if multi else tuple(input_shape), np.random.default_rng(seed))
    for p in layer.params.values():
        noise = rng.normal(0, 0.1, p.value.shape) * (p.value.dtype.kind == "f")
        p.value = np.asarray(p.value.astype(np.float64) + noise)  # an array even for a scalar weight (shape ())
        if p.grad is not None:
            p.grad = np.zeros_like(p.value)

    def run():
        layer.rng = np.random.default_rng(seed + 1)
        layer.input_mask = mask
        return layer.forward(inputs if multi else inputs[0], training)

    out = run()
    outs = out if isinstance(out, list) else [out]
    projections = [rng.normal(0, 1, o.shape) for o in outs]

    def loss():
        o = run()
        return float(sum((a * r).sum() for a, r in zip(o if isinstance(o, list) else [o], projections)))

    loss()
    for p in layer.params.values():
        if p.grad is not None:
            p.grad[...] = 0
    g = layer.backward(projections if isinstance(out, list) else projections[0])
    grads = g if multi else [g]
    if int_high is None:
        for k, (x, gx) in enumerate(zip(inputs, grads)):
            assert gx is not None and gx.shape == x.shape, f"input gradient {k} has shape " \
                f"{None if gx is None else gx.shape}, expected {x.shape}"
            assert_close(gx, numeric_grad(loss, x, rng=rng), f"{layer.name} d/dx{k}", rtol, atol)
    for p in layer.params.values():
        if p.grad is not None:
            analytic = p.grad.copy()
            assert_close(analytic, numeric_grad(loss, p.value, rng=rng), f"{p.path}", rtol, atol)
    return out
