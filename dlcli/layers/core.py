"""Core layers: Dense, EinsumDense, Activation, Identity, Flatten, Reshape, Dropout (Keras' arguments and defaults)."""
import re
import string

import numpy as np

from dlcli.engine import activations, blas, initializers, lanes
from dlcli.engine.layer import Layer, register
from dlcli.errors import ShapeError
from dlcli.registry import Size


@register("Dense")
class Dense(Layer):
    """y = activation(x @ kernel + bias) over the last axis. Kernel layout (in, out) as in Keras."""

    activation_last = True

    def __init__(self, units: Size, activation: str | None = None, use_bias: bool = True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, **kw):
        super().__init__(**kw)
        self.units, self.use_bias = int(units), use_bias
        self.activation = activations.get(activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer, self.bias_regularizer = kernel_regularizer, bias_regularizer

    def build(self, input_shape):
        if len(input_shape) == 0:
            raise ShapeError(f"Dense '{self.name}' needs at least rank-2 input (batch, features); got a scalar")
        self.kernel = self.add_weight("kernel", (input_shape[-1], self.units), self.kernel_initializer,
                                      self.kernel_regularizer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.units,), self.bias_initializer, self.bias_regularizer)

    def output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def flops(self, input_shape):
        return 2 * int(np.prod(input_shape)) * self.units

    @property
    def splits_batch(self) -> bool:
        """Whether its products run on lanes (engine/lanes; the trainer's step then keeps BLAS on one thread): where
        the block product runs them (engine/blas.block_products), float32."""
        kernel = getattr(self, "kernel", None)
        return kernel is not None and kernel.value.dtype == np.float32 and blas.block_products() is not None

    def forward(self, x, training=False):
        self.x = x
        if self.splits_batch:
            z = _lane_product(x.reshape(-1, x.shape[-1]), self.kernel.value).reshape(*x.shape[:-1], -1)
        else:
            z = x @ self.kernel.value
        return activations.activate_owned(self, z, self.bias.value if self.use_bias else None)

    def backward(self, grad):
        grad = self.activation_backward(grad)
        x2, g2 = self.x.reshape(-1, self.x.shape[-1]), grad.reshape(-1, self.units)
        on_lanes = self.splits_batch
        blank = self.kernel.blank_grad()
        if blank is not None:  # the product written in place: no clearing pass, no addition (engine/layer.Param)
            _lane_product(x2.T, g2, blank) if on_lanes else np.matmul(x2.T, g2, out=blank)
        elif self.kernel.grad is not None:
            self.kernel.grad += _lane_product(x2.T, g2) if on_lanes else x2.T @ g2
        if self.use_bias:
            blank = self.bias.blank_grad()
            if blank is not None:
                np.sum(g2, 0, out=blank)
            elif self.bias.grad is not None:
                self.bias.grad += g2.sum(0)
        if not self.input_grad_needed:
            return None
        # blas.product hands the kernel's transpose to np.matmul (the block product reads b's rows whole; copying a
        # (512, 512) kernel's transpose took 315 us, as long as the product)
        return _lane_product(g2, self.kernel.value.T).reshape(self.x.shape) if on_lanes else grad @ self.kernel.value.T

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        y = g.op("MatMul", [x.name, g.weight(self, self.kernel.value, "kernel")])
        if self.use_bias:
            y = g.op("Add", [y, g.weight(self, self.bias.value, "bias")])
        return g.activate(self.activation, g.value(y, x.rank), self.name)


# Dense's products on lanes (where engine/blas.block_products runs them) in parts of the result: panels of at most
# COLUMNS columns, or where it has no more, parts of at most ROWS rows; each lane takes a run of parts. Each element
# of a product sums its k terms in order whatever the part (kernels/gemm.product), so the bits are the same on any
# lanes. One thread, the book MLP's (128, 784) @ (784, 512): 617 / 745 us (best / median) whole, 484 / 508 in
# 128-column panels, each with 400 KB of the kernel, which stays in a core's 1 MB L2 (AMD EPYC, Zen 5, load 9).
# Products under SPLIT_FLOPS run whole on the calling thread.
COLUMNS, ROWS, SPLIT_FLOPS = 128, 256, 1 << 22


