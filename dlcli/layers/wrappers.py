"""Layers that run other layers: Bidirectional (Keras' RNN wrapper), TimeDistributed, SpectralNormalization, and
RNN and StackedRNNCells, which run recurrent cells.

A wrapper owns its inner layers: their weights appear in the wrapper's `params` (prefixed keys such as
"forward/kernel", in Keras' weight order), so models list, train and save them through the wrapper; the inner
layers draw their randomness from the wrapper's generator. The inner layer is given as a Layer or as its config
mapping `{type: LSTM, units: 32, ...}`, and `get_config()` gives the mapping back.
"""
import numpy as np

from dlcli.engine.layer import LAYERS, Layer, register, snake_case
from dlcli.errors import ConfigError, ExportError, ShapeError
from dlcli.layers.recurrent import CELLS, Recurrent

MERGE_MODES = ("concat", "sum", "mul", "ave", None)


def as_layer(spec, owner: str, name: str | None = None) -> Layer:
    """A Layer from a Layer or a `{type: ..., ...}` mapping (a fresh layer each call, renamed when `name`)."""
    if isinstance(spec, Layer):
        config = spec.get_config()
    elif isinstance(spec, dict) and "type" in spec:
        config = dict(spec)
    else:
        raise ConfigError(f"{owner}: 'layer' must be a layer config such as {{type: LSTM, units: 32}}; got {spec!r}")
    config = dict(config)
    cls = LAYERS.get(config.pop("type"))
    if name is not None:
        config["name"] = name
    return cls(**config)


class Wrapper(Layer):
    """Adopts the inner layers' weights under prefixed keys and keeps their dtype and RNG in step with its own."""

    def _inner(self) -> list[tuple[str, Layer]]:
        raise NotImplementedError

    def _build_inner(self, layer: Layer, input_shape):
        layer.dtype = self.dtype
        layer.ensure_built(input_shape, self.rng)

    def _adopt_weights(self):
        for prefix, layer in self._inner():
            for key, p in layer.params.items():
                p.name = f"{prefix}{key}"
                p.layer = self  # the wrapper is what the model sees: its name, trainable flag and lr_mult apply
                self.params[p.name] = p

    def _sync(self):
        for _, layer in self._inner():
            layer.rng, layer.dtype, layer.output_fused = self.rng, self.dtype, False

    def flops(self, input_shape):
        return sum(layer.flops(input_shape) for _, layer in self._inner())


