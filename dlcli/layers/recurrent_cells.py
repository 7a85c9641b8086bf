"""The time loops of SimpleRNN, LSTM, GRU and ConvLSTM: forward scans and backprop through time, as pure functions.

SimpleRNN and GRU are time-major inside: `xp` (T, batch, gates * units) holds the input projections of every step,
computed by the layer in one matmul before the loop, so only the recurrence `h @ recurrent_kernel` runs per step. The
LSTM is feature-major and fuses the projection into its step GEMM (see its section). Caches are preallocated arrays,
per-step work is in-place ufuncs, and everything that does not depend on the running gradient (activation
derivatives, mask factors) is computed for all steps at once before the backward loop.

Masks follow Keras: `step_mask` (T, batch, 1) bool; a masked step keeps the previous state (and so outputs the
previous output). `rec_mask` (G, batch, units) is the recurrent dropout mask, one per gate when G > 1 (Keras'
implementation 1, used whenever recurrent_dropout > 0).
"""
import numpy as np

from dlcli import kernels
from dlcli.engine import activations, blas
from dlcli.layers import conv_math as cm


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


def derivative(name, y, out=None):
    return activations.ACTIVATIONS.get(name).output_derivative(y, out)


def tanh_form(names, units, dtype):
    """Per-column (scale, offset) so that act(z) = offset + scale * tanh(scale * z) for gate activations
    `names`; None when one of them is neither sigmoid nor tanh."""
    if not all(n in _TANH_FORM for n in names):
        return None
    scale = np.repeat([_TANH_FORM[n][0] for n in names], units).astype(dtype)
    offset = np.repeat([_TANH_FORM[n][1] for n in names], units).astype(dtype)
    return scale, offset


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


def _compiled_loop(act, rec_act, dropout_masks, dtype):
    """(the compiled time loops of dlcli/kernels/recurrent.py, the BLAS gemm they call) where they apply: Keras'
    default activations (tanh, sigmoid gates), no recurrent dropout, float32 or float64 and NumPy on OpenBLAS;
    else None and the NumPy loops here run."""
    if act != "tanh" or rec_act != "sigmoid" or dropout_masks is not None:
        return None
    compiled = kernels.compiled("recurrent")
    gemm = None if compiled is None else blas.gemm_address(dtype)
    return None if gemm is None else (compiled, gemm)


def _kept(step_mask, T, B):
    """(T, B) bool, True where step t of sequence b is masked out (its state kept); empty without a mask."""
    if step_mask is None:
        return np.empty((0, 0), bool)
    return np.ascontiguousarray(~step_mask.reshape(T, B))


# --- SimpleRNN: h_t = act(x_t W + b + h_{t-1} U) ----------------------------------------------------------------
def simple_forward(xp, U, act, step_mask=None, rec_mask=None):
    T, B, u = xp.shape
    H = np.zeros((T + 1, B, u), xp.dtype)
    cache = dict(H=H, U=U, act=act, step_mask=step_mask, rec_mask=rec_mask)
    loop = _compiled_loop(act, "sigmoid", rec_mask, xp.dtype)
    if loop is not None:
        with blas.one_thread():
            loop[0].simple_forward(loop[1], np.ascontiguousarray(xp), np.ascontiguousarray(U, xp.dtype),
                                   _kept(step_mask, T, B), H)
        return H, cache
    with blas.one_thread():  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T):
            h = H[t + 1]
            recurrent_matmul(H[t], U, rec_mask, h)
            h += xp[t]
            activate_(act, h)
            if step_mask is not None:
                np.copyto(h, H[t], where=~step_mask[t])
    return H, cache