def _lane_product(a, b, out=None):
    """a @ b by engine/blas.product (into out if given), in parts over lanes."""
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    rows, columns = out.shape
    if 2 * rows * a.shape[1] * columns < SPLIT_FLOPS:
        return blas.product(a, b, out)
    if columns > COLUMNS:
        lanes.run(lambda run: [blas.product(a, b[:, i:j], out[:, i:j]) for i, j in run],
                  lanes.split(columns, -(-columns // COLUMNS)))
    else:
        lanes.run(lambda run: [blas.product(a[i:j], b, out[i:j]) for i, j in run], lanes.split(rows, -(-rows // ROWS)))
    return out


def einsum_specs(layer, equation: str, rank: int) -> tuple[str, str, str, str, str | None, int]:
    """Keras' three EinsumDense forms "X,Y->Z", "...X,Y->...Z" and "X...,Y->Z..." for inputs of `rank` axes (the
    batch's included) as explicit lowercase subscripts (input, kernel, output), the output's own letters (Keras'
    output_spec, for bias_axes), which side '...' is on (None, "left", "right") and how many axes it stands for."""
    forms = [(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)", None),
             (r"\.\.\.([a-zA-Z]+),([a-zA-Z]+)->\.\.\.([a-zA-Z]+)", "left"),
             (r"([a-zA-Z]{2,})\.\.\.,([a-zA-Z]+)->([a-zA-Z]+)\.\.\.", "right")]
    for pattern, side in forms:
        match = re.fullmatch(pattern, equation.replace(" ", ""))
        if match:
            break
    else:
        raise ShapeError(f"EinsumDense '{layer.name}': equation {equation!r} is not of the form X,Y->Z, ...X,Y->...Z "
                         f"or X...,Y->Z... (as Keras requires)")
    x, w, z = match.groups()
    elided = rank - len(x)
    if elided < 0 or (side is None and elided) or (side is not None and elided == 0 and side == "right"):
        raise ShapeError(f"EinsumDense '{layer.name}': equation {equation!r} does not fit inputs of rank {rank}")
    used = set(x + w + z)
    spare = "".join(c for c in string.ascii_letters if c not in used)[:elided]
    if side == "left":
        x, z = spare + x, spare + z
    elif side == "right":
        x, z = x + spare, z + spare
    own = match.group(3)
    letters = {c: string.ascii_lowercase[i] for i, c in enumerate(dict.fromkeys(x + w + z))}
    if len(letters) > 26:
        raise ShapeError(f"EinsumDense '{layer.name}': equation {equation!r} has more than 26 axes")
    lower = lambda spec: "".join(letters[c] for c in spec)  # noqa: E731 (ONNX's Einsum takes lowercase letters)
    return lower(x), lower(w), lower(z), lower(own), side, elided


@register("EinsumDense")
class EinsumDense(Layer):
    """y = activation(einsum(equation, x, kernel) + bias), Keras' generalised Dense: the kernel's axes are the
    equation's second operand, sized from the input's axes and `output_shape` (the output's axes after the batch's,
    None for one taken from the input); the bias spans the output axes from the first of `bias_axes` on, 1 where
    an axis is not in bias_axes. "ab,bc->ac" is Dense; MultiHeadAttention's projections are "abc,cde->abde"."""

    activation_last = True

    def __init__(self, equation: str, output_shape: int | list[int | None], activation: str | None = None,
                 bias_axes: str | None = None, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, **kw):
        super().__init__(**kw)
        self.equation, self.bias_axes = str(equation), bias_axes
        # `output_shape` would shadow Layer.output_shape(): kept as Keras' partial_output_shape
        self.partial_output_shape = (output_shape,) if isinstance(output_shape, (int, np.integer)) or \
            output_shape is None else tuple(output_shape)
        self.activation = activations.get(activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer, self.bias_regularizer = kernel_regularizer, bias_regularizer

    def _analyze(self, input_shape):
        """(input, kernel, output subscripts, output shape, kernel shape, bias shape or None, fan_in, fan_out), as
        Keras' _analyze_einsum_string sizes them (the kernel's input axes give fan_in, its output axes fan_out)."""
        x, w, z, own, side, elided = einsum_specs(self, self.equation, len(input_shape) + 1)
        sizes = dict(zip(x, (None, *input_shape)))
        partial = list(self.partial_output_shape)
        # Keras puts the batch first, then what '...' stands for on its side: the output_shape given covers the
        # output's own axes after the batch's, or all of them when '...' on the left holds the batch
        if side == "left" and elided:
            full = [None, *input_shape[:elided - 1], *partial]
        elif side == "right":
            full = [None, *partial, *input_shape[len(input_shape) - elided:]]
        else:
            full = [None, *partial]
        if len(full) != len(z):
            raise ShapeError(f"EinsumDense '{self.name}': output_shape {list(partial)} gives {len(full) - 1} output "
                             f"axes after the batch's; equation {self.equation!r} has {len(z) - 1}")
        out = {}
        for c, n in zip(z[1:], full[1:]):
            if c in sizes and n is not None and n != sizes[c]:
                raise ShapeError(f"EinsumDense '{self.name}': output_shape says {n} where the input has "
                                 f"{sizes[c]} on the axis they share in {self.equation!r}")
            if c not in sizes and c not in w:
                raise ShapeError(f"EinsumDense '{self.name}': output axis '{c}' of {self.equation!r} is in neither "
                                 f"the input nor the kernel")
            out[c] = sizes.get(c, n)
            if out[c] is None:
                raise ShapeError(f"EinsumDense '{self.name}': output_shape leaves axis '{c}' of {self.equation!r} "
                                 f"unknown (None is only for axes the input gives)")
        if any(c not in out and c not in sizes for c in w) or x[0] in w or z[0] != x[0]:
            raise ShapeError(f"EinsumDense '{self.name}': in {self.equation!r} the batch axis must lead the input and "
                             f"the output, and every kernel axis be another input or output axis")
        kernel = tuple(int(out[c]) if c in out else int(sizes[c]) for c in w)
        fan_in = int(np.prod([n for c, n in zip(w, kernel) if c not in out]))
        fan_out = int(np.prod([n for c, n in zip(w, kernel) if c in out]))
        bias = None
        if self.bias_axes is not None:
            letters = dict(zip(self.equation.split("->")[1].replace(".", ""), own))
            if not self.bias_axes or any(c not in letters for c in self.bias_axes):
                raise ShapeError(f"EinsumDense '{self.name}': bias_axes {self.bias_axes!r} must name axes of the "
                                 f"output in {self.equation!r}")
            chosen = {letters[c] for c in self.bias_axes}
            first = min(own.index(c) for c in chosen)
            bias = (*(int(out[c]) if c in chosen else 1 for c in own[first:]), *(1,) * (elided * (side == "right")))
        return x, w, z, tuple(int(out[c]) for c in z[1:]), kernel, bias, fan_in, fan_out

    def build(self, input_shape):
        self.specs = self._analyze(tuple(input_shape))
        _, _, _, _, kernel, bias, fan_in, fan_out = self.specs
        self.kernel = self.add_weight("kernel", kernel, "zeros", self.kernel_regularizer)
        init = self.kernel_initializer
        # Keras gives a VarianceScaling kernel initializer the kernel's input and output axes: the fans are their
        # sizes' products, whatever the kernel's rank (a (features, heads, head_dim) kernel is not a convolution)
        shape = (fan_in, fan_out) if isinstance(init, initializers.VarianceScaling) else kernel
        self.kernel.value = init(shape, self.rng, self.dtype).reshape(kernel)
        if bias is not None:
            self.bias = self.add_weight("bias", bias, self.bias_initializer, self.bias_regularizer)

    def output_shape(self, input_shape):
        return self._analyze(tuple(input_shape))[3]

    def flops(self, input_shape):
        x, w, z, out, kernel, *_ = self._analyze(tuple(input_shape))
        sizes = {**dict(zip(x[1:], input_shape)), **dict(zip(w, kernel)), **dict(zip(z[1:], out))}
        return 2 * int(np.prod(list(sizes.values())))

    def forward(self, x, training=False):
        self.x = x
        i, w, z = self.specs[:3]
        y = np.einsum(f"{i},{w}->{z}", x, self.kernel.value, optimize=True)
        if self.specs[5] is not None:
            y += self.bias.value
        return activations.activate_owned(self, y)

    def backward(self, grad):
        g = self.activation_backward(grad)
        i, w, z = self.specs[:3]
        if self.specs[5] is not None and self.bias.grad is not None:
            b = self.bias.grad
            lead = g.sum(tuple(range(g.ndim - b.ndim)))
            self.bias.grad += lead.sum(tuple(a for a, n in enumerate(b.shape) if n == 1), keepdims=True)
        if self.kernel.grad is not None:
            self.kernel.grad += np.einsum(f"{i},{z}->{w}", self.x, g, optimize=True)
        if not self.input_grad_needed:
            return None
        kept = "".join(c for c in i if c in z or c in w)  # an input axis summed away gets the same gradient along it
        dx = np.einsum(f"{z},{w}->{kept}", g, self.kernel.value, optimize=True)
        dx = dx.reshape([n if c in kept else 1 for c, n in zip(i, self.x.shape)])
        return dx if dx.shape == self.x.shape else np.broadcast_to(dx, self.x.shape).copy()

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        i, w, z = self.specs[:3]
        y = g.op("Einsum", [x.name, g.weight(self, self.kernel.value, "kernel")], equation=f"{i},{w}->{z}")
        if self.specs[5] is not None:
            y = g.op("Add", [y, g.weight(self, self.bias.value, "bias")])
        return g.activate(self.activation, g.value(y, len(z)), self.name)


@register("Activation")
class Activation(Layer):
    activation_last = True
    supports_masking = True
    standalone_activation = True  # the graph may run its plain ReLU inside the layer before it (graph.py)

    def __init__(self, activation: str | dict, **kw):
        super().__init__(**kw)
        self.activation = activations.get(activation)

    def output_shape(self, input_shape):
        return self.activation.output_shape(input_shape)  # glu halves its axis

    def forward(self, x, training=False):
        return self.activate(x)

    def backward(self, grad):
        return self.activation_backward(grad)

    def reads_gradient_sum(self) -> bool:
        return self.activation_moved  # its gradient passes through (activation_backward)

    def to_onnx(self, g, x, in_shape, mask):
        return g.activate(self.activation, x, self.name)


@register("Identity")
class Identity(Layer):
    """The input unchanged (Keras' placeholder layer), mask included."""

    supports_masking = True

    def forward(self, x, training=False):
        return x

    def backward(self, grad):
        return grad

    def to_onnx(self, g, x, in_shape, mask):
        return x


@register("Flatten")
class Flatten(Layer):
    """(batch, d1, d2, ...) -> (batch, d1 * d2 * ...); a view, not a copy, for contiguous input."""

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training=False):
        self.in_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad):
        return grad.reshape(self.in_shape)

    def to_onnx(self, g, x, in_shape, mask):
        return g.value(g.op("Flatten", [g.last(x).name], self.name, axis=1), 2)  # channels-last order, as dlcli's


@register("Reshape")
class Reshape(Layer):
    """Reshape the non-batch axes to `target_shape` (one entry may be -1, as in Keras)."""

    def __init__(self, target_shape: list[int], **kw):
        super().__init__(**kw)
        self.target_shape = tuple(int(s) for s in target_shape)

    def output_shape(self, input_shape):
        size, target = int(np.prod(input_shape)), list(self.target_shape)
        if target.count(-1) > 1:
            raise ShapeError(f"Reshape '{self.name}': at most one -1 in target_shape {self.target_shape}")
        known = int(np.prod([s for s in target if s != -1]))
        if -1 in target:
            if known == 0 or size % known:
                raise ShapeError(f"Reshape '{self.name}' cannot reshape {size} values into {self.target_shape}")
            target[target.index(-1)] = size // known
        elif known != size:
            raise ShapeError(f"Reshape '{self.name}' cannot reshape input of shape {tuple(input_shape)} "
                             f"({size} values) into {self.target_shape} ({known} values)")
        return tuple(target)

    def forward(self, x, training=False):
        self.in_shape = x.shape
        return x.reshape((x.shape[0], *self.output_shape(x.shape[1:])))

    def backward(self, grad):
        return grad.reshape(self.in_shape)

    def to_onnx(self, g, x, in_shape, mask):
        out = self.output_shape(in_shape)
        return g.value(g.op("Reshape", [g.last(x).name, g.ints([0, *out])], self.name), len(out) + 1)


def noise_shape(layer, shape) -> tuple:
    """The shape of a dropout mask: Keras' noise_shape gives one entry per axis, the batch's included, None for the
    input's size there and 1 to share one draw along that axis ([None, 1, 1, None]: one per sample and channel)."""
    spec = layer.noise_shape
    if spec is None:
        return shape
    if len(spec) != len(shape):
        raise ShapeError(f"{type(layer).__name__} '{layer.name}': noise_shape {list(spec)} needs one entry per axis "
                         f"of the input, batch included (as Keras), for inputs of rank {len(shape)}")
    return tuple(d if n is None else int(n) for n, d in zip(spec, shape))


@register("Dropout")
class Dropout(Layer):
    """Inverted dropout (Keras): zero a `rate` fraction while training and scale the rest by 1 / (1 - rate)."""

    supports_masking = True

    def __init__(self, rate: float, noise_shape: list[int | None] | None = None, **kw):
        super().__init__(**kw)
        if not 0 <= rate < 1:
            raise ShapeError(f"Dropout '{self.name}': rate must be in [0, 1); got {rate}")
        self.rate, self.noise_shape = float(rate), noise_shape

    def forward(self, x, training=False):
        if not training or self.rate == 0:
            self.scale = None
            return x
        shape = noise_shape(self, x.shape)
        keep = self.rng.random(shape, dtype=np.float32) >= self.rate
        self.scale = keep.astype(x.dtype) / np.asarray(1 - self.rate, x.dtype)
        return x * self.scale

    def backward(self, grad):
        return grad if self.scale is None else grad * self.scale

    def to_onnx(self, g, x, in_shape, mask):
        return x  # the identity at inference