@register("Bidirectional")
class Bidirectional(Wrapper):
    """Runs `layer` forwards and a go_backwards copy, merging their outputs (Keras' Bidirectional).

    The copies are named forward_<name> and backward_<name>; the backward sequence is flipped back into time order
    before merging. With return_state the outputs are [merged, forward states..., backward states...]."""

    def __init__(self, layer, merge_mode: str | None = "concat", backward_layer=None, **kw):
        super().__init__(**kw)
        if merge_mode not in MERGE_MODES:
            raise ConfigError(f"Bidirectional '{self.name}': merge_mode must be one of "
                              f"{', '.join(map(str, MERGE_MODES))}; got {merge_mode!r}")
        self.merge_mode = merge_mode
        base = as_layer(layer, f"Bidirectional '{self.name}'")
        if not isinstance(base, Recurrent):
            raise ConfigError(f"Bidirectional '{self.name}' wraps a recurrent layer (SimpleRNN, LSTM, GRU); got "
                              f"{type(base).__name__}")
        inner_name = base.name.removeprefix("forward_")
        self.forward_layer = as_layer(base, self.name, "forward_" + inner_name)
        if backward_layer is None:
            config = base.get_config()
            config["go_backwards"] = True
            self.backward_layer = as_layer(config, self.name, "backward_" + inner_name)
        else:
            self.backward_layer = as_layer(backward_layer, f"Bidirectional '{self.name}'")
        f, b = self.forward_layer, self.backward_layer
        if not isinstance(b, Recurrent) or f.go_backwards == b.go_backwards or f.return_sequences != b.return_sequences \
                or f.return_state != b.return_state:
            raise ConfigError(f"Bidirectional '{self.name}': backward_layer must match layer's return_sequences "
                              f"and return_state, with the opposite go_backwards")
        self.return_sequences, self.return_state = f.return_sequences, f.return_state
        for inner in (f, b):  # Keras forces zeros at the masked steps of returned sequences
            inner.zero_output_for_mask = self.return_sequences

    def _inner(self):
        return [("forward/", self.forward_layer), ("backward/", self.backward_layer)]

    @property
    def splits_batch(self):
        """Whether its directions' time loops run on lanes (engine/lanes.py), so fit's step hands it the lanes."""
        return self.forward_layer.splits_batch and self.backward_layer.splits_batch

    def build(self, input_shape):
        self._build_inner(self.forward_layer, input_shape)
        self._build_inner(self.backward_layer, input_shape)
        self._adopt_weights()

    def output_shape(self, input_shape):
        fo, bo = self.forward_layer.output_shape(input_shape), self.backward_layer.output_shape(input_shape)
        f_states, b_states = (fo[1:], bo[1:]) if self.return_state else ([], [])
        fo, bo = (fo[0], bo[0]) if self.return_state else (fo, bo)
        if self.merge_mode is None:
            outs = [fo, bo]
        elif self.merge_mode == "concat":
            outs = [(*fo[:-1], fo[-1] + bo[-1])]
        else:
            outs = [fo]
        outs = outs + list(f_states) + list(b_states)
        return outs if len(outs) > 1 else outs[0]

    def compute_mask(self, x, mask):
        out = mask if self.return_sequences else None
        n_out = 2 if self.merge_mode is None else 1
        if not self.return_state and n_out == 1:
            return out
        n_states = self.forward_layer.n_states + self.backward_layer.n_states if self.return_state else 0
        return [out] * n_out + [None] * n_states

    def forward(self, x, training=False):
        self._sync()
        outs = []
        for layer in (self.forward_layer, self.backward_layer):
            layer.input_mask = self.input_mask
            y = layer.forward(x, training)
            outs.append(y if isinstance(y, list) else [y])
        (y, *f_states), (y_rev, *b_states) = outs
        if self.return_sequences:
            y_rev = y_rev[:, ::-1]
        self.y, self.y_rev = y, y_rev
        if self.merge_mode == "concat":
            merged = [np.concatenate([y, y_rev], axis=-1)]
        elif self.merge_mode == "sum":
            merged = [y + y_rev]
        elif self.merge_mode == "ave":
            merged = [(y + y_rev) / 2]
        elif self.merge_mode == "mul":
            merged = [y * y_rev]
        else:
            merged = [y, np.ascontiguousarray(y_rev)]
        result = merged + f_states + b_states
        return result if len(result) > 1 else result[0]

    def backward(self, grad):
        grads = grad if isinstance(grad, list) else [grad]
        n_out = 2 if self.merge_mode is None else 1
        g, g_states = grads[:n_out], grads[n_out:]
        units = self.y.shape[-1]
        if self.merge_mode == "concat":
            gy, gy_rev = g[0][..., :units], g[0][..., units:]
        elif self.merge_mode == "sum":
            gy, gy_rev = g[0], g[0]
        elif self.merge_mode == "ave":
            gy = gy_rev = g[0] / 2
        elif self.merge_mode == "mul":
            gy, gy_rev = g[0] * self.y_rev, g[0] * self.y
        else:
            gy, gy_rev = g
        if self.return_sequences:
            gy_rev = gy_rev[:, ::-1]
        n_f = self.forward_layer.n_states if self.return_state else 0
        gx = 0
        for layer, gl, gs in ((self.forward_layer, gy, g_states[:n_f]), (self.backward_layer, gy_rev, g_states[n_f:])):
            gx = gx + layer.backward([np.ascontiguousarray(gl), *gs] if self.return_state else np.ascontiguousarray(gl))
        return gx

    @property
    def keras_weight_groups(self):
        return [f"{side}/{group}" for side, inner in (("forward_layer", self.forward_layer),
                                                      ("backward_layer", self.backward_layer))
                for group in inner.keras_weight_groups]

    def onnx_mask(self, g, x, mask):
        return self.compute_mask(x, mask)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        (y, *f_states), (y_rev, *b_states) = (inner.onnx_outputs(g, x, mask)
                                              for inner in (self.forward_layer, self.backward_layer))
        if self.return_sequences:  # the backward copy ran reversed: back into time order before merging
            y_rev = g.value(g.reverse(y_rev.name, 1), y_rev.rank)
        mode, rank = self.merge_mode, y.rank
        if mode == "concat":
            merged = [g.value(g.op("Concat", [y.name, y_rev.name], self.name, axis=-1), rank)]
        elif mode == "sum":
            merged = [g.value(g.op("Add", [y.name, y_rev.name], self.name), rank)]
        elif mode == "ave":
            merged = [g.value(g.op("Div", [g.op("Add", [y.name, y_rev.name]), g.scalar(2.0)], self.name), rank)]
        elif mode == "mul":
            merged = [g.value(g.op("Mul", [y.name, y_rev.name], self.name), rank)]
        else:
            merged = [y, y_rev]
        result = merged + (f_states + b_states if self.return_state else [])
        return result if len(result) > 1 else result[0]