def simple_backward(cache, dY, dh):
    """dY (T, B, u) gradients of every step's output or None; dh the final state's gradient.
    Returns dXP (T, B, u) and dU."""
    H, U, step_mask, rec_mask = cache["H"], cache["U"], cache["step_mask"], cache["rec_mask"]
    T = H.shape[0] - 1
    UT = np.ascontiguousarray(U.T)
    loop = _compiled_loop(cache["act"], "sigmoid", rec_mask, H.dtype)
    if loop is not None:
        dt, B = H.dtype, H.shape[1]
        dXP = np.empty(H[1:].shape, dt)
        with blas.one_thread():
            loop[0].simple_backward(loop[1], H, UT, np.empty((0, 0, 0), dt) if dY is None else
                                    np.ascontiguousarray(dY, dt), np.array(dh, dt, order="C"),
                                    _kept(step_mask, T, B), dXP)
        return dXP, recurrent_kernel_grad(H[:-1], dXP, None)
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
# Feature-major and fused. The scan keeps s_t = [h_{t-1}; x_t; 1] as S[t] (S is (T + 1, K, batch), each step's
# column one contiguous block) and computes every gate of a step with one GEMM, z_t = Wz @ s_t, where
# Wz = [U.T | W.T | b] has its rows in the internal gate order o, i, f, g. So each gate is a contiguous (units,
# batch) block and every element-wise step is one NumPy loop over units * batch elements (batch-major (batch, 4u)
# rows split a gate into `batch` loops of `units`); the three sigmoid gates are one block; i, f lie next to g,
# c_{t-1} (a step's activations are [o, i, f, g, c_{t-1}]), so c_t is one product and one sum; and the gradient of
# Wz holds the kernel, recurrent kernel and bias gradients at once (sum over steps of dz_t s_t.T).
# The bench's LSTM(32) step (100 steps, batch 64, through fit), in-process A/B against the batch-major cell: best
# 8.81 -> 7.75 and 9.29 -> 8.63 ms, median 11.8 -> 10.0 and 12.3 -> 10.7.
LSTM_ORDER = np.array([3, 0, 1, 2])  # internal gate k is Keras gate LSTM_ORDER[k]


def lstm_rows(units):
    """Keras' column of each internal gate row: Wz[r] belongs to Keras' column lstm_rows(units)[r]."""
    return (LSTM_ORDER[:, None] * units + np.arange(units)).ravel()


def lstm_fused_weights(kernel, recurrent_kernel, bias=None):
    """Wz (4u, u + F [+ 1]) from Keras' kernel (F, 4u), recurrent_kernel (u, 4u) and bias (4u,) or None."""
    rows = lstm_rows(recurrent_kernel.shape[0])
    parts = [recurrent_kernel[:, rows], kernel[:, rows]] + ([] if bias is None else [bias[rows][None]])
    return np.ascontiguousarray(np.concatenate(parts).T)


def lstm_split_grad(dWz, features):
    """The Keras-layout gradients (kernel, recurrent_kernel, bias or None) from the gradient of Wz."""
    u = dWz.shape[0] // 4
    rows = lstm_rows(u)
    kernel, recurrent = np.empty((features, 4 * u), dWz.dtype), np.empty((u, 4 * u), dWz.dtype)
    kernel[:, rows], recurrent[:, rows] = dWz[:, u:u + features].T, dWz[:, :u].T
    bias = None
    if dWz.shape[1] > u + features:
        bias = np.empty(4 * u, dWz.dtype)
        bias[rows] = dWz[:, -1]
    return kernel, recurrent, bias


def _gate_matmul(W, s, gate_masks, out):
    """out = W @ s, where gate block k sees s * gate_masks[k] (per-gate dropout of h and x) when there are masks."""
    if gate_masks is None:
        np.matmul(W, s, out=out)
        return
    u = len(W) // 4
    for k in range(4):
        np.matmul(W[k * u:(k + 1) * u], s * gate_masks[k], out=out[k * u:(k + 1) * u])


