"""Embedding and Masking: where sequence masks start (Keras' arguments and mask semantics)."""
import numpy as np

from dlcli.engine import initializers
from dlcli.engine.layer import Layer, register
from dlcli.errors import DlcliError
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
            # unbuffered scatter-add: repeated indices accumulate (NumPy >= 1.25 makes this a fast loop in C)
            np.add.at(self.embeddings.grad, self.idx.reshape(-1), grad.reshape(-1, self.output_dim))
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