@register("TimeDistributed")
class TimeDistributed(Wrapper):
    """Applies `layer` to every time step: (batch, T, ...) runs as (batch * T, ...) through the inner layer."""

    supports_masking = True  # the (batch, T) mask passes through, as in Keras

    def __init__(self, layer, **kw):
        super().__init__(**kw)
        self.layer = as_layer(layer, f"TimeDistributed '{self.name}'")

    def _inner(self):
        return [("", self.layer)]

    def _check(self, input_shape):
        if isinstance(input_shape, list) or len(input_shape) < 2:
            raise ShapeError(f"TimeDistributed '{self.name}' needs input (batch, timesteps, ...) of rank >= 3; got "
                             f"shape {input_shape}")

    def build(self, input_shape):
        self._check(input_shape)
        self._build_inner(self.layer, tuple(input_shape[1:]))
        self._adopt_weights()

    def output_shape(self, input_shape):
        self._check(input_shape)
        inner = self.layer.output_shape(tuple(input_shape[1:]))
        if isinstance(inner, list):
            raise ShapeError(f"TimeDistributed '{self.name}' needs a single-output layer; "
                             f"{type(self.layer).__name__} returns {len(inner)} outputs")
        return (input_shape[0], *inner)

    def flops(self, input_shape):
        return int(input_shape[0] or 1) * self.layer.flops(tuple(input_shape[1:]))

    def forward(self, x, training=False):
        self._sync()
        self.layer.input_mask = None
        batch, steps = x.shape[:2]
        y = self.layer.forward(x.reshape(batch * steps, *x.shape[2:]), training)
        return y.reshape(batch, steps, *y.shape[1:])

    def backward(self, grad):
        batch, steps = grad.shape[:2]
        gx = self.layer.backward(grad.reshape(batch * steps, *grad.shape[2:]))
        return None if gx is None else gx.reshape(batch, steps, *gx.shape[1:])

    @property
    def keras_weight_groups(self):
        return [f"layer/{group}" for group in self.layer.keras_weight_groups]

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        steps, inner_shape = in_shape[0], tuple(in_shape[1:])
        if steps is None:
            raise ExportError("TimeDistributed needs a fixed number of time steps to export")
        folded = g.value(g.op("Reshape", [x.name, g.ints([-1, *inner_shape])]), len(inner_shape) + 1, dtype=x.dtype)
        y = g.last(g.emit(self.layer, folded, inner_shape, None))
        out = self.layer.output_shape(inner_shape)
        return g.value(g.op("Reshape", [y.name, g.ints([-1, steps, *out])], self.name), len(out) + 2)


def _l2_normalized(v):
    """Keras' ops.normalize over every entry: v * min(1 / |v|, 1 / epsilon), epsilon 1e-7."""
    square_sum = float((v * v).sum())
    return v * (min(1 / np.sqrt(square_sum), 1e7) if square_sum > 0 else 1e7)