def lstm_forward(S, Wz, act, rec_act, step_mask=None, gate_masks=None):
    """Scan S (T + 1, K, B): rows u: of S[t] hold x_t (and a row of ones when Wz has a bias column), S[0, :u] is
    h_0; fills S[1:, :u] with h_1..h_T and returns c_T (u, B) and the cache. step_mask (T, 1, B) bool;
    gate_masks (4, K, B) per-gate dropout factors of s_t (Keras' recurrent_dropout), internal gate order."""
    T, B = S.shape[0] - 1, S.shape[2]
    u = len(Wz) // 4
    dt = S.dtype
    A = np.empty((T + 1, 5 * u, B), dt)  # step t: o, i, f, g activations and c_{t-1}
    A[0, 4 * u:] = 0
    TC = np.empty((T, u, B), dt)  # act(c_t)
    cache = dict(S=S, A=A, TC=TC, Wz=Wz, act=act, rec_act=rec_act, step_mask=step_mask, gate_masks=gate_masks)
    loop = _compiled_loop(act, rec_act, gate_masks, dt)
    if loop is not None:
        with blas.one_thread():
            loop[0].lstm_forward(loop[1], S, Wz, _kept(step_mask, T, B), A, TC)
        return A[T, 4 * u:], cache
    tmp = np.empty((2 * u, B), dt)
    fast = rec_act == "sigmoid"
    if fast:  # sigmoid(z) = 1 / (1 + exp(-z)): NumPy's float32 exp is about twice as fast as its tanh
        W_run = Wz.copy()
        W_run[:3 * u] *= -1
    else:
        W_run = Wz
    # exp overflows to inf for a saturated gate, and 1 / (1 + inf) = 0 is its exact limit
    with blas.one_thread(), np.errstate(over="ignore"):  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T):
            a = A[t]
            _gate_matmul(W_run, S[t], gate_masks, a[:4 * u])
            sig = a[:3 * u]
            if fast:
                np.exp(sig, out=sig)
                sig += 1
                np.reciprocal(sig, out=sig)
            else:
                activate_(rec_act, sig)
            activate_(act, a[3 * u:4 * u])
            np.multiply(a[u:3 * u], a[3 * u:], out=tmp)  # i g and f c_{t-1}
            c = A[t + 1, 4 * u:]
            np.add(tmp[:u], tmp[u:], out=c)
            tc = TC[t]
            if act == "tanh":
                np.tanh(c, out=tc)
            else:
                np.copyto(tc, c)
                activate_(act, tc)
            h = S[t + 1, :u]
            np.multiply(a[:u], tc, out=h)
            if step_mask is not None:
                keep = ~step_mask[t]
                np.copyto(h, S[t, :u], where=keep)
                np.copyto(c, A[t, 4 * u:], where=keep)
    return A[T, 4 * u:], cache


def lstm_gradients(cache, dY, dh, dc, weights=True, features=0, bias=False):
    """Backprop through the scan: dY (T, u, B) gradients of every step's output or None; dh, dc (u, B) the final
    states' gradients; `bias` when Wz's last column is the bias (S's last row ones). Returns (dL/dWz (4u, K) or
    None when not `weights`, dL/dx (B, T, features) or None when `features` is 0), the input's gradient through the
    per-gate dropout masks if any (a shared mask the caller folded into S is the caller's to apply)."""
    S, A, TC, Wz = cache["S"], cache["A"], cache["TC"], cache["Wz"]
    T, u, B = TC.shape
    loop = _compiled_loop(cache["act"], cache["rec_act"], cache["gate_masks"], A.dtype)
    if loop is None:
        dZ = lstm_backward(cache, dY, dh, dc)
        return (lstm_weight_grad(cache, dZ) if weights else None,
                lstm_input_grad(cache, dZ, features).transpose(2, 0, 1) if features else None)
    dt = A.dtype
    dW = np.zeros(Wz.shape if weights else (0, 0), dt)
    dX = np.empty((B, T, features) if features else (0, 0, 0), dt)
    dY = np.empty((0, 0, 0), dt) if dY is None else np.ascontiguousarray(dY, dt)
    dh, dc = np.array(dh, dt, order="C"), np.array(dc, dt, order="C")  # copies, updated in place
    with blas.one_thread():
        loop[0].lstm_backward(loop[1], A, TC, S, np.ascontiguousarray(Wz[:, :u].T),
                              Wz[:, u:u + features], dY, dh, dc,
                              _kept(cache["step_mask"], T, B), dW, dX, bias)
    return (dW if weights else None), (dX if features else None)


