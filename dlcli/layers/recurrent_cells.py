"""The time loops of SimpleRNN, LSTM and GRU: forward scans and backprop through time, as pure functions.

Shapes are time-major inside: `xp` (T, batch, gates * units) holds the input projections of every step, computed
by the layer in one matmul before the loop, so only the recurrence `h @ recurrent_kernel` runs per step. Caches are
preallocated (T, batch, ...) arrays, per-step work is in-place ufuncs, and everything that does not depend on the
running gradient (activation derivatives, mask factors) is computed for all steps at once before the backward loop.

Masks follow Keras: `step_mask` (T, batch, 1) bool; a masked step keeps the previous state (and so outputs the
previous output). `rec_mask` (G, batch, units) is the recurrent dropout mask, one per gate when G > 1 (Keras'
implementation 1, used whenever recurrent_dropout > 0).
"""
import numpy as np

from dlcli.engine import activations, blas


def _sigmoid_(z):
    # sigmoid(z) = 0.5 * tanh(z / 2) + 0.5: in place and free of overflow warnings.
    z *= 0.5
    np.tanh(z, out=z)
    z *= 0.5
    z += 0.5


def _via_object(name):
    def apply(z):
        z[...] = activations.get(name).forward(z)
    return apply


_ACTIVATE = {
    "linear": lambda z: None,
    "relu": lambda z: np.maximum(z, 0, out=z),
    "sigmoid": _sigmoid_,
    "tanh": lambda z: np.tanh(z, out=z),
    "elu": _via_object("elu"),
    "selu": _via_object("selu"),
    "softplus": _via_object("softplus"),
}
# Activations a recurrent layer accepts: those whose derivative is a function of their output
# (activations.Activation.output_derivative), so the backward pass needs only the cached outputs.
SUPPORTED = sorted(name for name in activations.ACTIVATIONS if name in _ACTIVATE
                   and activations.ACTIVATIONS.get(name).output_derivative is not None)
# tanh-only fast path: sigmoid(z) = 0.5 * tanh(0.5 z) + 0.5, so scaling a gate's weights by 0.5 makes one tanh
# call activate all gates at once; (scale, offset) per activation.
_TANH_FORM = {"sigmoid": (0.5, 0.5), "tanh": (1.0, 0.0)}


def activate_(name, z):
    """Apply activation `name` to z in place (z may be a strided view)."""
    _ACTIVATE[name](z)


def derivative(name, y):
    return activations.ACTIVATIONS.get(name).output_derivative(y)


def tanh_form(names, units, dtype):
    """Per-column (scale, offset) so that act(z) = offset + scale * tanh(scale * z) for gate activations
    `names`; None when one of them is neither sigmoid nor tanh."""
    if not all(n in _TANH_FORM for n in names):
        return None
    scale = np.repeat([_TANH_FORM[n][0] for n in names], units).astype(dtype)
    offset = np.repeat([_TANH_FORM[n][1] for n in names], units).astype(dtype)
    return scale, offset


# LSTM fast path: act(z) = offset + scale / (1 + exp(prescale * z)), (prescale, scale, offset) per activation.
# NumPy's float32 exp is about twice as fast as its tanh, so exp, +1 and a reciprocal over all four gates beat
# tanh and the affine fix-up of the tanh form; the prescale is folded into the weights by the layer.
_EXP_FORM = {"sigmoid": (-1.0, 1.0, 0.0), "tanh": (-2.0, 2.0, -1.0)}


def exp_form(names, units, dtype):
    """Per-column (prescale, scale, offset) for gate activations `names` (see _EXP_FORM); None when one of them is
    neither sigmoid nor tanh."""
    if not all(n in _EXP_FORM for n in names):
        return None
    return tuple(np.repeat([_EXP_FORM[n][k] for n in names], units).astype(dtype) for k in range(3))


# --- the recurrent matmul, with optional per-gate recurrent dropout ---------------------------------------------
def recurrent_matmul(h, U, rec_mask, out):
    """out = h @ U, where gate g sees h * rec_mask[g] (one shared mask when rec_mask has one row)."""
    if rec_mask is None:
        np.matmul(h, U, out=out)
    elif len(rec_mask) == 1:
        np.matmul(h * rec_mask[0], U, out=out)
    else:
        G, B, u = rec_mask.shape
        per_gate = np.matmul(h * rec_mask, U.reshape(u, G, u).transpose(1, 0, 2))  # (G, B, u)
        out.reshape(B, G, u)[...] = per_gate.transpose(1, 0, 2)


