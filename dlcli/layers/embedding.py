"""Embedding, ReversibleEmbedding and Masking: where sequence masks start (Keras' arguments and mask semantics)."""
import numpy as np

from dlcli import kernels
from dlcli.engine import initializers
from dlcli.engine.layer import Layer, format_shape, register
from dlcli.errors import DlcliError, ShapeError
from dlcli.registry import Size


@register("Embedding")
class Embedding(Layer):
    """Integer indices (batch, ...) -> rows of `embeddings` (batch, ..., output_dim). With mask_zero, index 0 is
    padding and the output carries the mask `x != 0` (so input_dim must count it, as in Keras)."""

    def __init__(self, input_dim: Size, output_dim: Size, embeddings_initializer="uniform",
                 embeddings_regularizer=None, mask_zero: bool = False, input_length: int | None = None, **kw):
        super().__init__(**kw)
        self.input_dim, self.output_dim, self.mask_zero = int(input_dim), int(output_dim), bool(mask_zero)
        # Keras' "uniform" here is RandomUniform(-0.05, 0.05), which is our random_uniform's default.
        self.embeddings_initializer = initializers.get(
            "random_uniform" if embeddings_initializer == "uniform" else embeddings_initializer)
        self.embeddings_regularizer = embeddings_regularizer
        # input_length: accepted for Keras 2 configs and ignored, as Keras 3 does

    def build(self, input_shape):
        self.embeddings = self.add_weight("embeddings", (self.input_dim, self.output_dim),
                                          self.embeddings_initializer, self.embeddings_regularizer)

    def output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def flops(self, input_shape):
        return 0

    def forward(self, x, training=False):
        idx = np.asarray(x)
        if idx.dtype.kind not in "iu":
            idx = idx.astype(np.int64)  # datasets may arrive as float arrays of whole numbers
        if idx.size and (idx.min() < 0 or idx.max() >= self.input_dim):
            bad = int(idx.max()) if idx.max() >= self.input_dim else int(idx.min())
            raise DlcliError(f"Embedding '{self.name}' got index {bad}, outside [0, {self.input_dim}); set "
                             f"input_dim to the vocabulary size (num_words, plus 1 if 0 is padding), or cap the "
                             f"indices the dataset produces")
        self.idx = idx
        return self.embeddings.value[idx]

    def backward(self, grad):
        if self.embeddings.grad is not None:
            # unbuffered scatter-add: repeated indices accumulate, in index order on both paths
            out, idx, rows = self.embeddings.grad, self.idx.reshape(-1), grad.reshape(-1, self.output_dim)
            compiled = kernels.compiled("embedding")
            if compiled is not None and rows.dtype == out.dtype:
                compiled.scatter_add_rows(out, idx.astype(np.intp, copy=False), rows)
            else:
                np.add.at(out, idx, rows)
        return None  # integer input: no gradient flows further

    def compute_mask(self, x, mask):
        return np.asarray(x) != 0 if self.mask_zero else None

    def to_onnx(self, g, x, in_shape, mask):
        idx, _ = g.indices(x)
        y = g.op("Gather", [g.weight(self, self.embeddings.value, "embeddings"), idx], self.name, axis=0)
        return g.value(y, x.rank + 1)

    def onnx_mask(self, g, x, mask):
        if not self.mask_zero:
            return None
        idx, dtype = g.indices(x)
        return g.op("Not", [g.op("Equal", [idx, g.scalar(0, dtype)])], f"{self.name}_mask")


@register("Masking")
class Masking(Layer):
    """Steps whose features all equal `mask_value` are masked for later layers and zeroed (as Keras)."""

    supports_masking = True

    def __init__(self, mask_value: float = 0.0, **kw):
        super().__init__(**kw)
        self.mask_value = float(mask_value)

    def _keep(self, x):
        return np.any(x != self.mask_value, axis=-1)

    def forward(self, x, training=False):
        self.keep = self._keep(x)[..., None].astype(x.dtype)
        return x * self.keep

    def backward(self, grad):
        return grad * self.keep

    def compute_mask(self, x, mask):
        return self._keep(np.asarray(x))

    def _onnx_keep(self, g, x, keepdims):
        """_keep in the ONNX graph: 1.0 where any feature differs from mask_value (ReduceMax of Not(Equal))."""
        differs = g.cast(g.op("Not", [g.op("Equal", [x.name, g.scalar(self.mask_value)])]), "float32")
        return g.reduce("ReduceMax", differs, [-1], keepdims=keepdims)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        return g.value(g.op("Mul", [x.name, self._onnx_keep(g, x, keepdims=1)], self.name), x.rank)

    def onnx_mask(self, g, x, mask):
        return g.cast(self._onnx_keep(g, g.last(x), keepdims=0), "bool", f"{self.name}_mask")