def lstm_backward(cache, dY, dh, dc):
    """The NumPy twin of the compiled loop (kernels/recurrent.lstm_backward): dZ (T, 4u, B), the gradient of every
    step's gate pre-activations (internal order)."""
    S, A, TC, Wz = cache["S"], cache["A"], cache["TC"], cache["Wz"]
    step_mask, gate_masks, act = cache["step_mask"], cache["gate_masks"], cache["act"]
    T, u, B = TC.shape
    # dZ_t = [dh, dc, dc, dc]_t * Kg_t, with every factor of Kg independent of the running gradients.
    Kg = np.empty((T, 4 * u, B), S.dtype)
    derivative(cache["rec_act"], A[:T, :3 * u], out=Kg[:, :3 * u])
    derivative(act, A[:T, 3 * u:4 * u], out=Kg[:, 3 * u:])
    Kg[:, :u] *= TC  # o: dh act(c)
    Kg[:, u:3 * u] *= A[:T, 3 * u:]  # i: dc g, f: dc c_{t-1}
    Kg[:, 3 * u:] *= A[:T, u:2 * u]  # g: dc i
    Kc = derivative(act, TC)  # dh -> dc
    Kc *= A[:T, :u]
    F, keep = A[:T, 2 * u:3 * u], None
    if step_mask is not None:
        m, keep = _mask_factors(step_mask, S.dtype)
        Kg *= m
        Kc *= m
        F = F * m + keep  # a masked step passes dc through unchanged
    dZ = np.empty((T, 4 * u, B), S.dtype)  # each step writes its own contiguous (4u, B) block
    dZ4, Kg4 = dZ.reshape(T, 4, u, B), Kg.reshape(T, 4, u, B)
    UzT = np.ascontiguousarray(Wz[:, :u].T)  # (u, 4u): dh_{t-1} = UzT @ dz_t
    dh, dc = np.array(dh, order="C"), np.array(dc, order="C")
    tmp, carry = np.empty_like(dh), np.empty_like(dh)
    with blas.one_thread():  # the step GEMMs are too small to split (engine/blas.py)
        for t in range(T - 1, -1, -1):
            if dY is not None:
                dh += dY[t]
            np.multiply(dh, Kc[t], out=tmp)
            dc += tmp
            np.multiply(dc, Kg4[t, 1:], out=dZ4[t, 1:])
            np.multiply(dh, Kg4[t, 0], out=dZ4[t, 0])
            dc *= F[t]
            if keep is not None:
                np.multiply(dh, keep[t], out=carry)
            if gate_masks is None:
                np.matmul(UzT, dZ[t], out=dh)
            else:
                dh[...] = sum(gate_masks[k, :u] * (UzT[:, k * u:(k + 1) * u] @ dZ4[t, k]) for k in range(4))
            if keep is not None:
                dh += carry
    return dZ


def lstm_weight_grad(cache, dZ):
    """dL/dWz (4u, K) from every step's dZ (T, 4u, B) at once."""
    S, gate_masks = cache["S"], cache["gate_masks"]
    T, K, B = S.shape[0] - 1, S.shape[1], S.shape[2]
    u = dZ.shape[1] // 4

    def steps(a):  # (T, rows, B) -> (rows, T * B)
        return a.transpose(1, 0, 2).reshape(len(a[0]), T * B)
    dZ2 = steps(dZ)
    if gate_masks is None:
        return dZ2 @ steps(S[:T]).T
    return np.concatenate([dZ2[k * u:(k + 1) * u] @ steps(S[:T] * gate_masks[k]).T for k in range(4)])


def lstm_input_grad(cache, dZ, features):
    """dL/dx (T, F, B), through the per-gate dropout masks if any."""
    Wz, gate_masks = cache["Wz"], cache["gate_masks"]
    u = len(Wz) // 4
    Wx = Wz[:, u:u + features]
    if gate_masks is None:
        return np.matmul(Wx.T, dZ)
    return sum(np.matmul(Wx[k * u:(k + 1) * u].T, dZ[:, k * u:(k + 1) * u]) * gate_masks[k, u:u + features]
               for k in range(4))


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
    cache = dict(H=H, A=A, inner=inner, U=U, act=act, rec_act=rec_act, reset_after=reset_after,
                 step_mask=step_mask, rec_mask=rec_mask)
    loop = _compiled_loop(act, rec_act, rec_mask, dt) if reset_after and form is not None else None
    if loop is not None:
        with blas.one_thread():
            loop[0].gru_forward(loop[1], np.ascontiguousarray(xp), np.ascontiguousarray(U_run),
                                np.zeros(G, dt) if rb_run is None else rb_run.astype(dt, copy=False),
                                _kept(step_mask, T, B), H, A, inner)
        return H, cache
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
    return H, cache


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
        loop = _compiled_loop(act, rec_act, rec_mask, A.dtype)
        if loop is not None:
            return _gru_backward_compiled(loop, H, A, inner, U, _kept(step_mask, T, B), dY, dh)
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


