"""The plain ReLU's passes in one loop each. Backward: NumPy's twin, grad * (y > 0), compares into a bool array and then
multiplies float by bool through a casting loop, about 2 orders of magnitude slower at the book convnet's
64x13x13x32 (9.8 ms against 0.05, AMD EPYC shared by 8 jobs). Bit for bit the twin: the same product g * 1 or
g * 0 (so -0.0 and NaN come out as NumPy's).
"""
import numba

from dlcli.kernels.pooling import relu_of

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def relu_backward(grad, y, out):
    """grad, y, out flat and contiguous."""
    zero, one = grad.dtype.type(0), grad.dtype.type(1)
    for k in range(grad.size):
        out[k] = grad[k] * (one if y[k] > 0 else zero)


@numba.njit(**JIT)
def relu_backward_in_place(grad, y):
    """relu_backward with grad as its out: a loop over one array vectorises, where relu_backward(grad, y, grad)
    runs element by element (its arrays might overlap): 30 against 104 us at 64x14x14x32."""
    zero, one = grad.dtype.type(0), grad.dtype.type(1)
    for k in range(grad.size):
        grad[k] = grad[k] * (one if y[k] > 0 else zero)


@numba.njit(**JIT)
def relu_backward_sum(grad, other, y, out):
    """relu_backward of grad + other (a fan-out's two gradients, engine/layer.GradientSum), added as it reads them:
    the float32 sum the graph's own addition makes, then the same product, so the same bits without the pass that
    writes the sum and the one that reads it back."""
    zero, one = grad.dtype.type(0), grad.dtype.type(1)
    for k in range(grad.size):
        out[k] = (grad[k] + other[k]) * (one if y[k] > 0 else zero)


@numba.njit(**JIT)
def bias_relu(z, bias):
    """z = max(z + bias, 0) in place, z (rows, units) C-contiguous, bias (units,): Dense's bias and ReLU in one
    pass where the twin makes two over z (z += bias; np.maximum(z, 0, out=z)). Bit for bit: the same float32 sum,
    and np.maximum's answer (NaN kept, -0.0 becomes 0.0: NumPy returns its second operand for equal ones)."""
    zero = z.dtype.type(0)
    rows, units = z.shape
    for i in range(rows):
        for j in range(units):
            v = z[i, j] + bias[j]
            z[i, j] = relu_of(v, zero)