@register("SpectralNormalization")
class SpectralNormalization(Wrapper):
    """Divides the wrapped layer's kernel (or embeddings) by its largest singular value, estimated as Keras 3 does:
    while training, `power_iterations` steps of the power method from the kept vector_u on the kernel as a
    (-1, last axis) matrix, then kernel /= v W u^T, written into the kernel itself (skipped while it is all zeros)
    before the layer runs; the gradient is the layer's at the normalised kernel (Keras stops it at sigma). At
    inference the layer runs as it is. Weights: the layer's, then vector_u (1, last axis), non-trainable."""

    def __init__(self, layer, power_iterations: int = 1, **kw):
        super().__init__(**kw)
        if isinstance(power_iterations, bool) or int(power_iterations) != power_iterations or power_iterations < 1:
            raise ConfigError(f"SpectralNormalization '{self.name}': power_iterations must be a positive integer; "
                              f"got {power_iterations!r}")
        self.power_iterations = int(power_iterations)
        self.layer = as_layer(layer, f"SpectralNormalization '{self.name}'")
        self.supports_masking = self.layer.supports_masking

    def _inner(self):
        return [("", self.layer)]

    def build(self, input_shape):
        self._build_inner(self.layer, input_shape)
        kernel = self.layer.params.get("kernel") or self.layer.params.get("embeddings")
        if kernel is None:
            raise ConfigError(f"SpectralNormalization '{self.name}': {type(self.layer).__name__} has neither a kernel "
                              f"nor embeddings to normalise (as Keras requires)")
        self._adopt_weights()
        self.kernel = kernel
        self.vector_u = self.add_weight("vector_u", (1, kernel.value.shape[-1]),
                                        {"type": "truncated_normal", "stddev": 0.02}, trainable=False)

    def output_shape(self, input_shape):
        return self.layer.output_shape(input_shape)

    def normalize_kernel(self):
        """One training step's power iteration; kernel and vector_u are updated in place, as Keras assigns them."""
        w = self.kernel.value
        if not w.any():
            return
        w2, u = w.reshape(-1, w.shape[-1]), self.vector_u.value
        for _ in range(self.power_iterations):
            v = _l2_normalized(u @ w2.T)
            u = _l2_normalized(v @ w2)
        sigma = (v @ w2 @ u.T).item()
        self.kernel.value = (w / w.dtype.type(sigma)).astype(w.dtype)
        self.vector_u.value = u.astype(self.vector_u.value.dtype)

    def forward(self, x, training=False):
        self._sync()
        self.layer.input_mask = self.input_mask
        if training:
            self.normalize_kernel()
        return self.layer.forward(x, training)

    def backward(self, grad):
        return self.layer.backward(grad)

    @property
    def keras_weight_groups(self):
        # Keras' own vars are [the layer's kernel again, vector_u]
        return [*(f"layer/{group}" for group in self.layer.keras_weight_groups), ("vars", ["1"])]

    def to_onnx(self, g, x, in_shape, mask):
        return g.emit(self.layer, x, in_shape, mask)


def _cell(spec, owner: str) -> Recurrent:
    cell = as_layer(spec, owner)
    if not isinstance(cell, CELLS):
        raise ConfigError(f"{owner}: a cell is SimpleRNNCell, LSTMCell or GRUCell; got {type(cell).__name__}")
    return cell