def _gru_backward_compiled(loop, H, A, inner, U, kept, dY, dh):
    """_gru_backward_after as one compiled loop (dlcli/kernels/recurrent.py): each step's gate gradients in one fused
    pass, the recurrent product through BLAS between them."""
    T, B, G = A.shape
    dt = A.dtype
    dXP, dInner = np.empty((T, B, G), dt), np.empty((T, B, G), dt)
    dY = np.empty((0, 0, 0), dt) if dY is None else np.ascontiguousarray(dY, dt)
    dh = np.array(dh, dt, order="C")  # a copy, updated in place
    with blas.one_thread():
        loop[0].gru_backward(loop[1], H, A, inner, np.ascontiguousarray(U.T), dY, dh, kept, dXP, dInner)
    return dXP, dInner, recurrent_kernel_grad(H[:-1], dInner, None)


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


# --- ConvLSTM (Keras' ConvLSTMCell, gate order i, f, c, o): the LSTM with both matmuls made convolutions ----------
# The input convolution of every step is one im2col GEMM before the loop (the layer's); here only the recurrent
# convolution runs per step: stride 1, padding 'same', no dilation, whatever the input convolution's (Keras'
# recurrent_conv). States are channels-last (batch, *spatial, filters) and kept padded, so a step's im2col reads h
# in place. Masks (T, batch, 1...) or per position (T, batch, *spatial, 1) keep a masked position's h and c.
def same_pads(sizes, kernel_size):
    """(before, after) pads of a stride-1 'same' convolution over `sizes`."""
    ones = (1,) * len(kernel_size)
    return cm.geometry(sizes, kernel_size, ones, "same", ones)[1]


def _recurrent_conv(hp, U2, kernel_size, sizes, rec_mask, pads, out, cols):
    """out (N, 4F) = conv_same(h, U) for padded h `hp`; gate g reads h * rec_mask[g] when there are masks."""
    ones = (1,) * len(kernel_size)
    if rec_mask is None:
        np.matmul(cm.im2col(hp, kernel_size, sizes, ones, ones, out=cols).reshape(len(out), -1), U2, out=out)
        return
    F = U2.shape[1] // 4
    inner = cm.interior(pads, (len(hp), *sizes, F))
    for g in range(4):
        patches = cm.im2col(cm.pad(hp[inner] * rec_mask[g], pads), kernel_size, sizes, ones, ones, out=cols)
        out[:, g * F:(g + 1) * F] = patches.reshape(len(out), -1) @ U2[:, g * F:(g + 1) * F]


def convlstm_forward(XP, U, act, rec_act, step_mask=None, rec_mask=None):
    """XP (T, batch, *spatial, 4F): every step's input convolution plus bias; U (*kernel, F, 4F). Returns H, a
    (T + 1, batch, *spatial, F) view of h_0..h_T, c_T and the cache."""
    T, B, *sizes, G = XP.shape
    F, k = G // 4, U.shape[:-2]
    pads = same_pads(sizes, k)
    Hp = np.zeros((T + 1, B, *(n + a + b for n, (a, b) in zip(sizes, pads)), F), XP.dtype)
    H = Hp[(slice(None),) + cm.interior(pads, (B, *sizes, F))]
    Cs = np.zeros((T + 1, B, *sizes, F), XP.dtype)
    A = np.empty_like(XP)  # every step's activated gates i, f, c, o
    TC = np.empty_like(Cs[1:])  # act(c_t)
    U2, cols = U.reshape(-1, G), None
    for t in range(T):
        a = A[t]
        a2 = a.reshape(-1, G)
        if cols is None:
            cols = np.empty((B, *sizes, *k, F), XP.dtype)
        _recurrent_conv(Hp[t], U2, k, sizes, rec_mask, pads, a2, cols)
        a += XP[t]
        activate_(rec_act, a[..., :2 * F])
        activate_(act, a[..., 2 * F:3 * F])
        activate_(rec_act, a[..., 3 * F:])
        c = Cs[t + 1]
        np.multiply(a[..., F:2 * F], Cs[t], out=c)
        c += a[..., :F] * a[..., 2 * F:3 * F]
        np.copyto(TC[t], c)
        activate_(act, TC[t])
        np.multiply(a[..., 3 * F:], TC[t], out=H[t + 1])
        if step_mask is not None:
            keep = ~step_mask[t]
            np.copyto(H[t + 1], H[t], where=keep)
            np.copyto(c, Cs[t], where=keep)
    return H, Cs[T], dict(Hp=Hp, Cs=Cs, A=A, TC=TC, U=U, pads=pads, act=act, rec_act=rec_act,
                          step_mask=step_mask, rec_mask=rec_mask)


