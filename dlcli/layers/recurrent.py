"""Recurrent layers: SimpleRNN, LSTM, GRU and their cells, with Keras 3's arguments, defaults, gate order and weight
layouts, so `set_weights` with a Keras model's arrays gives that model's outputs.

The layer prepares the sequence (go_backwards, dropout masks) and hands it to `recurrent_cells` in the cell's layout:
SimpleRNN and GRU project every step's input in one matmul and scan time-major; the LSTM scans feature-major with the
projection fused into its step GEMM. Masks follow Keras: a masked step keeps the previous state and outputs the
previous output; with `go_backwards` the returned sequence stays in processing (reversed) order.
"""
from contextlib import nullcontext

import numpy as np

from dlcli.engine import activations, blas, initializers, lanes
from dlcli.engine.layer import Layer, format_shape, ranked, register
from dlcli.errors import ConfigError, ShapeError
from dlcli.layers import conv_math as cm
from dlcli.layers import recurrent_cells as cells
from dlcli.layers.conv import _Windowed
from dlcli.registry import Size, Sizes

ONNX_ACTIVATIONS = {"tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu"}  # those ONNX's RNN/LSTM/GRU nodes take
# A recurrent layer's time loop runs on lanes over parts of the batch (batch_parts): each part's loop is as long as
# the whole batch's, its GEMMs narrower, so parts below ~32 samples lose more to the narrower GEMMs than a lane gains.
PART_SAMPLES, MAX_PARTS = 32, 4


