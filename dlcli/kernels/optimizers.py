"""The optimizers' update rules in one pass over each parameter, where the NumPy twins (optimizers.py) make 6-10
(each in-place ufunc reads and writes the whole array). Bit for bit the twins': the same float32 operations in the
same order on each element (the constants arrive as the parameter's dtype, as NumPy casts a Python float, and
without fastmath nothing is fused or reordered). Arrays are flat and contiguous; an unused slot is passed as an
empty array and never read.
"""
import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")  # no ZeroDivisionError check: it stops vectorisation


@numba.njit(**JIT)
def sgd(value, grad, m, lr, momentum, use_momentum, nesterov):
    for k in range(value.size):
        step = grad[k] * lr
        if not use_momentum:
            value[k] -= step
            continue
        mk = m[k] * momentum - step
        m[k] = mk
        if nesterov:
            value[k] = (value[k] - step) + mk * momentum
        else:
            value[k] += mk


@numba.njit(**JIT)
def rmsprop(value, grad, v, a, m, lr, rho, one_minus_rho, epsilon, momentum, centered, use_momentum):
    for k in range(value.size):
        g = grad[k]
        vk = v[k] * rho + (g * g) * one_minus_rho
        v[k] = vk
        if centered:
            ak = a[k] * rho + g * one_minus_rho
            a[k] = ak
            s = (vk - ak * ak) + epsilon
        else:
            s = vk + epsilon
        s = (g / np.sqrt(s)) * lr
        if use_momentum:
            s = m[k] * momentum + s
            m[k] = s
        value[k] -= s


@numba.njit(**JIT)
def adam(value, grad, m, v, v_hat, alpha, one_minus_beta_1, one_minus_beta_2, epsilon, amsgrad):
    for k in range(value.size):
        g = grad[k]
        mk = m[k] + (g - m[k]) * one_minus_beta_1
        m[k] = mk
        vk = v[k] + (g * g - v[k]) * one_minus_beta_2
        v[k] = vk
        if amsgrad:  # np.maximum: NaN from either side
            h = v_hat[k]
            vk = h if h > vk or h != h else vk
            v_hat[k] = vk
        value[k] -= (mk / (np.sqrt(vk) + epsilon)) * alpha