def recurrent_matmul_T(dz, UT, rec_mask, out):
    """The gradient of `recurrent_matmul` w.r.t. h: out = dz @ U.T, given UT = U.T made contiguous once per
    backward pass (BLAS is markedly faster on it than on the transposed view)."""
    if rec_mask is None:
        np.matmul(dz, UT, out=out)
    elif len(rec_mask) == 1:
        np.matmul(dz, UT, out=out)
        out *= rec_mask[0]
    else:
        G, B, u = rec_mask.shape
        per_gate = np.matmul(dz.reshape(B, G, u).transpose(1, 0, 2), UT.reshape(G, u, u))
        per_gate *= rec_mask
        per_gate.sum(0, out=out)


def recurrent_kernel_grad(H_prev, dZ, rec_mask):
    """dL/dU from all steps at once: H_prev (T, B, u) states the recurrence read, dZ (T, B, G*u)."""
    u = H_prev.shape[-1]
    if rec_mask is None or len(rec_mask) == 1:
        h = H_prev if rec_mask is None else H_prev * rec_mask[0]
        return h.reshape(-1, u).T @ dZ.reshape(-1, dZ.shape[-1])
    G = len(rec_mask)
    return np.concatenate([(H_prev * rec_mask[g]).reshape(-1, u).T @ dZ[..., g * u:(g + 1) * u].reshape(-1, u)
                           for g in range(G)], axis=1)


def _to_previous_h(dz, UT, rec_mask, dh, keep, carry):
    """dh <- the gradient reaching h_{t-1}: through the recurrent matmul, plus dh itself where step t was masked
    (`keep` = 1 - mask, or None without masks)."""
    if keep is not None:
        np.multiply(dh, keep, out=carry)
    recurrent_matmul_T(dz, UT, rec_mask, dh)
    if keep is not None:
        dh += carry


def _mask_factors(step_mask, dtype):
    m = step_mask.astype(dtype)
    return m, 1 - m


# --- SimpleRNN: h_t = act(x_t W + b + h_{t-1} U) ----------------------------------------------------------------
def simple_forward(xp, U, act, step_mask=None, rec_mask=None):
    T, B, u = xp.shape
    H = np.zeros((T + 1, B, u), xp.dtype)
    with blas.one_thread():  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T):
            h = H[t + 1]
            recurrent_matmul(H[t], U, rec_mask, h)
            h += xp[t]
            activate_(act, h)
            if step_mask is not None:
                np.copyto(h, H[t], where=~step_mask[t])
    return H, dict(H=H, U=U, act=act, step_mask=step_mask, rec_mask=rec_mask)


def simple_backward(cache, dY, dh):
    """dY (T, B, u) gradients of every step's output or None; dh the final state's gradient.
    Returns dXP (T, B, u) and dU."""
    H, U, step_mask, rec_mask = cache["H"], cache["U"], cache["step_mask"], cache["rec_mask"]
    T = H.shape[0] - 1
    UT = np.ascontiguousarray(U.T)
    D = derivative(cache["act"], H[1:])
    keep = None
    if step_mask is not None:
        m, keep = _mask_factors(step_mask, H.dtype)
        D *= m
    dXP = np.empty_like(D)
    dh, carry = dh.copy(), np.empty_like(dh)
    with blas.one_thread():  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T - 1, -1, -1):
            if dY is not None:
                dh += dY[t]
            np.multiply(dh, D[t], out=dXP[t])
            _to_previous_h(dXP[t], UT, rec_mask, dh, None if keep is None else keep[t], carry)
    return dXP, recurrent_kernel_grad(H[:-1], dXP, rec_mask)