# _ONE_THREAD: a recurrent layer runs on one BLAS thread throughout. Its products outside the time loop (the input
# projection, the weight and input gradients: ~20-30 MFLOP at LSTM(32), batch 64, 100 steps) came right after the
# loop's one-thread section, so OpenBLAS' second thread had to be woken for each, and on a shared machine the main
# thread spun until the scheduler ran it: bench/recurrent_step.py through fit, alternating rounds, AMD EPYC at load
# ~26, GRU(32) 1,689 -> 203 ms a step (process CPU 144 -> 10.5 ms), LSTM(32) 231 -> 195 ms (12.8 -> 8.2). On one
# quiet core those products take 0.2-0.5 ms each, where a second thread saved at most ~0.2 ms.
class Recurrent(Layer):
    """What SimpleRNN, LSTM and GRU share; a subclass sets `gates`/`n_states` and runs its cell on one part of the
    batch (batch_parts; the parts on lanes) in `_scan_part(x, step_mask, rec_mask, dmask, weights)` -> (states, a
    (T + 1, part, units) view of h_0..h_T, the final states, its cache), `weights` being what `_part_weights(dtype)`
    prepared once for all parts, and in `_scan_backward_part(cache, dY, d_finals, dmask, wanted, need_dx)` ->
    (the part's gradients of kernel, recurrent_kernel and bias, None where not `wanted`, the part's input gradient
    (part, T, features) or None). A layer that scans its batch whole (ConvLSTM) overrides `_scan` and
    `_scan_backward` instead."""

    gates = 1  # blocks of `units` columns in kernel and recurrent_kernel
    n_states = 1  # final states returned after the output when return_state
    one_blas_thread = True  # _ONE_THREAD
    splits_batch = True  # its time loops run on lanes over batch_parts (engine/lanes.py)
    zero_output_for_mask = False  # Keras' RNN flag: masked steps output zeros instead of the previous output
    keras_weight_groups = ("cell/vars",)  # Keras keeps a recurrent layer's variables in its cell
    onnx_gate_order = [0]  # Keras' gate blocks in the order ONNX's recurrent node takes them
    input_rank = 3  # (batch, timesteps, features)

    def __init__(self, units, activation, recurrent_activation, use_bias, kernel_initializer, recurrent_initializer,
                 bias_initializer, kernel_regularizer, recurrent_regularizer, bias_regularizer, dropout,
                 recurrent_dropout, return_sequences, return_state, go_backwards, **kw):
        super().__init__(**kw)
        self.units, self.use_bias = int(units), use_bias
        if self.units <= 0:
            raise ConfigError(f"{type(self).__name__} '{self.name}': units must be a positive integer; got {units}")
        self.act = self._activation_name("activation", activation)
        self.rec_act = self._activation_name("recurrent_activation", recurrent_activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.recurrent_initializer = initializers.get(recurrent_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer, self.recurrent_regularizer = kernel_regularizer, recurrent_regularizer
        self.bias_regularizer = bias_regularizer
        for arg, rate in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout)):
            if not 0 <= rate < 1:
                raise ConfigError(f"{type(self).__name__} '{self.name}': {arg} must be in [0, 1); got {rate}")
        self.dropout, self.recurrent_dropout = float(dropout), float(recurrent_dropout)
        self.return_sequences, self.return_state = bool(return_sequences), bool(return_state)
        self.go_backwards = bool(go_backwards)

    def _activation_name(self, arg, value) -> str:
        name = activations.get(value).name
        if name not in cells.SUPPORTED:
            raise ConfigError(f"{type(self).__name__} '{self.name}': {arg} '{name}' is not available in recurrent "
                              f"layers (its derivative must follow from its output); use one of "
                              f"{', '.join(cells.SUPPORTED)}")
        return name

    # --- shapes -----------------------------------------------------------------------------------------------
    def _check_rank(self, input_shape):
        if isinstance(input_shape, list) or len(input_shape) != 2:
            raise ShapeError(f"{type(self).__name__} '{self.name}' expects input (batch, timesteps, features); got "
                             f"{format_shape(input_shape)}. Add an Embedding before it for integer sequences, or "
                             f"Reshape to (timesteps, features)")

    def build(self, input_shape):
        self._check_rank(input_shape)
        n = self.gates * self.units
        # Weight order as Keras' layer.weights: kernel, recurrent_kernel, bias.
        self.kernel = self.add_weight("kernel", (input_shape[-1], n), self.kernel_initializer, self.kernel_regularizer)
        self.recurrent_kernel = self.add_weight("recurrent_kernel", (self.units, n), self.recurrent_initializer,
                                                self.recurrent_regularizer)
        if self.use_bias:
            self.bias = self.add_weight("bias", self._bias_shape(), self._bias_init(), self.bias_regularizer)

    def _bias_shape(self):
        return (self.gates * self.units,)

    def _bias_init(self):
        return self.bias_initializer

    def output_shape(self, input_shape):
        self._check_rank(input_shape)
        out = (input_shape[0], self.units) if self.return_sequences else (self.units,)
        return [out] + [(self.units,)] * self.n_states if self.return_state else out

    def compute_mask(self, x, mask):
        out = mask if self.return_sequences else None  # Keras: the mask follows the sequence, never the states
        return [out] + [None] * self.n_states if self.return_state else out

    def flops(self, input_shape):
        n, steps = self.gates * self.units, input_shape[0] or 1  # per step when the length is unknown (None)
        return 2 * int(steps) * (int(input_shape[-1]) * n + self.units * n)

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(self, x, training=False):
        dtype = self.kernel.value.dtype
        x = np.asarray(x).astype(dtype, copy=False)
        if x.ndim != self.input_rank:
            self._check_rank(x.shape[1:])
        mask = self.input_mask
        if self.go_backwards:
            x = x[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        batch, state = x.shape[0], self._state_shape(x.shape[2:])
        # Keras samples one mask per sequence, reused at every step; one per gate when recurrent_dropout > 0
        # (its implementation 1), else one shared input mask.
        count = self._dropout_mask_count()
        self.dmask = self._dropout_mask(training, self.dropout, (count, batch, *x.shape[2:]), dtype)
        rec_mask = self._dropout_mask(training, self.recurrent_dropout, (count, batch, *state), dtype)
        step_mask = None
        if mask is not None:  # time-major, with unit axes up to the state's rank: (T, batch, 1) for (batch, T)
            step_mask = np.ascontiguousarray(np.moveaxis(np.asarray(mask, bool), 1, 0))
            step_mask = step_mask.reshape(step_mask.shape + (1,) * (len(state) + 2 - step_mask.ndim))
        with self._blas_threads():  # see _ONE_THREAD
            states, finals = self._scan(x, step_mask, rec_mask)
        self.zero_mask = step_mask if (self.zero_output_for_mask and self.return_sequences) else None
        if self.return_sequences:  # (batch, T, ...) from each part's (T + 1, part, ...) states
            out = np.concatenate([np.moveaxis(H[1:], 0, 1) for H in states])
            if self.zero_mask is not None:
                out *= np.moveaxis(self.zero_mask, 0, 1)
        else:
            out = np.concatenate([H[-1] for H in states])
        return [out] + [s.copy() for s in finals] if self.return_state else out

    def _state_shape(self, step_shape) -> tuple:
        """The shape of h and c per sample, given one step's input shape (no batch axis)."""
        return (self.units,)

    def _dropout_mask_count(self) -> int:
        return self.gates if self.recurrent_dropout > 0 else 1

    def _blas_threads(self):
        """One BLAS thread for the whole layer (_ONE_THREAD) where its products are the small ones measured there."""
        return blas.one_thread() if self.one_blas_thread else nullcontext()

    def _dropout_mask(self, training, rate, shape, dtype):
        if not training or rate == 0:
            return None
        return (self.rng.random(shape) >= rate).astype(dtype) / dtype.type(1 - rate)

    def _input_bias(self):
        return self.bias.value if self.use_bias else None

    def _scan(self, x, step_mask, rec_mask):
        """(each part's states, the final states), the parts' caches kept for backward."""
        weights = self._part_weights(x.dtype)
        self.parts = batch_parts(len(x))

        def scan(run):
            return [self._scan_part(x[a:b], _rows(step_mask, a, b), _rows(rec_mask, a, b), _rows(self.dmask, a, b),
                                    weights) for a, b in run]
        results = lanes.run(scan, self.parts)
        self.caches = [cache for _, _, cache in results]
        return [H for H, _, _ in results], [np.concatenate(f) for f in zip(*(finals for _, finals, _ in results))]

    # --- backward -----------------------------------------------------------------------------------------------
    def _scan_backward(self, dY, d_finals):
        """The input's gradient (batch, T, features) or None; the parts' weight gradients are added in part order,
        whatever lanes ran them."""
        params = [self.kernel, self.recurrent_kernel] + ([self.bias] if self.use_bias else [])
        wanted = [p.grad is not None for p in params]
        need_dx = getattr(self, "input_grad_needed", True)  # False when the input is data

        def back(run):
            return [self._scan_backward_part(cache, _rows(dY, a, b), [d[a:b] for d in d_finals],
                                             _rows(self.dmask, a, b), wanted, need_dx)
                    for (a, b), cache in run]
        results = lanes.run(back, list(zip(self.parts, self.caches)))
        for grads, _ in results:
            for p, want, g in zip(params, wanted, grads):
                if want:
                    p.grad += g
        return np.concatenate([dx for _, dx in results]) if need_dx else None

    def backward(self, grad):
        grads = grad if isinstance(grad, list) else [grad]
        g_out, g_states = grads[0], list(grads[1:])
        if self.return_sequences:
            dY = np.moveaxis(np.asarray(g_out), 1, 0)  # time-major view; the cell makes the layout it reads
            if self.zero_mask is not None:
                dY = dY * self.zero_mask
            dh = np.zeros(dY.shape[1:], dY.dtype)
        else:
            dY, dh = None, np.array(g_out, copy=True)
        d_finals = [dh] + [np.zeros_like(dh) for _ in range(self.n_states - 1)]
        for k, g in enumerate(g_states):
            if g is not None:
                d_finals[k] = d_finals[k] + g
        with self._blas_threads():  # see _ONE_THREAD
            dx = self._scan_backward(dY, d_finals)
        if dx is None:
            return None
        return np.ascontiguousarray(dx[:, ::-1] if self.go_backwards else dx)

    # --- ONNX -----------------------------------------------------------------------------------------------------
    def onnx_mask(self, g, x, mask):
        return self.compute_mask(x, mask)

    def to_onnx(self, g, x, in_shape, mask):
        outs = self.onnx_outputs(g, g.last(x), mask)
        return outs if self.return_state else outs[0]

    def onnx_outputs(self, g, x, mask) -> list:
        """[output, *final states] on x (batch, steps, features) as forward computes them: go_backwards returns
        sequences in processing order; a masked step keeps the previous state and output."""
        xt = g.op("Transpose", [x.name], perm=[1, 0, 2])  # time-major, as ONNX recurrences and Scan read it
        mt = None
        if mask is not None:
            mt = g.unsqueeze(g.op("Transpose", [mask], perm=[1, 0]), [2])  # (steps, batch, 1)
        if self.go_backwards:
            xt = g.reverse(xt, 0)
            mt = None if mt is None else g.reverse(mt, 0)
        if mt is None and self.act in ONNX_ACTIVATIONS and self.rec_act in ONNX_ACTIVATIONS:
            seq, states = self._onnx_native(g, xt)
        else:
            seq, states = self._onnx_scan(g, xt, mt)
        out = g.value(g.op("Transpose", [seq], f"{self.name}_sequence", perm=[1, 0, 2]), 3) \
            if self.return_sequences else g.value(g.op("Identity", [states[0]], self.name), 2)
        return [out] + [g.value(s, 2) for s in states]

    def _onnx_native(self, g, xt):
        """ONNX's own RNN / LSTM / GRU node; returns (time-major output sequence, final states)."""
        u, order = self.units, self.onnx_gate_order
        kernel = _gate_blocks(self.kernel.value, order, u).T[None]
        recurrent_kernel = _gate_blocks(self.recurrent_kernel.value, order, u).T[None]
        inputs = [xt, g.weight(self, kernel, "W"), g.weight(self, recurrent_kernel, "R")]
        if self.use_bias:
            inputs.append(g.weight(self, self._onnx_bias()[None], "B"))
        op_type, attrs = self._onnx_node(ONNX_ACTIVATIONS[self.act], ONNX_ACTIVATIONS[self.rec_act])
        outs = g.op(op_type, inputs, self.name, outputs=1 + self.n_states, hidden_size=u, **attrs)
        seq = g.squeeze(outs[0], [1])  # (steps, directions=1, batch, units)
        return seq, [g.squeeze(s, [0]) for s in outs[1:]]

    def _onnx_bias(self):
        """ONNX's B: the input biases (Wb), then recurrent biases (Rb), zero where Keras has none."""
        b = self.bias.value
        return np.concatenate([_gate_blocks(b, self.onnx_gate_order, self.units), np.zeros_like(b)])

    def _onnx_scan(self, g, xt, mt):
        """The recurrence as an ONNX Scan whose body is dlcli's cell, for masks (Keras keeps the previous state at a
        masked step, which ONNX's sequence_lens cannot express) and activations ONNX's recurrent nodes lack."""
        xp = g.op("MatMul", [xt, g.weight(self, self.kernel.value, "kernel")])
        if self.use_bias:
            xp = g.op("Add", [xp, g.weight(self, self._input_bias(), "input_bias")])
        n_states = self.n_states
        body = g.child()
        states_in = [body.fresh(f"{self.name}_{s}_prev") for s in ("h", "c")[:n_states]]
        xp_t = body.fresh(f"{self.name}_xp_t")
        m_t = body.fresh(f"{self.name}_mask_t") if mt is not None else None
        U = g.weight(self, self.recurrent_kernel.value, "recurrent_kernel")
        new_states = self._onnx_cell(body, g, U, xp_t, states_in)
        if m_t is not None:
            new_states = [body.op("Where", [m_t, new, old]) for new, old in zip(new_states, states_in)]
        step_out = new_states[0]
        if m_t is not None and self.zero_output_for_mask:
            step_out = body.op("Mul", [step_out, body.cast(m_t, "float32")])
        step_out = body.op("Identity", [step_out], f"{self.name}_y_t")
        states_out = [body.op("Identity", [s], f"{self.name}_state_t") for s in new_states]
        inputs = [(s, "float32") for s in [*states_in, xp_t]] + ([(m_t, "bool")] if m_t else [])
        graph = body.subgraph(f"{self.name}_step", inputs, [(s, "float32") for s in [*states_out, step_out]])
        initial = [g.zeros_rows(xt, self.units, batch_axis=1)] * n_states
        outs = g.op("Scan", [*initial, xp, *([mt] if mt else [])], self.name, outputs=n_states + 1, body=graph,
                    num_scan_inputs=2 if mt else 1)
        return outs[-1], outs[:-1]


class _TimeMajor(Recurrent):
    """A cell that scans time-major input projections (recurrent_cells' SimpleRNN and GRU): the subclass runs its
    loop in `_cell(xp, step_mask, rec_mask, form)` -> (H, cache) and `_cell_backward(cache, dY, dh)` -> (dXP, dU,
    the bias' gradient)."""

    def _gate_form(self, dtype):
        """Per-column constants of the cell's fast gate path (recurrent_cells.tanh_form), whose first entry
        pre-scales the kernel and bias columns; None when the cell has none."""
        return None

    def _part_weights(self, dtype):
        """(form, kernel, input bias), the kernel's and bias' columns pre-scaled by `form`."""
        form, W, b = self._gate_form(dtype), self.kernel.value, self._input_bias()
        if form is not None:
            W = W * form[0]
            b = None if b is None else b * form[0]
        return form, W, b

    def _scan_part(self, x, step_mask, rec_mask, dmask, weights):
        form, W, b = weights
        xt = np.ascontiguousarray(x.transpose(1, 0, 2))
        xp, xd = self._project(xt, dmask, W, b)
        H, cache = self._cell(xp, step_mask, rec_mask, form)
        return H, [H[-1]], (cache, xt, xd)

    def _scan_backward_part(self, part, dY, d_finals, dmask, wanted, need_dx):
        cache, xt, xd = part
        dXP, dU, db = self._cell_backward(cache, None if dY is None else np.ascontiguousarray(dY), d_finals[0])
        dW, dx = self._project_backward(dXP, xt, xd, dmask, wanted[0], need_dx)
        return [dW, dU, db], None if dx is None else dx.transpose(1, 0, 2)

    def _project(self, xt, dmask, W, b):
        """(every step's x_t @ W + b at once (T, part, gates * units), the input W saw where one mask or none
        applies)."""
        T, B, F = xt.shape
        if dmask is None or len(dmask) == 1:
            xd = xt if dmask is None else xt * dmask[0]
            xp = (xd.reshape(-1, F) @ W).reshape(T, B, -1)
        else:
            xd, u = None, self.units
            xp = np.empty((T, B, W.shape[1]), xt.dtype)
            for g, m in enumerate(dmask):
                xp[..., g * u:(g + 1) * u] = ((xt * m).reshape(-1, F) @ W[:, g * u:(g + 1) * u]).reshape(T, B, u)
        if b is not None:
            xp += b
        return xp, xd

    def _project_backward(self, dXP, xt, xd, dmask, train_kernel, need_dx):
        """(the kernel's gradient or None, the input's (T, part, F) or None)."""
        W, (T, B, F) = self.kernel.value, xt.shape
        n, u = W.shape[1], self.units
        dW = dx = None
        if dmask is None or len(dmask) == 1:
            d2 = dXP.reshape(-1, n)
            if train_kernel:
                dW = xd.reshape(-1, F).T @ d2
            if need_dx:
                dx = (d2 @ W.T).reshape(T, B, F)
                dx = dx if dmask is None else dx * dmask[0]
            return dW, dx
        dW = np.empty_like(W) if train_kernel else None
        dx = np.zeros_like(xt) if need_dx else None
        for g, m in enumerate(dmask):
            d2 = dXP[..., g * u:(g + 1) * u].reshape(-1, u)
            if train_kernel:
                dW[:, g * u:(g + 1) * u] = (xt * m).reshape(-1, F).T @ d2
            if need_dx:
                dx += (d2 @ W[:, g * u:(g + 1) * u].T).reshape(T, B, F) * m
        return dW, dx


@register("SimpleRNN")
class SimpleRNN(_TimeMajor):
    """h_t = activation(x_t @ kernel + h_{t-1} @ recurrent_kernel + bias) (Keras' SimpleRNN)."""

    def __init__(self, units: Size, activation="tanh", use_bias: bool = True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros", kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, return_sequences: bool = False, return_state: bool = False,
                 go_backwards: bool = False, **kw):
        super().__init__(units, activation, "sigmoid", use_bias, kernel_initializer, recurrent_initializer,
                         bias_initializer, kernel_regularizer, recurrent_regularizer, bias_regularizer, dropout,
                         recurrent_dropout, return_sequences, return_state, go_backwards, **kw)

    def _cell(self, xp, step_mask, rec_mask, form):
        return cells.simple_forward(xp, self.recurrent_kernel.value, self.act, step_mask, rec_mask)

    def _cell_backward(self, cache, dY, dh):
        dXP, dU = cells.simple_backward(cache, dY, dh)
        return dXP, dU, dXP.sum((0, 1))

    def _onnx_node(self, act, rec):
        return "RNN", {"activations": [act]}

    def _onnx_cell(self, body, g, U, xp_t, states):
        """One step of the cell in a Scan body, on the projected input xp_t; returns the new states."""
        return [body.activation(self.act, body.op("Add", [body.op("MatMul", [states[0], U]), xp_t]))]


class _UnitForgetBias(initializers.Initializer):
    """Keras' unit_forget_bias: the forget-gate quarter of the LSTM bias starts at one."""

    def __init__(self, base):
        self.base = base

    def __call__(self, shape, rng, dtype="float32"):
        u = shape[0] // 4
        return np.concatenate([self.base((u,), rng, dtype), np.ones(u, dtype), self.base((2 * u,), rng, dtype)])


@register("LSTM")
class LSTM(Recurrent):
    """Long short-term memory, Keras' gate order i, f, c, o: kernel (in, 4u), recurrent_kernel (u, 4u), bias (4u,).
    return_state gives [output, h, c]."""

    gates, n_states = 4, 2
    onnx_gate_order = [0, 3, 1, 2]  # Keras i, f, c, o -> ONNX i, o, f, c

    def __init__(self, units: Size, activation="tanh", recurrent_activation="sigmoid", use_bias: bool = True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal", bias_initializer="zeros",
                 unit_forget_bias: bool = True, kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, dropout: float = 0.0, recurrent_dropout: float = 0.0,
                 return_sequences: bool = False, return_state: bool = False, go_backwards: bool = False, **kw):
        super().__init__(units, activation, recurrent_activation, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, kernel_regularizer, recurrent_regularizer,
                         bias_regularizer, dropout, recurrent_dropout, return_sequences, return_state, go_backwards,
                         **kw)
        self.unit_forget_bias = bool(unit_forget_bias)

    def _bias_init(self):
        return _UnitForgetBias(self.bias_initializer) if self.unit_forget_bias else self.bias_initializer

    def _part_weights(self, dtype):
        return cells.lstm_fused_weights(self.kernel.value, self.recurrent_kernel.value, self._input_bias())

    def _scan_part(self, x, step_mask, rec_mask, dmask, Wz):
        (B, T, F), u = x.shape, self.units
        S = np.empty((T + 1, Wz.shape[1], B), x.dtype)  # S[t] = [h_{t-1}; x_t; 1] (recurrent_cells' LSTM)
        S[0, :u] = 0  # h_0; S[T]'s input rows are never read (it only carries h_T)
        xs = x.transpose(1, 2, 0)
        shared = dmask is not None and len(dmask) == 1
        if shared:
            np.multiply(xs, dmask[0].T, out=S[:T, u:u + F])
        else:
            S[:T, u:u + F] = xs
        S[:T, u + F:] = 1
        gate_masks = None
        if rec_mask is not None or (dmask is not None and not shared):
            gate_masks = np.ones((4, Wz.shape[1], B), x.dtype)
            if rec_mask is not None:
                gate_masks[:, :u] = rec_mask[cells.LSTM_ORDER].transpose(0, 2, 1)
            if dmask is not None:
                gate_masks[:, u:u + F] = dmask[cells.LSTM_ORDER].transpose(0, 2, 1)
        c_T, cache = cells.lstm_forward(S, Wz, self.act, self.rec_act,
                                        None if step_mask is None else step_mask.transpose(0, 2, 1), gate_masks)
        return S[:, :u].transpose(0, 2, 1), [S[T, :u].T, c_T.T], cache

    def _scan_backward_part(self, cache, dY, d_finals, dmask, wanted, need_dx):
        dY = None if dY is None else np.ascontiguousarray(dY.transpose(0, 2, 1))  # (T, u, part)
        F = self.kernel.value.shape[0]
        dWz, dx = cells.lstm_gradients(cache, dY, d_finals[0].T, d_finals[1].T, any(wanted), F if need_dx else 0,
                                       self.use_bias)
        grads = cells.lstm_split_grad(dWz, F) if any(wanted) else [None] * 3
        if not need_dx:
            return grads, None
        if dmask is not None and len(dmask) == 1:
            dx *= dmask[0][:, None]
        return grads, dx

    def _onnx_node(self, act, rec):
        return "LSTM", {"activations": [rec, act, act]}

    def _onnx_cell(self, body, g, U, xp_t, states):
        u, act, rec = self.units, self.act, self.rec_act
        z = body.op("Add", [body.op("MatMul", [states[0], U]), xp_t])
        i, f, c_hat, o = body.split(z, [u] * 4, axis=1)
        i, f, o = (body.activation(rec, t) for t in (i, f, o))
        c = body.op("Add", [body.op("Mul", [f, states[1]]), body.op("Mul", [i, body.activation(act, c_hat)])])
        return [body.op("Mul", [o, body.activation(act, c)]), c]


@register("GRU")
class GRU(_TimeMajor):
    """Gated recurrent unit, Keras' gate order z, r, h. With reset_after (Keras' default) the reset gate multiplies
    h @ recurrent_kernel + recurrent_bias, and bias has shape (2, 3u): input bias, recurrent bias."""

    gates = 3
    onnx_gate_order = [0, 1, 2]

    def __init__(self, units: Size, activation="tanh", recurrent_activation="sigmoid", use_bias: bool = True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal", bias_initializer="zeros",
                 kernel_regularizer=None, recurrent_regularizer=None, bias_regularizer=None, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, return_sequences: bool = False, return_state: bool = False,
                 go_backwards: bool = False, reset_after: bool = True, **kw):
        super().__init__(units, activation, recurrent_activation, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, kernel_regularizer, recurrent_regularizer,
                         bias_regularizer, dropout, recurrent_dropout, return_sequences, return_state, go_backwards,
                         **kw)
        self.reset_after = bool(reset_after)

    def _bias_shape(self):
        return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

    def _input_bias(self):
        if not self.use_bias:
            return None
        return self.bias.value[0] if self.reset_after else self.bias.value

    def _gate_form(self, dtype):
        # Only z and r share one activation call; the candidate column keeps scale 1 ("tanh" form).
        return cells.tanh_form([self.rec_act, self.rec_act, "tanh"], self.units, dtype)

    def _cell(self, xp, step_mask, rec_mask, form):
        rb = self.bias.value[1] if (self.use_bias and self.reset_after) else None
        return cells.gru_forward(xp, self.recurrent_kernel.value, rb, self.act, self.rec_act, self.reset_after,
                                 step_mask, rec_mask, form)

    def _cell_backward(self, cache, dY, dh):
        dXP, dInner, dU = cells.gru_backward(cache, dY, dh)
        db = dXP.sum((0, 1))  # with reset_after, bias (2, 3u) is the input bias and the recurrent one (dInner's)
        return dXP, dU, np.stack([db, dInner.sum((0, 1))]) if self.reset_after else db

    def _onnx_node(self, act, rec):
        # Keras reset_after=True applies the reset gate after the recurrent matmul: ONNX linear_before_reset=1
        return "GRU", {"activations": [rec, act], "linear_before_reset": int(self.reset_after)}

    def _onnx_bias(self):
        if self.reset_after:  # (2, 3u): input bias, recurrent bias = ONNX's Wb, Rb
            return np.concatenate([self.bias.value[0], self.bias.value[1]])
        return super()._onnx_bias()

    def _onnx_cell(self, body, g, U, xp_t, states):
        u, act, rec = self.units, self.act, self.rec_act
        h = states[0]
        xz, xr, xh = body.split(xp_t, [u] * 3, axis=1)
        if self.reset_after:
            inner = body.op("MatMul", [h, U])
            if self.use_bias:
                inner = body.op("Add", [inner, g.weight(self, self.bias.value[1], "recurrent_bias")])
            iz, ir, ih = body.split(inner, [u] * 3, axis=1)
            z = body.activation(rec, body.op("Add", [xz, iz]))
            r = body.activation(rec, body.op("Add", [xr, ir]))
            hh = body.activation(act, body.op("Add", [xh, body.op("Mul", [r, ih])]))
        else:
            kernel = self.recurrent_kernel.value
            zr = body.op("Add", [body.op("Concat", [xz, xr], axis=1),
                                 body.op("MatMul", [h, g.weight(self, kernel[:, :2 * u], "recurrent_kernel_zr")])])
            z, r = (body.activation(rec, t) for t in body.split(zr, [u, u], axis=1))
            rh = body.op("MatMul", [body.op("Mul", [r, h]), g.weight(self, kernel[:, 2 * u:], "recurrent_kernel_h")])
            hh = body.activation(act, body.op("Add", [xh, rh]))
        return [body.op("Add", [hh, body.op("Mul", [z, body.op("Sub", [h, hh])])])]  # z h + (1 - z) hh


# Keras' cells: the step each layer above repeats, with the cell's arguments (no sequence arguments). A cell runs
# inside RNN (or StackedRNNCells), which sets return_sequences, return_state and go_backwards on it; on its own in a
# model, where Keras gives it no meaning, it runs over the sequence as RNN(cell) does.
@register("SimpleRNNCell")
class SimpleRNNCell(SimpleRNN):
    def __init__(self, units: Size, activation="tanh", use_bias: bool = True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros", kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, seed: int | None = None, **kw):
        super().__init__(units, activation, use_bias, kernel_initializer, recurrent_initializer, bias_initializer,
                         kernel_regularizer, recurrent_regularizer, bias_regularizer, dropout, recurrent_dropout, **kw)
        self.seed = seed  # Keras' argument; the run's seed drives self.rng


@register("LSTMCell")
class LSTMCell(LSTM):
    def __init__(self, units: Size, activation="tanh", recurrent_activation="sigmoid", use_bias: bool = True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal", bias_initializer="zeros",
                 unit_forget_bias: bool = True, kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, dropout: float = 0.0, recurrent_dropout: float = 0.0, seed: int | None = None,
                 **kw):
        super().__init__(units, activation, recurrent_activation, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, unit_forget_bias, kernel_regularizer,
                         recurrent_regularizer, bias_regularizer, dropout, recurrent_dropout, **kw)
        self.seed = seed


@register("GRUCell")
class GRUCell(GRU):
    def __init__(self, units: Size, activation="tanh", recurrent_activation="sigmoid", use_bias: bool = True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal", bias_initializer="zeros",
                 kernel_regularizer=None, recurrent_regularizer=None, bias_regularizer=None, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, reset_after: bool = True, seed: int | None = None, **kw):
        super().__init__(units, activation, recurrent_activation, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, kernel_regularizer, recurrent_regularizer,
                         bias_regularizer, dropout, recurrent_dropout, reset_after=reset_after, **kw)
        self.seed = seed


CELLS = (SimpleRNNCell, LSTMCell, GRUCell)


class ConvLSTM(Recurrent, _Windowed):
    """Keras' ConvLSTM: an LSTM (gate order i, f, c, o) whose input and recurrent matmuls are convolutions, on
    (batch, timesteps, *spatial, channels). kernel (*kernel_size, channels, 4 filters), recurrent_kernel
    (*kernel_size, filters, 4 filters), bias (4 filters,). The input convolution takes strides, padding and
    dilation_rate; the recurrent one is stride 1, 'same', undilated, as Keras' recurrent_conv. return_state gives
    [output, h, c]. A mask is (batch, timesteps), or per position (batch, timesteps, *spatial) as Masking makes it,
    which Keras applies position by position (so only where the output keeps the input's positions)."""
    gates, n_states = 4, 2
    splits_batch = False  # scans its batch whole (_scan, _scan_backward)
    one_blas_thread = False  # its convolutions are not the small products _ONE_THREAD measured

    def __init__(self, filters: Size, kernel_size: Sizes, strides: Sizes = 1, padding: str = "valid",
                 data_format: str | None = None, dilation_rate: Sizes = 1, activation="tanh",
                 recurrent_activation="sigmoid", use_bias: bool = True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros", unit_forget_bias: bool = True,
                 kernel_regularizer=None, recurrent_regularizer=None, bias_regularizer=None, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, seed: int | None = None, return_sequences: bool = False,
                 return_state: bool = False, go_backwards: bool = False, **kw):
        kind = type(self).__name__
        if not isinstance(filters, (int, np.integer)) or isinstance(filters, bool) or filters <= 0:
            raise ConfigError(f"{kind}: filters must be a positive integer; got {filters!r}")
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"{kind}: dlcli is channels_last only; got data_format {data_format!r}")
        super().__init__(filters, activation, recurrent_activation, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, kernel_regularizer, recurrent_regularizer,
                         bias_regularizer, dropout, recurrent_dropout, return_sequences, return_state, go_backwards,
                         **kw)
        self.filters, self.data_format, self.seed = int(filters), data_format, seed
        self.unit_forget_bias = bool(unit_forget_bias)
        self._window_args(kernel_size, strides, padding, dilation_rate)
        self.input_rank = self.rank + 3

    def _bias_init(self):
        return _UnitForgetBias(self.bias_initializer) if self.unit_forget_bias else self.bias_initializer

    # --- shapes -----------------------------------------------------------------------------------------------
    def _check_rank(self, input_shape):
        axes = "steps" if self.rank == 1 else ", ".join(f"dim{i + 1}" for i in range(self.rank))
        if isinstance(input_shape, list) or len(input_shape) != self.rank + 2:
            raise ShapeError(f"{type(self).__name__} '{self.name}' expects input (batch, timesteps, {axes}, "
                             f"channels); got {format_shape(input_shape)}")
        if any(n is None for n in input_shape[1:]):
            raise ShapeError(f"{type(self).__name__} '{self.name}' needs fixed {axes} and channels (as Keras' "
                             f"ConvLSTM); got {format_shape(input_shape)}")

    def _state_shape(self, step_shape) -> tuple:
        out, _ = cm.spatial_geometry(self, tuple(step_shape), self.rank, self.kernel_size, self.strides,
                                     self.padding, self.dilation_rate)
        return (*out, self.filters)

    def build(self, input_shape):
        self._check_rank(input_shape)
        self._state_shape(input_shape[1:])  # an empty output fails here, naming the layer
        n = 4 * self.filters
        self.kernel = self.add_weight("kernel", (*self.kernel_size, input_shape[-1], n), self.kernel_initializer,
                                      self.kernel_regularizer)
        self.recurrent_kernel = self.add_weight("recurrent_kernel", (*self.kernel_size, self.filters, n),
                                                self.recurrent_initializer, self.recurrent_regularizer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (n,), self._bias_init(), self.bias_regularizer)

    def output_shape(self, input_shape):
        self._check_rank(input_shape)
        state = self._state_shape(input_shape[1:])
        out = (input_shape[0], *state) if self.return_sequences else state
        return [out] + [state] * self.n_states if self.return_state else out

    def flops(self, input_shape):
        state = self._state_shape(input_shape[1:])
        taps, positions, steps = int(np.prod(self.kernel_size)), int(np.prod(state[:-1])), input_shape[0] or 1
        return 2 * int(steps) * positions * taps * (int(input_shape[-1]) + self.filters) * 4 * self.filters

    # --- the passes -------------------------------------------------------------------------------------------
    def _dropout_mask_count(self) -> int:
        return 4  # Keras' ConvLSTMCell: one input and one recurrent mask per gate (dropout_mask_count)

    def _scan(self, x, step_mask, rec_mask):
        B, T, *sizes, C = x.shape
        state = self._state_shape((*sizes, C))
        positions = None if step_mask is None else step_mask.shape[2:-1]  # all 1 for a (batch, timesteps) mask
        if positions is not None and positions != (1,) * self.rank and positions != state[:-1]:
            raise ShapeError(f"{type(self).__name__} '{self.name}': a mask per position {positions} "
                             f"needs an output of the same positions, but the output is {state[:-1]} (use "
                             f"padding='same' and strides 1, as Keras requires)")
        out_sizes, self.pads = cm.geometry(sizes, self.kernel_size, self.strides, self.padding, self.dilation_rate)
        xt = np.ascontiguousarray(np.moveaxis(x, 1, 0))  # time-major (T, batch, *spatial, channels)
        G = 4 * self.filters
        W2 = self.kernel.value.reshape(-1, G)
        self.xt_shape = xt.shape
        if self.dmask is None:
            self.cols = [self._input_cols(xt)]
            XP = self.cols[0] @ W2
        else:  # one input mask per gate, the same at every step
            self.cols = [self._input_cols(xt * m) for m in self.dmask]
            XP = np.concatenate([c @ W2[:, g * self.filters:(g + 1) * self.filters]
                                 for g, c in enumerate(self.cols)], axis=1)
        if self.use_bias:
            XP += self.bias.value
        XP = XP.reshape(T, B, *out_sizes, G)
        H, c_T, self.cache = cells.convlstm_forward(XP, self.recurrent_kernel.value, self.act, self.rec_act,
                                                    step_mask, rec_mask)
        return [H], [H[-1], c_T]

    def _input_cols(self, xt):
        """The input convolution's patches of every step, (T * batch * positions, prod(kernel) * channels)."""
        T, B, *sizes, C = xt.shape
        out_sizes = cm.geometry(sizes, self.kernel_size, self.strides, self.padding, self.dilation_rate)[0]
        cols = cm.im2col(cm.pad(xt.reshape(T * B, *sizes, C), self.pads), self.kernel_size, out_sizes,
                         self.strides, self.dilation_rate)
        return cols.reshape(T * B * int(np.prod(out_sizes)), -1)

    def _scan_backward(self, dY, d_finals):
        dZ, dU = cells.convlstm_backward(self.cache, dY, d_finals[0], d_finals[1])
        G, F = dZ.shape[-1], self.filters
        dZ2 = dZ.reshape(-1, G)
        if self.recurrent_kernel.grad is not None:
            self.recurrent_kernel.grad += dU
        if self.use_bias and self.bias.grad is not None:
            self.bias.grad += dZ2.sum(0)
        if self.kernel.grad is not None:
            if len(self.cols) == 1:
                self.kernel.grad += (self.cols[0].T @ dZ2).reshape(self.kernel.grad.shape)
            else:
                self.kernel.grad += np.concatenate([c.T @ dZ2[:, g * F:(g + 1) * F] for g, c in
                                                    enumerate(self.cols)], axis=1).reshape(self.kernel.grad.shape)
        if not getattr(self, "input_grad_needed", True):  # False when the input is data
            return None
        T, B, *sizes, C = self.xt_shape
        padded = (T * B, *(n + a + b for n, (a, b) in zip(sizes, self.pads)), C)
        out_sizes, W = dZ.shape[2:-1], self.kernel.value

        def input_grad(d2, kernel):
            dxp = cm.col2im_matmul(d2, kernel, padded, out_sizes, self.strides, self.dilation_rate)
            return cm.unpad(dxp, self.pads).reshape(self.xt_shape)

        if self.dmask is None:
            dx = input_grad(dZ2, W)
        else:
            dx = sum(input_grad(dZ2[:, g * F:(g + 1) * F], W[..., g * F:(g + 1) * F]) * m
                     for g, m in enumerate(self.dmask))
        return np.moveaxis(dx, 0, 1)

    # --- ONNX: a Scan over time whose body is one step of the cell, channels-first inside -------------------------
    def onnx_outputs(self, g, x, mask) -> list:
        """[output, h, c] on x (batch, T, *spatial, channels) as forward computes them: the input convolution of every
        step as one Conv, then a Scan whose body adds the recurrent Conv and runs the gates (masked positions keep h
        and c). The output comes out channels-last, the states h and c channels-first (the next Conv's layout)."""
        rank, F = self.rank, self.filters
        state = self._state_shape(self.input_shape[1:])
        out_sizes, positions = list(state[:-1]), int(np.prod(state[:-1]))
        _, pads = cm.geometry(self.input_shape[1:-1], self.kernel_size, self.strides, self.padding,
                              self.dilation_rate)
        channels_first = [rank + 2, *range(2, rank + 2)]
        xt = g.op("Transpose", [x.name], perm=[1, 0, *channels_first])  # (T, batch, channels, *spatial)
        if self.go_backwards:
            xt = g.reverse(xt, 0)
        flat = g.op("Reshape", [xt, g.ints([-1, self.input_shape[-1], *self.input_shape[1:-1]])])  # T * batch
        conv = [flat, g.weight(self, self.kernel.value.transpose(rank + 1, rank, *range(rank)), "kernel")]
        if self.use_bias:
            conv.append(g.weight(self, self.bias.value, "bias"))
        xp = g.op("Conv", conv, kernel_shape=list(self.kernel_size), strides=list(self.strides),
                  dilations=list(self.dilation_rate), pads=g.pads(pads))
        steps_batch = g.op("Slice", [g.op("Shape", [xt]), g.ints([0]), g.ints([2])])
        xp = g.op("Reshape", [xp, g.op("Concat", [steps_batch, g.ints([4 * F, *out_sizes])], axis=0)])
        mt = None
        if mask is not None:
            # (batch, T) or per position (batch, T, *spatial): both as (T, batch, positions), so the body reads
            # one layout whichever Keras' RNN was given
            m = g.op("Reshape", [mask, g.ints([0, 0, -1])])
            mt = g.op("Transpose", [g.op("Expand", [m, g.ints([1, 1, positions])])], perm=[1, 0, 2])
            if self.go_backwards:
                mt = g.reverse(mt, 0)
        body = g.child()
        h_prev, c_prev = body.fresh(f"{self.name}_h_prev"), body.fresh(f"{self.name}_c_prev")
        xp_t = body.fresh(f"{self.name}_xp_t")
        m_t = body.fresh(f"{self.name}_mask_t") if mt is not None else None
        U = g.weight(self, self.recurrent_kernel.value.transpose(rank + 1, rank, *range(rank)), "recurrent_kernel")
        _, same = cm.geometry(out_sizes, self.kernel_size, (1,) * rank, "same", (1,) * rank)
        z = body.op("Add", [body.op("Conv", [h_prev, U], kernel_shape=list(self.kernel_size), pads=g.pads(same)),
                            xp_t])
        i, f, c_hat, o = body.split(z, [F] * 4, axis=1)
        i, f, o = (body.activation(self.rec_act, t) for t in (i, f, o))
        c = body.op("Add", [body.op("Mul", [f, c_prev]), body.op("Mul", [i, body.activation(self.act, c_hat)])])
        h = body.op("Mul", [o, body.activation(self.act, c)])
        if m_t is not None:
            keep = body.op("Reshape", [m_t, g.ints([0, 1, *out_sizes])])
            h, c = body.op("Where", [keep, h, h_prev]), body.op("Where", [keep, c, c_prev])
        outs = [body.op("Identity", [h], f"{self.name}_h_t"), body.op("Identity", [c], f"{self.name}_c_t"),
                body.op("Identity", [h], f"{self.name}_y_t")]
        inputs = [(h_prev, "float32"), (c_prev, "float32"), (xp_t, "float32")] + ([(m_t, "bool")] if m_t else [])
        graph = body.subgraph(f"{self.name}_step", inputs, [(n, "float32") for n in outs])
        batch = g.op("Slice", [g.op("Shape", [xt]), g.ints([1]), g.ints([2])])
        zeros = g.full(g.op("Concat", [batch, g.ints([F, *out_sizes])], axis=0), 0.0, "float32", "zero")
        h_T, c_T, seq = g.op("Scan", [zeros, zeros, xp, *([mt] if mt else [])], self.name, outputs=3, body=graph,
                             num_scan_inputs=2 if mt else 1)
        if self.return_sequences:  # (T, batch, F, *spatial) -> (batch, T, *spatial, F)
            out = g.value(g.op("Transpose", [seq], f"{self.name}_sequence", perm=[1, 0, *range(3, rank + 3), 2]),
                          rank + 3)
        else:  # channels-last as the sequence, so Bidirectional merges either along the filters
            out = g.value(g.op("Transpose", [h_T], self.name, perm=[0, *range(2, rank + 2), 1]), rank + 2)
        return [out, g.value(h_T, rank + 2, first=True), g.value(c_T, rank + 2, first=True)]


ConvLSTM1D = ranked("ConvLSTM1D", ConvLSTM, 1, "On (batch, timesteps, steps, channels).")
ConvLSTM2D = ranked("ConvLSTM2D", ConvLSTM, 2, "On (batch, timesteps, rows, cols, channels), e.g. video frames.")
ConvLSTM3D = ranked("ConvLSTM3D", ConvLSTM, 3, "On (batch, timesteps, depth, rows, cols, channels).")


def batch_parts(n: int) -> list[tuple[int, int]]:
    """The parts of a batch of n whose time loops run on lanes (engine/lanes.py): at least PART_SAMPLES samples each,
    at most MAX_PARTS, fixed by n alone so a result has the same bits on any number of lanes."""
    return lanes.split(n, max(1, min(MAX_PARTS, n // PART_SAMPLES)))


def _rows(a, start, stop):
    """Samples start:stop of an array whose axis 1 is the batch (time-major sequences, dropout masks), or None."""
    return None if a is None else a[:, start:stop]


def _gate_blocks(a, order, units):
    """Columns of a (..., G * units) array regrouped in gate `order`."""
    return np.concatenate([a[..., k * units:(k + 1) * units] for k in order], axis=-1)