@register("StackedRNNCells")
class StackedRNNCells(Wrapper):
    """Cells run one after another at every step (Keras' StackedRNNCells), the same as their layers stacked with
    return_sequences: each cell reads the previous cell's outputs. Inside RNN, which sets return_sequences (the last
    cell's) and go_backwards (the sequence and its mask reversed once, before the first cell); on its own it runs
    over the sequence as RNN(StackedRNNCells) does. Weights: each cell's, prefixed with its name."""

    supports_masking = True

    def __init__(self, cells: list, **kw):
        super().__init__(**kw)
        if not isinstance(cells, (list, tuple)) or not cells:
            raise ConfigError(f"StackedRNNCells '{self.name}': cells must be a non-empty list of cells")
        self.cells = [_cell(c, f"StackedRNNCells '{self.name}'") for c in cells]
        self.return_sequences, self.go_backwards = False, False

    def _inner(self):
        return [(f"{cell.name}/", cell) for cell in self.cells]

    def _chain(self):
        for k, cell in enumerate(self.cells):
            cell.return_sequences = self.return_sequences if k == len(self.cells) - 1 else True
            cell.return_state, cell.go_backwards = False, False

    def build(self, input_shape):
        self._chain()
        shape = input_shape
        for cell in self.cells:
            self._build_inner(cell, shape)
            shape = cell.output_shape(shape)
        self._adopt_weights()

    def output_shape(self, input_shape):
        self._chain()
        for cell in self.cells:
            input_shape = cell.output_shape(input_shape)
        return input_shape

    def compute_mask(self, x, mask):
        return mask if self.return_sequences else None

    def flops(self, input_shape):
        total = 0
        for cell in self.cells:
            total, input_shape = total + cell.flops(input_shape), cell.output_shape(input_shape)
        return total

    def forward(self, x, training=False):
        self._sync()
        self._chain()
        mask = self.input_mask
        if self.go_backwards:
            x, mask = x[:, ::-1], None if mask is None else mask[:, ::-1]
        for cell in self.cells:
            cell.input_mask = mask
            x = cell.forward(x, training)
        return x

    def backward(self, grad):
        for cell in reversed(self.cells):
            grad = cell.backward(grad)
            if grad is None:
                return None
        return np.ascontiguousarray(grad[:, ::-1]) if self.go_backwards else grad

    @property
    def keras_weight_groups(self):
        """cells/<class in snake_case>[_n]/vars, numbered per class as Keras names a list's layers."""
        counts, groups = {}, []
        for cell in self.cells:
            base = snake_case(type(cell).__name__)
            groups.append(f"cells/{base}" + (f"_{counts[base]}" if counts.get(base) else "") + "/vars")
            counts[base] = counts.get(base, 0) + 1
        return groups

    def onnx_mask(self, g, x, mask):
        return self.compute_mask(x, mask)

    def to_onnx(self, g, x, in_shape, mask):
        self._chain()
        x = g.last(x)
        if self.go_backwards:
            x = g.value(g.reverse(x.name, 1), 3)
            mask = None if mask is None else g.reverse(mask, 1)
        for cell in self.cells:
            x = g.emit(cell, x, in_shape, mask)
            in_shape = cell.output_shape(in_shape)
        return x


@register("RNN")
class RNN(Wrapper):
    """Keras' RNN: a cell (SimpleRNNCell, LSTMCell, GRUCell), or several (a list or StackedRNNCells), run over the
    sequence. RNN(LSTMCell(...)) is LSTM(...) with the same weights (Keras keeps them under cell/vars); outputs,
    masks and return_state as the recurrent layers give them (return_state with one cell only)."""

    supports_masking = True

    def __init__(self, cell, return_sequences: bool = False, return_state: bool = False, go_backwards: bool = False,
                 zero_output_for_mask: bool = False, **kw):
        super().__init__(**kw)
        owner = f"RNN '{self.name}'"
        if isinstance(cell, (list, tuple)):
            cell = {"type": "StackedRNNCells", "cells": list(cell)}
        if isinstance(cell, dict) and cell.get("type") == "StackedRNNCells" or isinstance(cell, StackedRNNCells):
            self.cell = as_layer(cell, owner)
            if return_state:
                raise ConfigError(f"{owner}: return_state is available with one cell, not StackedRNNCells")
        else:
            self.cell = _cell(cell, owner)
            self.cell.return_state = bool(return_state)
            self.cell.zero_output_for_mask = bool(zero_output_for_mask)
        self.cell.return_sequences, self.cell.go_backwards = bool(return_sequences), bool(go_backwards)
        self.return_sequences, self.return_state = bool(return_sequences), bool(return_state)
        self.go_backwards, self.zero_output_for_mask = bool(go_backwards), bool(zero_output_for_mask)

    def _inner(self):
        return [("", self.cell)]

    def build(self, input_shape):
        self._build_inner(self.cell, input_shape)
        self._adopt_weights()

    def output_shape(self, input_shape):
        return self.cell.output_shape(input_shape)

    def compute_mask(self, x, mask):
        return self.cell.compute_mask(x, mask)

    def forward(self, x, training=False):
        self._sync()
        self.cell.input_mask = self.input_mask
        return self.cell.forward(x, training)

    def backward(self, grad):
        return self.cell.backward(grad)

    @property
    def keras_weight_groups(self):
        if isinstance(self.cell, StackedRNNCells):
            return [f"cell/{group}" for group in self.cell.keras_weight_groups]
        return ["cell/vars"]

    def onnx_mask(self, g, x, mask):
        return self.compute_mask(x, mask)

    def to_onnx(self, g, x, in_shape, mask):
        return g.emit(self.cell, x, in_shape, mask)
