"""Categorical preprocessing layers as Keras 3 has them (keras/src/layers/preprocessing/): Discretization,
IntegerLookup, StringLookup, CategoryEncoding, Hashing, HashedCrossing; and the math they share with the table
data type (dlcli.data.features, Keras' FeatureSpace), which calls the same functions: one home for each rule.

dlcli's tensors are float32, so every output is float32 (Keras' "int" mode gives int64 indices: the same values),
and integer inputs arrive as whole-number floats. Strings cannot be a float32 tensor: StringLookup, and Hashing or
HashedCrossing on text, sit at the data edge, reading a model input of dtype string (`input_dtype: string`, or a
Keras file's string Input) directly; in-process `predict` takes NumPy string arrays there, and `dlcli export` maps
StringLookup to ai.onnx.ml's LabelEncoder on a string input. The table data type is the CLI's way to feed text
columns (its string_categorical features run the same lookup).

Not supported, and refused by name: sparse outputs (dlcli is dense), salted hashing (Keras' SipHash
to_hash_bucket_strong), StringLookup's invert (it outputs strings). No gradient flows through an index: backward
gives zeros for a float input (the outputs are piecewise constant) and None for text.
"""
import numpy as np

from dlcli.engine.layer import Layer, register
from dlcli.errors import ConfigError, DlcliError, ExportError, ShapeError

ENCODINGS = ("int", "one_hot", "multi_hot", "count")
LOOKUP_MODES = (*ENCODINGS, "tf_idf")
DISCRETIZATION_EPSILON = 0.01  # Discretization's default epsilon


# --- the math, shared with dlcli.data.features ---------------------------------------------------------------------
def summarize(values: np.ndarray, epsilon: float) -> np.ndarray:
    """Keras' Discretization summary of one batch: every step-th sorted value with weight step (2, k)."""
    values = np.sort(np.asarray(values, np.float32).reshape(-1))
    step = max(values.size / (1.0 / epsilon), 1)
    boundaries = values[int(step - 1)::int(step)]
    return np.stack([boundaries, np.ones_like(boundaries) * step])


def merge_summaries(summary: np.ndarray, previous: np.ndarray, epsilon: float) -> np.ndarray:
    """Keras' weighted merge of a new batch's summary with the running one, compressed to `epsilon`: adapting
    chunk by chunk gives what Keras' adapt gives on the same batches."""
    merged = np.concatenate((summary, previous), axis=1)
    return compress_summary(np.take(merged, np.argsort(merged[0]), axis=1), epsilon)


def compress_summary(summary: np.ndarray, epsilon: float) -> np.ndarray:
    if summary.shape[1] * epsilon < 1:
        return summary
    percents = epsilon + np.arange(0.0, 1.0, epsilon)
    cum = summary[1].cumsum()
    bins = np.interp(percents, cum / cum[-1], summary[0])
    cum = np.interp(percents, cum / cum[-1], cum)
    return np.stack((bins, cum - np.concatenate(([0], cum[:-1])))).astype("float32")


def empty_summary() -> np.ndarray:
    return np.array([[], []], dtype="float32")


def bin_boundaries(summary: np.ndarray, num_bins: int) -> np.ndarray:
    """Keras' get_bin_boundaries: the summary compressed to 1/num_bins, without its last value."""
    return compress_summary(summary, 1.0 / num_bins)[0, :-1]


def quantile_boundaries(chunks, num_bins: int, epsilon: float = DISCRETIZATION_EPSILON) -> list[float]:
    """Discretization.adapt over an iterable of batches (one array is one batch, as Keras takes it)."""
    summary = empty_summary()
    for chunk in ([chunks] if isinstance(chunks, np.ndarray) else chunks):
        summary = merge_summaries(summarize(chunk, epsilon), summary, epsilon)
    if summary.shape[1] == 0:
        raise ValueError("no values to adapt the bin boundaries to")
    return [float(b) for b in bin_boundaries(summary, num_bins)]


def digitize(x: np.ndarray, boundaries) -> np.ndarray:
    """Bin index of each value: boundaries[i-1] <= x < boundaries[i] (np.digitize, TF's Bucketize), in float32."""
    return np.digitize(np.asarray(x, np.float32), np.asarray(boundaries, np.float32))