@register("ReversibleEmbedding")
class ReversibleEmbedding(Embedding):
    """Keras 3's ReversibleEmbedding: an Embedding that, called with reverse=True, projects hidden states
    (batch, ..., output_dim) back to logits (batch, ..., input_dim) with the transposed `embeddings` (tie_weights)
    or its own `reverse_embeddings` (output_dim, input_dim), then `logit_soft_cap * tanh(logits / logit_soft_cap)`.
    As in Keras, one layer is usually called twice: a YAML entry that `shares` it may set `reverse: true`."""

    call_arguments = {"reverse": False}

    @staticmethod
    def keras_call(args, kwargs):
        """Keras' call(inputs, reverse=False): `reverse` is each call's own (a shared entry's key on import)."""
        reverse = kwargs.pop("reverse", False)
        tensors = [*args, kwargs.pop("inputs")] if "inputs" in kwargs else args
        return tensors, {"reverse": True} if reverse else {}

    def __init__(self, input_dim: Size, output_dim: Size, tie_weights: bool = True, embeddings_initializer="uniform",
                 embeddings_regularizer=None, mask_zero: bool = False, reverse_dtype: str | None = None,
                 logit_soft_cap: float | None = None, reverse: bool = False, **kw):
        super().__init__(input_dim, output_dim, embeddings_initializer, embeddings_regularizer, mask_zero, **kw)
        if reverse_dtype not in (None, "float32"):
            raise DlcliError(f"ReversibleEmbedding '{self.name}': reverse_dtype {reverse_dtype!r}; dlcli computes "
                             f"in float32 (leave it unset)")
        if logit_soft_cap is not None and not float(logit_soft_cap) > 0:
            raise DlcliError(f"ReversibleEmbedding '{self.name}': logit_soft_cap must be positive; got "
                             f"{logit_soft_cap}")
        self.tie_weights, self.reverse = bool(tie_weights), bool(reverse)
        self.logit_soft_cap = None if logit_soft_cap is None else float(logit_soft_cap)

    def ensure_built(self, input_shape, rng=None):
        """The weights depend on input_dim and output_dim alone: one layer reads token ids and, reversed, hidden
        states (output_shape checks their features)."""
        if not self.built:
            super().ensure_built(input_shape, rng)

    def build(self, input_shape):
        super().build(input_shape)
        if not self.tie_weights:  # Keras draws it with the embeddings' initializer, after them
            self.reverse_embeddings = self.add_weight("reverse_embeddings", (self.output_dim, self.input_dim),
                                                      self.embeddings_initializer)

    def _kernel(self):
        return self.embeddings.value.T if self.tie_weights else self.reverse_embeddings.value

    def output_shape(self, input_shape):
        if not self.reverse:
            return super().output_shape(input_shape)
        if input_shape[-1] != self.output_dim:
            raise ShapeError(f"ReversibleEmbedding '{self.name}' called with reverse=True projects {self.output_dim} "
                             f"features back to {self.input_dim} logits; got input shape {format_shape(input_shape)}")
        return (*input_shape[:-1], self.input_dim)

    def flops(self, input_shape):
        return 2 * int(np.prod(input_shape[:-1])) * self.output_dim * self.input_dim if self.reverse else 0

    def forward(self, x, training=False):
        if not self.reverse:
            return super().forward(x, training)
        self.x = x
        logits = x @ self._kernel()
        if self.logit_soft_cap is None:
            return logits
        self.capped = np.tanh(logits / np.float32(self.logit_soft_cap))
        return self.capped * np.float32(self.logit_soft_cap)

    def backward(self, grad):
        if not self.reverse:
            return super().backward(grad)
        if self.logit_soft_cap is not None:
            grad = grad * (1 - self.capped * self.capped)
        flat_x, flat_g = self.x.reshape(-1, self.output_dim), grad.reshape(-1, self.input_dim)
        kernel = self.embeddings if self.tie_weights else self.reverse_embeddings
        if kernel.grad is not None:
            kernel.grad += flat_g.T @ flat_x if self.tie_weights else flat_x.T @ flat_g
        return grad @ self._kernel().T

    def compute_mask(self, x, mask):
        return None if self.reverse else super().compute_mask(x, mask)

    def to_onnx(self, g, x, in_shape, mask):
        if not self.reverse:
            return super().to_onnx(g, x, in_shape, mask)
        x = g.last(x)
        if self.tie_weights:  # the one embeddings initializer, transposed in the graph: the weights stay tied
            kernel = g.op("Transpose", [g.weight(self, self.embeddings.value, "embeddings")], f"{self.name}_kernel",
                          perm=[1, 0])
        else:
            kernel = g.weight(self, self.reverse_embeddings.value, "reverse_embeddings")
        y = g.op("MatMul", [x.name, kernel], f"{self.name}_logits")
        if self.logit_soft_cap is not None:
            cap = g.scalar(self.logit_soft_cap)
            y = g.op("Mul", [g.op("Tanh", [g.op("Div", [y, cap])]), cap], self.name)
        return g.value(y, x.rank)

    def onnx_mask(self, g, x, mask):
        return None if self.reverse else super().onnx_mask(g, x, mask)