# --- LSTM (Keras gate order i, f, c, o): c_t = f c_{t-1} + i g, h_t = o act(c_t) --------------------------------
def lstm_forward(xp, U, act, rec_act, step_mask=None, rec_mask=None, form=None):
    """`form` = exp_form(...) when the layer pre-scaled xp's columns by its prescale (fast path), else None."""
    T, B, G = xp.shape
    u = G // 4
    dt = xp.dtype
    H, C = np.zeros((T + 1, B, u), dt), np.zeros((T + 1, B, u), dt)
    A, TC = np.empty((T, B, G), dt), np.empty((T, B, u), dt)  # gate activations, act(c)
    tmp = np.empty((B, u), dt)
    U_run = U * form[0] if form is not None else U
    affine = form is not None and bool(np.any(form[1] != 1) or np.any(form[2] != 0))  # a tanh gate
    if affine:
        # full (B, 4u) rows: NumPy's same-shape ufunc loops are about twice as fast as broadcasting ones
        scale, offset = (np.ascontiguousarray(np.broadcast_to(v, (B, G))) for v in form[1:])
    # exp overflows to inf for a saturated gate, and 1 / (1 + inf) = 0 is its exact limit
    with blas.one_thread(), np.errstate(over="ignore"):  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T):
            a = A[t]
            recurrent_matmul(H[t], U_run, rec_mask, a)
            a += xp[t]
            if form is not None:
                np.exp(a, out=a)
                a += 1
                np.reciprocal(a, out=a)
                if affine:
                    a *= scale
                    a += offset
            else:
                activate_(rec_act, a[:, :2 * u])
                activate_(act, a[:, 2 * u:3 * u])
                activate_(rec_act, a[:, 3 * u:])
            c = C[t + 1]
            np.multiply(a[:, u:2 * u], C[t], out=c)
            np.multiply(a[:, :u], a[:, 2 * u:3 * u], out=tmp)
            c += tmp
            tc = TC[t]
            if act == "tanh":
                np.tanh(c, out=tc)
            else:
                np.copyto(tc, c)
                activate_(act, tc)
            np.multiply(a[:, 3 * u:], tc, out=H[t + 1])
            if step_mask is not None:
                keep = ~step_mask[t]
                np.copyto(H[t + 1], H[t], where=keep)
                np.copyto(c, C[t], where=keep)
    return H, C, dict(H=H, C=C, A=A, TC=TC, U=U, act=act, rec_act=rec_act,
                      form=form, step_mask=step_mask, rec_mask=rec_mask)


def _gate_derivatives(A, names, form):
    """d act / d pre-activation of every gate column, from the activations A (..., len(names) * u)."""
    if form is not None:
        # act = offset + scale / (1 + exp(prescale z)) => act' = -prescale / scale * (act - offset) *
        # (scale + offset - act), and -prescale / scale = 1 for sigmoid and tanh
        _, scale, offset = form
        D = np.subtract(scale + offset, A)
        D *= np.subtract(A, offset, out=np.empty_like(A))
        return D
    u = A.shape[-1] // len(names)
    D = np.empty_like(A)
    for k, name in enumerate(names):
        D[..., k * u:(k + 1) * u] = derivative(name, A[..., k * u:(k + 1) * u])
    return D


def lstm_backward(cache, dY, dh, dc):
    """Returns dXP (T, B, 4u), the gradient of every step's pre-activations, and dU."""
    H, C, A, TC, U = cache["H"], cache["C"], cache["A"], cache["TC"], cache["U"]
    step_mask, rec_mask, act, rec_act = cache["step_mask"], cache["rec_mask"], cache["act"], cache["rec_act"]
    T, B, G = A.shape
    u = G // 4
    UT = np.ascontiguousarray(U.T)
    i, f, g, o = (A[..., k * u:(k + 1) * u] for k in range(4))
    # dXP_t = [dc, dc, dc, dh]_t * K_t, with every factor of K independent of the running gradients.
    K = _gate_derivatives(A, [rec_act, rec_act, act, rec_act], cache["form"])
    K4 = K.reshape(T, B, 4, u)
    K4[:, :, 0] *= g
    K4[:, :, 1] *= C[:-1]
    K4[:, :, 2] *= i
    K4[:, :, 3] *= TC
    Kc = derivative(act, TC)  # dh -> dc
    Kc *= o
    F, keep = f, None
    if step_mask is not None:
        m, keep = _mask_factors(step_mask, A.dtype)
        K *= m
        Kc *= m
        F = f * m + keep  # a masked step passes dc through unchanged
    dXP = np.empty_like(A)
    dX4 = dXP.reshape(T, B, 4, u)
    dh, dc = dh.copy(), dc.copy()
    tmp, carry = np.empty_like(dh), np.empty_like(dh)
    with blas.one_thread():  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T - 1, -1, -1):
            if dY is not None:
                dh += dY[t]
            np.multiply(dh, Kc[t], out=tmp)
            dc += tmp
            np.multiply(dc[:, None, :], K4[t, :, :3], out=dX4[t, :, :3])
            np.multiply(dh, K4[t, :, 3], out=dX4[t, :, 3])
            dc *= F[t]
            _to_previous_h(dXP[t], UT, rec_mask, dh, None if keep is None else keep[t], carry)
    return dXP, recurrent_kernel_grad(H[:-1], dXP, rec_mask)