def encode(indices: np.ndarray, output_mode: str, depth: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Keras' encode_categorical_inputs on (batch, *shape) integer indices, as float32. one_hot drops a last axis
    of 1 and adds one of `depth`; multi_hot and count reduce axis 1 (the values of a sample). An index outside
    [0, depth) sets no column (a lookup's mask token). `weights` (depth,) scale the counts (tf_idf)."""
    if output_mode == "int":
        return indices.astype(np.float32)
    if output_mode == "one_hot" and indices.ndim > 1 and indices.shape[-1] == 1:
        indices = indices.reshape(indices.shape[:-1])
    hot = indices[..., None] == np.arange(depth)
    if output_mode == "one_hot":
        return hot.astype(np.float32)
    out = hot.any(axis=1) if output_mode == "multi_hot" else hot.sum(axis=1)
    out = out.astype(np.float32)
    return out if weights is None else out * np.asarray(weights, np.float32)


def encoded_shape(input_shape: tuple, output_mode: str, depth: int, layer: Layer) -> tuple:
    """encode's per-sample output shape (no batch axis), refusing what Keras' reductions do not define."""
    shape = tuple(input_shape)
    if output_mode == "int":
        return shape
    if output_mode == "one_hot":
        return (*(shape[:-1] if shape and shape[-1] == 1 else shape), depth)
    if len(shape) != 1:
        raise ShapeError(f"{type(layer).__name__} '{layer.name}': output_mode {output_mode} takes one axis of values "
                         f"per sample, (batch, n); got (None, {', '.join(map(str, shape))})")
    return (depth,)


def by_count(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The adapted vocabulary order of Keras' lookups: by count, ties by value, both descending."""
    return values[np.lexsort((values, counts))[::-1]]


def oov_of(values: np.ndarray, num_oov: int, strings: bool, farmhash: bool = False) -> np.ndarray:
    """Which of `num_oov` out-of-vocabulary indices a value takes: Fingerprint64 % num_oov for text (an integer as
    its decimal text with oov_method farmhash), value % num_oov (Keras' default "floormod") for integers."""
    if num_oov == 1:
        return np.zeros(values.shape, np.int64)
    if strings or farmhash:
        return hash_to_bins(values.astype(np.int64).astype(str) if not strings else values, num_oov)
    return np.mod(values.astype(np.int64), num_oov)


def lookup_indices(values: np.ndarray, vocabulary, num_oov: int, strings: bool, mask_token=None,
                   unknown: np.ndarray | None = None, farmhash: bool = False) -> np.ndarray:
    """StringLookup / IntegerLookup ("int" mode): the mask token -> 0 (when there is one), then num_oov
    out-of-vocabulary indices, then the vocabulary in order. `unknown` marks values forced out of vocabulary
    (the table's missing cells)."""
    values = np.asarray(values)
    values = values.astype(str) if strings else values.astype(np.int64)
    start = (mask_token is not None) + num_oov
    vocab = np.asarray(list(vocabulary), dtype=str if strings else np.int64)
    order = np.argsort(vocab, kind="stable")
    if len(vocab):
        position = np.minimum(np.searchsorted(vocab[order], values), len(vocab) - 1)
        found = vocab[order][position] == values
    else:
        position, found = np.zeros(values.shape, np.int64), np.zeros(values.shape, bool)
    if unknown is not None:
        found &= ~unknown
    index = np.where(found, order[position] + start, 0)
    unseen = ~found
    if unseen.any():
        index[unseen] = oov_of(values[unseen], num_oov, strings, farmhash) + (mask_token is not None)
    if mask_token is not None:
        index[values == (str(mask_token) if strings else int(mask_token))] = 0
    return index


def hash_to_bins(values: np.ndarray, num_bins: int, mask_value=None) -> np.ndarray:
    """Keras' Hashing: Fingerprint64 of the text (a number as its int64 decimal text, as tf.as_string writes it)
    % num_bins, hashed once per distinct value; with mask_value that value -> 0, the others into 1..num_bins-1."""
    from dlcli.data.farmhash import fingerprint64  # imported here: dlcli.data's tables import this module

    values = np.asarray(values)
    text = values.astype(str) if values.dtype.kind in "USO" else values.astype(np.int64).astype(str)
    bins = num_bins - 1 if mask_value is not None and num_bins > 1 else num_bins
    distinct, inverse = np.unique(text.reshape(-1), return_inverse=True)
    hashed = np.array([fingerprint64(v) % bins for v in distinct.tolist()], np.int64)[inverse.reshape(-1)]
    hashed = hashed.reshape(values.shape)
    if bins != num_bins:
        masked = text == str(mask_value) if values.dtype.kind in "USO" else values == mask_value
        hashed = np.where(masked, 0, hashed + 1)
    return hashed


def hashed_cross(columns: list[np.ndarray], num_bins: int) -> np.ndarray:
    """Keras' HashedCrossing (tf.sparse.cross_hashed): FingerprintCat64 folded from its default key over each
    row's values (text as its Fingerprint64, an integer as itself), % num_bins; once per distinct combination."""
    from dlcli.data.farmhash import CROSS_HASH_KEY, fingerprint64, fingerprint_cat64

    hashes = []
    for col in columns:
        col = np.asarray(col).reshape(-1)
        if col.dtype.kind in "USO":
            distinct, inverse = np.unique(col.astype(str), return_inverse=True)
            fingerprints = np.array([fingerprint64(v) for v in distinct.tolist()], np.uint64)
            hashes.append(fingerprints[inverse.reshape(-1)])
        else:
            hashes.append(col.astype(np.int64).view(np.uint64))  # two's complement, as TF's uint64 cast
    distinct, inverse = np.unique(np.stack(hashes, axis=1), axis=0, return_inverse=True)
    out = []
    for combo in distinct.tolist():
        h = CROSS_HASH_KEY
        for v in combo:
            h = fingerprint_cat64(h, v)
        out.append(h % num_bins)
    return np.asarray(out, np.int64)[inverse.reshape(-1)]


def one_hot(index: np.ndarray, depth: int) -> np.ndarray:
    """CategoryEncoding(num_tokens=depth, output_mode="one_hot") of one integer per row: (N,) -> (N, depth)."""
    return encode(np.asarray(index).reshape(-1), "one_hot", depth)


# --- the layers ------------------------------------------------------------------------------------------------------
def _check_mode(layer: str, output_mode: str, allowed, sparse: bool):
    if output_mode not in allowed:
        raise ConfigError(f"{layer}: output_mode must be one of {', '.join(allowed)}; got {output_mode!r}")
    if sparse:
        raise ConfigError(f"{layer}: sparse=True is not supported (dlcli's tensors are dense); the dense output "
                          f"holds the same values")


def _as_numbers(layer: Layer, x: np.ndarray) -> np.ndarray:
    if np.asarray(x).dtype.kind in "USO":
        raise DlcliError(f"{type(layer).__name__} '{layer.name}' takes numbers; it was given text")
    return x


def _whole(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Integer inputs arrive as whole-number floats (dlcli's tensors are float32)."""
    x = np.asarray(_as_numbers(layer, x))
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or np.any(x != np.round(x)):
            raise DlcliError(f"{type(layer).__name__} '{layer.name}' takes integers; its input holds "
                             f"{x[~np.isfinite(x) | (x != np.round(x))].reshape(-1)[0]!r}")
    return x.astype(np.int64)


class _Categorical(Layer):
    """No gradient flows through an index: zeros for numbers (piecewise constant), None for text."""

    def forward(self, x, training=False):
        self.input_like = x
        return self.encode(x)

    def backward(self, grad):
        xs = self.input_like if isinstance(self.input_like, list) else [self.input_like]
        grads = [np.zeros(np.shape(x), grad.dtype) if np.asarray(x).dtype.kind in "fiub" else None for x in xs]
        return grads if isinstance(self.input_like, list) else grads[0]


@register("Discretization")
class Discretization(_Categorical):
    """Bin index of each value (boundaries[i-1] <= x < boundaries[i]), encoded by output_mode. bin_boundaries
    given, or num_bins learned by `adapt(data)`: Keras' approximate quantiles (a summary of epsilon), chunk by
    chunk. A Keras file's adapted layer carries both; the boundaries win, as in Keras' from_config."""

    def __init__(self, bin_boundaries=None, num_bins: int | None = None, epsilon: float = 0.01,
                 output_mode: str = "int", sparse: bool = False, **kw):
        super().__init__(**kw)
        _check_mode("Discretization", output_mode, ENCODINGS, sparse)
        if bin_boundaries is None and num_bins is None:
            raise ConfigError("Discretization: give bin_boundaries or num_bins (then adapt it), as in Keras")
        if bin_boundaries is not None:
            edges = [float(b) for b in bin_boundaries]
            if any(b < a for a, b in zip(edges, edges[1:])):
                raise ConfigError(f"Discretization: bin_boundaries must be sorted; got {edges}")
            bin_boundaries = edges
        if num_bins is not None and (not isinstance(num_bins, int) or num_bins < 1):
            raise ConfigError(f"Discretization: num_bins must be a positive integer; got {num_bins!r}")
        self.bin_boundaries, self.num_bins, self.epsilon = bin_boundaries, num_bins, float(epsilon)
        self.output_mode = output_mode

    @property
    def depth(self) -> int:
        return len(self.bin_boundaries) + 1 if self.bin_boundaries is not None else self.num_bins

    def output_shape(self, input_shape):
        return encoded_shape(input_shape, self.output_mode, self.depth, self)

    def adapt(self, data, batch_size: int = 4096):
        """Boundaries from `data` (an array, taken in chunks of batch_size, or an iterable of batches)."""
        if self.num_bins is None:
            raise ConfigError(f"Discretization '{self.name}' was given bin_boundaries; adapt needs num_bins")
        chunks = (data[s:s + batch_size] for s in range(0, len(data), batch_size)) if hasattr(data, "shape") \
            else data
        self.bin_boundaries = quantile_boundaries(chunks, self.num_bins, self.epsilon)
        self._config["bin_boundaries"] = self.bin_boundaries  # get_config gives what was learned, as Keras'

    def encode(self, x):
        if self.bin_boundaries is None:
            raise DlcliError(f"Discretization '{self.name}' has no bin_boundaries: give them or adapt it first")
        return encode(digitize(_as_numbers(self, x), self.bin_boundaries), self.output_mode, self.depth)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        edges = g.weight(self, np.asarray(self.bin_boundaries, np.float32), "boundaries")
        above = g.op("GreaterOrEqual", [g.unsqueeze(x.name, [-1]), edges])
        index = g.reduce("ReduceSum", g.cast(above, "int64"), [-1], keepdims=0)
        return onnx_encode(g, index, in_shape, self.output_mode, self.depth, self.name)


def onnx_encode(g, index: str, in_shape, output_mode: str, depth: int, hint: str, weights=None):
    """encode() in ONNX nodes on int64 indices of per-sample shape `in_shape`."""
    rank = len(in_shape) + 1
    if output_mode == "int":
        return g.value(g.cast(index, "float32", hint), rank)
    if output_mode == "one_hot" and in_shape and in_shape[-1] == 1:
        index, rank = g.squeeze(index, [-1]), rank - 1
    values = g.const(np.array([0.0, 1.0], np.float32), "one_hot_values", key=("one_hot_values",))
    hot = g.op("OneHot", [index, g.ints([depth], "depth"), values], axis=-1)
    if output_mode == "one_hot":
        return g.value(hot, rank + 1)
    out = g.reduce("ReduceMax" if output_mode == "multi_hot" else "ReduceSum", hot, [1], keepdims=0)
    if weights is not None:
        out = g.op("Mul", [out, g.const(np.asarray(weights, np.float32), f"{hint}_idf")])
    return g.value(out, rank)


class _Lookup(_Categorical):
    """IndexLookup: the mask token (if any) -> 0, num_oov_indices out-of-vocabulary indices, then the vocabulary.
    `vocabulary` given (a leading run of the special tokens is dropped, as Keras' set_vocabulary does), read from
    a Keras file's assets, or learned by `adapt(data)` (by count, ties by value, both descending; max_tokens
    counts the special indices)."""

    strings = False

    def __init__(self, max_tokens=None, num_oov_indices: int = 1, mask_token=None, oov_token=None, vocabulary=None,
                 idf_weights=None, invert: bool = False, output_mode: str = "int", pad_to_max_tokens: bool = False,
                 sparse: bool = False, salt=None, vocabulary_size: int | None = None, **kw):
        super().__init__(**kw)
        kind = type(self).__name__
        _check_mode(kind, output_mode, LOOKUP_MODES, sparse)
        if salt is not None:
            raise ConfigError(f"{kind}: salt (Keras' SipHash to_hash_bucket_strong) is not supported; dlcli hashes "
                              f"out-of-vocabulary values with FarmHash, Keras' default")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 1):
            raise ConfigError(f"{kind}: max_tokens must be an integer above 1 or None; got {max_tokens!r}")
        if not isinstance(num_oov_indices, int) or num_oov_indices < 0:
            raise ConfigError(f"{kind}: num_oov_indices must be an integer >= 0; got {num_oov_indices!r}")
        if invert and output_mode != "int":
            raise ConfigError(f"{kind}: invert works with output_mode int only (as in Keras)")
        if (idf_weights is not None and output_mode != "tf_idf") or \
                (output_mode == "tf_idf" and vocabulary is not None and idf_weights is None):
            raise ConfigError(f"{kind}: idf_weights go with output_mode tf_idf and a given vocabulary (as in Keras)")
        if pad_to_max_tokens and max_tokens is None:
            raise ConfigError(f"{kind}: pad_to_max_tokens needs max_tokens")
        self.max_tokens, self.num_oov_indices, self.mask_token = max_tokens, num_oov_indices, mask_token
        self.oov_token, self.invert, self.output_mode = oov_token, bool(invert), output_mode
        self.pad_to_max_tokens = bool(pad_to_max_tokens)
        self.vocabulary = self.idf_weights = None
        if vocabulary is not None:
            self.set_vocabulary(vocabulary, idf_weights)

    @property
    def mask_slot(self) -> bool:
        """Keras gives the mask token index 0 in "int" mode only; in the other modes it sets no column."""
        return self.mask_token is not None and self.output_mode == "int"

    @property
    def token_start(self) -> int:
        return self.mask_slot + self.num_oov_indices

    def set_vocabulary(self, vocabulary, idf_weights=None):
        """Keras' set_vocabulary: the special tokens may lead the list (they are dropped); no repeats, no mask
        token elsewhere; tf_idf's weights padded in front with their mean where the specials were not given."""
        kind = type(self).__name__
        vocabulary = [str(v) for v in vocabulary] if self.strings else [int(v) for v in vocabulary]
        specials = [self.mask_token] * self.mask_slot + [self.oov_token] * self.num_oov_indices
        found = vocabulary[:len(specials)] == [(str(s) if self.strings else s) for s in specials] and specials
        tokens = vocabulary[len(specials):] if found else vocabulary
        if not tokens:
            raise ConfigError(f"{kind} '{self.name}': an empty vocabulary")
        if len(set(tokens)) != len(tokens):
            repeated = sorted({t for t in tokens if tokens.count(t) > 1})
            raise ConfigError(f"{kind} '{self.name}': the vocabulary repeats {repeated[:5]}")
        if self.mask_token is not None and self.mask_token in tokens:
            raise ConfigError(f"{kind} '{self.name}': the mask token {self.mask_token!r} is inside the vocabulary")
        if self.max_tokens is not None and self.token_start + len(tokens) > self.max_tokens:
            raise ConfigError(f"{kind} '{self.name}': {self.token_start + len(tokens)} indices with the special ones; "
                              f"max_tokens is {self.max_tokens}")
        self.vocabulary = tokens
        if self.output_mode == "tf_idf":
            weights = np.asarray(idf_weights, np.float32).reshape(-1)
            if len(weights) != len(vocabulary):
                raise ConfigError(f"{kind} '{self.name}': {len(weights)} idf_weights for {len(vocabulary)} "
                                  f"vocabulary entries")
            front = 0 if found else self.token_start
            back = self.max_tokens - front - len(weights) if self.pad_to_max_tokens else 0
            self.idf_weights = np.pad(weights, (front, back), constant_values=(weights.mean() if front else 0, 0))
        self._config.update({"vocabulary": to_list(tokens)})

    def adapt(self, data, batch_size: int = 4096):
        """The vocabulary of `data` (an array in chunks, or an iterable of batches), counted as Keras does;
        tf_idf also learns Keras' idf weights, log(1 + documents / (1 + documents holding the token))."""
        counts, documents, n = {}, {}, 0
        chunks = (data[s:s + batch_size] for s in range(0, len(data), batch_size)) if hasattr(data, "shape") \
            else data
        for chunk in chunks:
            chunk = np.asarray(chunk)
            chunk = chunk.astype(str) if self.strings else _whole(self, chunk)
            values, c = np.unique(chunk, return_counts=True)
            for v, k in zip(values.tolist(), c.tolist()):
                counts[v] = counts.get(v, 0) + k
            if self.output_mode == "tf_idf":
                rows = chunk.reshape(len(chunk), -1)
                for row in rows:
                    for v in set(row.tolist()):
                        documents[v] = documents.get(v, 0) + 1
                n += len(rows)
        for special in (self.mask_token, self.oov_token):
            counts.pop(str(special) if self.strings and special is not None else special, None)
        values = np.asarray(list(counts), dtype=str if self.strings else np.int64)
        tokens = by_count(values, np.asarray(list(counts.values()), np.int64))
        if self.max_tokens:
            tokens = tokens[:self.max_tokens - self.token_start]
        tokens = tokens.tolist()
        idf = None
        if self.output_mode == "tf_idf":
            idf = np.log(1 + n / (1 + np.asarray([documents[t] for t in tokens], np.float64))).astype(np.float32)
        self.set_vocabulary(tokens, idf)
        if idf is not None:
            self._config["idf_weights"] = to_list(idf)

    @property
    def depth(self) -> int:
        if self.pad_to_max_tokens:
            return self.max_tokens
        if self.vocabulary is None:
            raise ConfigError(f"{type(self).__name__} '{self.name}' has no vocabulary: give one or adapt it first")
        return self.token_start + len(self.vocabulary)

    def output_shape(self, input_shape):
        return tuple(input_shape) if self.output_mode == "int" else \
            encoded_shape(input_shape, "count" if self.output_mode == "tf_idf" else self.output_mode, self.depth, self)

    def indices(self, x) -> np.ndarray:
        if self.vocabulary is None:
            raise DlcliError(f"{type(self).__name__} '{self.name}' has no vocabulary: give one or adapt it first")
        if not self.strings:
            x = _whole(self, x)
        index = lookup_indices(x, self.vocabulary, self.num_oov_indices, self.strings,
                               self.mask_token if self.mask_slot else None,
                               farmhash=getattr(self, "oov_method", "floormod") == "farmhash")
        if self.mask_token is not None and not self.mask_slot:
            index[np.asarray(x).astype(str if self.strings else np.int64) == self.mask_token] = -1
        return index

    def encode(self, x):
        if self.invert:
            return self.inverted(x)
        index = self.indices(x)
        mode = "count" if self.output_mode == "tf_idf" else self.output_mode
        return encode(index, mode, self.depth, self.idf_weights)


@register("IntegerLookup")
class IntegerLookup(_Lookup):
    """Integer values -> indices (Keras' IntegerLookup; integers arrive as whole-number floats). invert maps
    indices back to values (OOV indices -> oov_token, the mask index -> mask_token)."""

    def __init__(self, max_tokens=None, num_oov_indices: int = 1, mask_token=None, oov_token: int = -1,
                 vocabulary=None, vocabulary_dtype: str = "int64", idf_weights=None, invert: bool = False,
                 output_mode: str = "int", sparse: bool = False, pad_to_max_tokens: bool = False,
                 oov_method: str = "floormod", salt=None, vocabulary_size: int | None = None, **kw):
        if vocabulary_dtype != "int64":
            raise ConfigError(f"IntegerLookup: vocabulary_dtype must be int64, as in Keras; got {vocabulary_dtype!r}")
        if oov_method not in ("floormod", "farmhash"):
            raise ConfigError(f"IntegerLookup: oov_method must be floormod or farmhash; got {oov_method!r}")
        self.oov_method = oov_method
        super().__init__(max_tokens, num_oov_indices, mask_token, oov_token, vocabulary, idf_weights, invert,
                         output_mode, pad_to_max_tokens, sparse, salt, vocabulary_size, **kw)

    def inverted(self, x):
        index = _whole(self, x)
        table = np.asarray([self.mask_token] * self.mask_slot
                           + [self.oov_token] * self.num_oov_indices + list(self.vocabulary), np.int64)
        inside = (index >= 0) & (index < len(table))
        return np.where(inside, table[np.clip(index, 0, len(table) - 1)], self.oov_token).astype(np.float32)

    def to_onnx(self, g, x, in_shape, mask):
        return _lookup_onnx(self, g, x, in_shape, [float(v) for v in self.vocabulary], "keys_floats")


@register("StringLookup")
class StringLookup(_Lookup):
    """Text values -> indices (Keras' StringLookup), at the data edge: it reads a string model input directly
    (input_dtype: string); the table data type's string_categorical features use the same lookup."""

    strings = True

    def __init__(self, max_tokens=None, num_oov_indices: int = 1, mask_token=None, oov_token: str = "[UNK]",
                 vocabulary=None, idf_weights=None, invert: bool = False, output_mode: str = "int",
                 pad_to_max_tokens: bool = False, sparse: bool = False, encoding: str = "utf-8", salt=None,
                 vocabulary_size: int | None = None, **kw):
        if invert:
            raise ConfigError("StringLookup: invert outputs text, which a float32 tensor cannot hold; map the "
                              "indices to names after predict (a table run's classes do that for labels)")
        if str(encoding).lower().replace("-", "") != "utf8":
            raise ConfigError(f"StringLookup: encoding must be utf-8 (dlcli's text is Unicode); got {encoding!r}")
        super().__init__(max_tokens, num_oov_indices, mask_token, oov_token, vocabulary, idf_weights, invert,
                         output_mode, pad_to_max_tokens, sparse, salt, vocabulary_size, **kw)

    def backward(self, grad):
        return None  # text: no gradient

    def to_onnx(self, g, x, in_shape, mask):
        return _lookup_onnx(self, g, x, in_shape, [str(v) for v in self.vocabulary], "keys_strings")


def _lookup_onnx(layer: _Lookup, g, x, in_shape, keys: list, keys_attr: str):
    """ai.onnx.ml's LabelEncoder: each key -> its index, anything else -> the one OOV index."""
    if layer.num_oov_indices != 1 or layer.mask_token is not None or layer.invert:
        raise ExportError(f"{type(layer).__name__} '{layer.name}' exports with one OOV index, no mask token and no "
                          f"invert only (several OOV indices are hashed: ONNX has no FarmHash operator)")
    name = x.name
    if keys_attr == "keys_floats" and x.dtype != "float32":  # integer inputs: LabelEncoder matches float keys
        name = g.cast(name, "float32")
    index = g.op("LabelEncoder", [name], f"{layer.name}_index", domain="ai.onnx.ml", **{keys_attr: keys},
                 values_int64s=list(range(layer.token_start, layer.token_start + len(keys))),
                 default_int64=0)
    mode = "count" if layer.output_mode == "tf_idf" else layer.output_mode
    return onnx_encode(g, index, in_shape, mode, layer.depth, layer.name, layer.idf_weights)


@register("CategoryEncoding")
class CategoryEncoding(_Categorical):
    """Integer indices in [0, num_tokens) -> one_hot, multi_hot or count vectors (Keras' CategoryEncoding)."""

    def __init__(self, num_tokens: int, output_mode: str = "multi_hot", sparse: bool = False, **kw):
        super().__init__(**kw)
        output_mode = "multi_hot" if output_mode == "binary" else output_mode  # Keras' old name
        _check_mode("CategoryEncoding", output_mode, ENCODINGS[1:], sparse)
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ConfigError(f"CategoryEncoding: num_tokens must be a positive integer; got {num_tokens!r}")
        self.num_tokens, self.output_mode = num_tokens, output_mode

    def output_shape(self, input_shape):
        return encoded_shape(input_shape, self.output_mode, self.num_tokens, self)

    def encode(self, x):
        index = _whole(self, x)
        bad = (index < 0) | (index >= self.num_tokens)
        if bad.any():
            raise DlcliError(f"CategoryEncoding '{self.name}': value {int(index[bad].reshape(-1)[0])} is outside "
                             f"[0, {self.num_tokens}) (num_tokens)")
        return encode(index, self.output_mode, self.num_tokens)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        return onnx_encode(g, g.cast(x.name, "int64"), in_shape, self.output_mode, self.num_tokens, self.name)


@register("Hashing")
class Hashing(_Categorical):
    """Keras' Hashing without salt: FarmHash Fingerprint64 of each value's text (an integer as its decimal text;
    a float is truncated to an integer first, as Keras casts it) % num_bins; mask_value -> 0."""

    def __init__(self, num_bins: int, mask_value=None, salt=None, output_mode: str = "int", sparse: bool = False,
                 **kw):
        super().__init__(**kw)
        _check_mode("Hashing", output_mode, ENCODINGS, sparse)
        if salt is not None:
            raise ConfigError("Hashing: salt (Keras' SipHash to_hash_bucket_strong) is not supported; without it "
                              "dlcli matches Keras' FarmHash bins exactly")
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ConfigError(f"Hashing: num_bins must be a positive integer; got {num_bins!r}")
        self.num_bins, self.mask_value, self.output_mode = num_bins, mask_value, output_mode

    def output_shape(self, input_shape):
        shape = tuple(input_shape)
        if self.output_mode == "one_hot":  # Keras' Hashing squeezes a last axis of 1, then one-hots
            return (*(shape[:-1] if shape and shape[-1] == 1 else shape), self.num_bins)
        return encoded_shape(shape, self.output_mode, self.num_bins, self)

    def encode(self, x):
        x = np.asarray(x)
        if x.dtype.kind == "f":
            x = np.trunc(x).astype(np.int64)
        return encode(hash_to_bins(x, self.num_bins, self.mask_value), self.output_mode, self.num_bins)

    def to_onnx(self, g, x, in_shape, mask):
        raise ExportError(f"Hashing '{self.name}': ONNX has no FarmHash operator")


@register("HashedCrossing")
class HashedCrossing(_Categorical):
    """Keras' HashedCrossing: two or more inputs of one value per sample (shape () or (1,)), integers or text,
    crossed by tf.sparse.cross_hashed's FingerprintCat64 % num_bins; output int (the input's shape) or one_hot."""

    def __init__(self, num_bins: int, output_mode: str = "int", sparse: bool = False, **kw):
        super().__init__(**kw)
        _check_mode("HashedCrossing", output_mode, ("int", "one_hot"), sparse)
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ConfigError(f"HashedCrossing: num_bins must be a positive integer; got {num_bins!r}")
        self.num_bins, self.output_mode = num_bins, output_mode

    def output_shape(self, input_shape):
        shapes = [tuple(s) for s in input_shape] if isinstance(input_shape, list) else None
        if not shapes or len(shapes) < 2 or len(set(shapes)) != 1 or shapes[0] not in ((), (1,)):
            raise ShapeError(f"HashedCrossing '{self.name}' crosses two or more inputs of one value per sample, "
                             f"shape () or (1,) each; got {input_shape}")
        return shapes[0] if self.output_mode == "int" else (self.num_bins,)

    def encode(self, xs):
        columns = [np.asarray(x) if np.asarray(x).dtype.kind in "USO" else _whole(self, x) for x in xs]
        index = hashed_cross(columns, self.num_bins).reshape(np.shape(xs[0]))
        return encode(index, self.output_mode, self.num_bins)

    def to_onnx(self, g, x, in_shape, mask):
        raise ExportError(f"HashedCrossing '{self.name}': ONNX has no FarmHash operator")


def to_list(values):
    return [v.item() if hasattr(v, "item") else v for v in values]