def convlstm_backward(cache, dY, dh, dc):
    """dY (T, batch, *spatial, F) gradients of every step's output or None; dh, dc the final states' gradients.
    Returns dZ (T, batch, *spatial, 4F), the gradient of every step's gate pre-activations, and dU."""
    Hp, Cs, A, TC, U, pads = cache["Hp"], cache["Cs"], cache["A"], cache["TC"], cache["U"], cache["pads"]
    step_mask, rec_mask, act = cache["step_mask"], cache["rec_mask"], cache["act"]
    T, B, *sizes, G = A.shape
    F, k = G // 4, U.shape[:-2]
    ones = (1,) * len(k)
    # dZ_t = [dc, dc, dc, dh]_t * Kg_t, with every factor of Kg independent of the running gradients (as the LSTM)
    Kg = np.empty_like(A)
    derivative(cache["rec_act"], A[..., :2 * F], out=Kg[..., :2 * F])
    derivative(act, A[..., 2 * F:3 * F], out=Kg[..., 2 * F:3 * F])
    derivative(cache["rec_act"], A[..., 3 * F:], out=Kg[..., 3 * F:])
    Kg[..., :F] *= A[..., 2 * F:3 * F]  # i: dc c~
    Kg[..., F:2 * F] *= Cs[:-1]  # f: dc c_{t-1}
    Kg[..., 2 * F:3 * F] *= A[..., :F]  # c~: dc i
    Kg[..., 3 * F:] *= TC  # o: dh act(c)
    Kc = derivative(act, TC)  # dh -> dc
    Kc *= A[..., 3 * F:]
    Fc, keep = A[..., F:2 * F], None
    if step_mask is not None:
        m, keep = _mask_factors(step_mask, A.dtype)
        Kg *= m
        Kc *= m
        Fc = Fc * m + keep  # a masked position passes dc through unchanged
    dZ = np.empty_like(A)
    dh, dc = np.array(dh, A.dtype), np.array(dc, A.dtype)
    padded, inner = Hp.shape[1:], cm.interior(pads, (B, *sizes, F))
    for t in range(T - 1, -1, -1):
        if dY is not None:
            dh += dY[t]
        dc += dh * Kc[t]
        np.multiply(dc[..., None, :], Kg[t].reshape(*dc.shape[:-1], 4, F)[..., :3, :],
                    out=dZ[t].reshape(*dc.shape[:-1], 4, F)[..., :3, :])
        np.multiply(dh, Kg[t, ..., 3 * F:], out=dZ[t, ..., 3 * F:])
        dc *= Fc[t]
        carry = None if keep is None else dh * keep[t]
        dz2 = dZ[t].reshape(-1, G)
        if rec_mask is None:
            dh = cm.col2im_matmul(dz2, U, padded, sizes, ones, ones)[inner]
        else:
            dh = sum(cm.col2im_matmul(dz2[:, g * F:(g + 1) * F], U[..., g * F:(g + 1) * F], padded, sizes, ones,
                                      ones)[inner] * rec_mask[g] for g in range(4))
        if carry is not None:
            dh += carry
    # the recurrent kernel's gradient from every step at once: the patches of h_0..h_{T-1}
    h_prev = Hp[:-1].reshape(T * B, *padded[1:])
    dZ2 = dZ.reshape(-1, G)
    if rec_mask is None:
        dU = _patches(h_prev, k).T @ dZ2
    else:
        h_in = Hp[(slice(None, -1),) + inner]
        dU = np.concatenate([_patches(cm.pad((h_in * rec_mask[g]).reshape(T * B, *sizes, F), pads), k).T
                             @ dZ2[:, g * F:(g + 1) * F] for g in range(4)], axis=1)
    return dZ, dU.reshape(U.shape)


def _patches(hp, kernel_size):
    """im2col rows (N * positions, prod(kernel) * F) of a padded stride-1 'same' input."""
    ones = (1,) * len(kernel_size)
    sizes = tuple(n - k + 1 for n, k in zip(hp.shape[1:-1], kernel_size))
    return cm.im2col(hp, kernel_size, sizes, ones, ones).reshape(hp.shape[0] * int(np.prod(sizes)), -1)