# --- GRU (Keras gate order z, r, h): h_t = z h_{t-1} + (1 - z) hh -----------------------------------------------
def gru_forward(xp, U, rb, act, rec_act, reset_after=True, step_mask=None, rec_mask=None, form=None):
    """xp includes the input bias; rb is the recurrent bias (reset_after only, or None). `form` scales the z, r
    columns (see tanh_form) when the layer pre-scaled xp's z, r columns."""
    T, B, G = xp.shape
    u = G // 3
    dt = xp.dtype
    H = np.zeros((T + 1, B, u), dt)
    A = np.empty((T, B, G), dt)  # z, r, hh
    inner = np.empty((T, B, G if reset_after else u), dt)  # h @ U (+ rb) after reset; r * h before reset
    scale = form[0] if form is not None else None
    U_run = U * scale if scale is not None else U
    rb_run = rb * scale if (rb is not None and scale is not None) else rb
    U_zr, U_h = U_run[:, :2 * u], U_run[:, 2 * u:]
    rm_zr = None if rec_mask is None else rec_mask[:2] if len(rec_mask) > 1 else rec_mask
    rm_h = None if rec_mask is None else rec_mask[2 if len(rec_mask) > 1 else 0]
    tmp = np.empty((B, u), dt)
    zr_buf = np.empty((B, 2 * u), dt)
    with blas.one_thread():  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T):
            a, h_prev = A[t], H[t]
            zr, hh = a[:, :2 * u], a[:, 2 * u:]
            if reset_after:
                n = inner[t]
                recurrent_matmul(h_prev, U_run, rec_mask, n)
                if rb_run is not None:
                    n += rb_run
                np.add(xp[t, :, :2 * u], n[:, :2 * u], out=zr)
            else:
                recurrent_matmul(h_prev, U_zr, rm_zr, zr_buf)
                np.add(xp[t, :, :2 * u], zr_buf, out=zr)
            if form is not None:
                np.tanh(zr, out=zr)
                zr *= scale[:2 * u]
                zr += form[1][:2 * u]
            else:
                activate_(rec_act, zr)
            r = a[:, u:2 * u]
            if reset_after:
                np.multiply(r, inner[t, :, 2 * u:], out=hh)
            else:
                rh = inner[t]
                np.multiply(r, h_prev if rm_h is None else h_prev * rm_h, out=rh)
                np.matmul(rh, U_h, out=hh)
            hh += xp[t, :, 2 * u:]
            activate_(act, hh)
            np.subtract(h_prev, hh, out=tmp)
            tmp *= a[:, :u]
            np.add(hh, tmp, out=H[t + 1])
            if step_mask is not None:
                np.copyto(H[t + 1], h_prev, where=~step_mask[t])
    return H, dict(H=H, A=A, inner=inner, U=U, act=act, rec_act=rec_act, reset_after=reset_after,
                   step_mask=step_mask, rec_mask=rec_mask)


def gru_backward(cache, dY, dh):
    """Returns dXP (T, B, 3u) for the input projections, dInner (the recurrent bias gradient per step, or None)
    and dU."""
    H, A, inner, U = cache["H"], cache["A"], cache["inner"], cache["U"]
    step_mask, rec_mask, act, rec_act = cache["step_mask"], cache["rec_mask"], cache["act"], cache["rec_act"]
    T, B, G = A.shape
    u = G // 3
    z, r, hh = A[..., :u], A[..., u:2 * u], A[..., 2 * u:]
    H_prev = H[:-1]
    if cache["reset_after"]:
        return _gru_backward_after(H_prev, z, r, hh, inner, U, act, rec_act, step_mask, rec_mask, dY, dh)
    return _gru_backward_before(H_prev, z, r, hh, inner, U, act, rec_act, step_mask, rec_mask, dY, dh)


