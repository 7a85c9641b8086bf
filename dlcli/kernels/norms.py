"""The divergence gate's norms (trainer._norms): one pass over a weight and its gradient, both sums of squares at
once in float64, where two float32 np.dot passes read each array on its own. fastmath's reassociation alone (no
NaN/inf assumptions, so a NaN or inf still reaches the sum) lets the loop vectorise: the sums are then grouped by the
vector width the CPU gives, so their last bits follow the CPU (not the threads: one call, one thread).
"""
import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def squares(value, grad):
    """(sum of value's squares, sum of grad's squares), float64: flat arrays of one size."""
    weights = 0.0
    grads = 0.0
    for k in range(value.size):
        v = np.float64(value[k])
        g = np.float64(grad[k])
        weights += v * v
        grads += g * g
    return weights, grads