def _gru_factors(H_prev, z, hh, act, rec_act, step_mask):
    Kz = (H_prev - hh) * derivative(rec_act, z)  # dh -> d pre_z
    Kh = (1 - z) * derivative(act, hh)  # dh -> d pre_hh
    Zc = z.copy()  # dh_t -> dh_{t-1} directly
    keep = None
    if step_mask is not None:
        m, keep = _mask_factors(step_mask, z.dtype)
        Kz *= m
        Kh *= m
        Zc = z * m + keep
    return Kz, Kh, Zc, keep


def _gru_backward_after(H_prev, z, r, hh, inner, U, act, rec_act, step_mask, rec_mask, dY, dh):
    T, B, u = z.shape
    UT = np.ascontiguousarray(U.T)
    Kz, Kh, Zc, keep = _gru_factors(H_prev, z, hh, act, rec_act, step_mask)
    # Per-step layout of D: [d pre_hh, d pre_z, d pre_r, d inner_h], so the recurrent matmul reads the last three
    # as one contiguous block and each pair of products writes two adjacent blocks.
    K1 = np.stack([Kh, Kz], axis=2)  # times dh
    K2 = np.stack([inner[..., 2 * u:] * derivative(rec_act, r), r], axis=2)  # times d pre_hh
    D = np.empty((T, B, 4, u), z.dtype)
    dh, carry = dh.copy(), np.empty_like(dh)
    with blas.one_thread():  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T - 1, -1, -1):
            if dY is not None:
                dh += dY[t]
            Dt = D[t]
            np.multiply(dh[:, None, :], K1[t], out=Dt[:, :2])
            np.multiply(Dt[:, :1], K2[t], out=Dt[:, 2:])
            np.multiply(dh, Zc[t], out=carry)
            recurrent_matmul_T(Dt[:, 1:].reshape(B, 3 * u), UT, rec_mask, dh)
            dh += carry
    dInner = D[:, :, 1:].reshape(T, B, 3 * u)
    dXP = np.concatenate([D[:, :, 1], D[:, :, 2], D[:, :, 0]], axis=-1)
    return dXP, dInner, recurrent_kernel_grad(H_prev, dInner, rec_mask)


def _gru_backward_before(H_prev, z, r, hh, rh, U, act, rec_act, step_mask, rec_mask, dY, dh):
    T, B, u = z.shape
    Kz, Kh, Zc, keep = _gru_factors(H_prev, z, hh, act, rec_act, step_mask)
    Dr = derivative(rec_act, r)
    UT_zr, UT_h = np.ascontiguousarray(U[:, :2 * u].T), np.ascontiguousarray(U[:, 2 * u:].T)
    rm_zr = None if rec_mask is None else rec_mask[:2] if len(rec_mask) > 1 else rec_mask
    rm_h = None if rec_mask is None else rec_mask[2 if len(rec_mask) > 1 else 0]
    dXP = np.empty((T, B, 3 * u), z.dtype)
    d_rh = np.empty((B, u), z.dtype)
    dh, back = dh.copy(), np.empty_like(dh)
    with blas.one_thread():  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T - 1, -1, -1):
            if dY is not None:
                dh += dY[t]
            dx = dXP[t]
            np.multiply(dh, Kz[t], out=dx[:, :u])
            np.multiply(dh, Kh[t], out=dx[:, 2 * u:])
            np.matmul(dx[:, 2 * u:], UT_h, out=d_rh)  # d(r * h_h)
            h_h = H_prev[t] if rm_h is None else H_prev[t] * rm_h
            np.multiply(d_rh * h_h, Dr[t], out=dx[:, u:2 * u])
            d_rh *= r[t]
            if rm_h is not None:
                d_rh *= rm_h
            recurrent_matmul_T(np.ascontiguousarray(dx[:, :2 * u]), UT_zr, rm_zr, back)
            dh *= Zc[t]
            dh += back
            dh += d_rh
    dU_zr = recurrent_kernel_grad(H_prev, dXP[..., :2 * u], rm_zr)
    dU_h = rh.reshape(-1, u).T @ dXP[..., 2 * u:].reshape(-1, u)
    return dXP, None, np.concatenate([dU_zr, dU_h], axis=1)
