"""Table columns -> one float32 vector per row, as Keras' FeatureSpace (keras/src/layers/preprocessing/
feature_space.py) builds it, in three plain functions: `feature_specs` (the config's `features:`/`crosses:` checked),
`adapt` (vocabularies, means, bin edges from the training rows -> plain JSON, stored in the run) and `transform`
(JSON state + columns -> (N, width) float32). Training, evaluate, predict and k-fold all call these.

Matched with Keras 3 (names, defaults, numbers):
- feature types and their arguments: float, float_rescaled (scale, offset), float_normalized, float_discretized
  (num_bins=32, FeatureSpace's num_discretization_bins), integer_categorical / string_categorical (max_tokens,
  num_oov_indices=1, output_mode one_hot), integer_hashed / string_hashed (num_bins=32, its hashing_dim), crosses
  ({features, crossing_dim=32}); the concatenation order: features sorted by name, then crosses sorted by name.
- Normalization: (x - mean) / max(sqrt(variance), 1e-7), population variance.
- Discretization: Keras' quantile summary (epsilon 0.01) of the whole column as one batch, bin index = digitize.
- StringLookup / IntegerLookup (mask_token None): index 0 .. num_oov_indices-1 for out-of-vocabulary values, then
  the vocabulary by descending count, ties by descending value (Keras' lexsort(...)[::-1]); max_tokens counts the
  OOV indices. With several OOV indices an unseen string goes to Fingerprint64 % num_oov_indices, an integer to
  value % num_oov_indices (Keras' default oov_method "floormod").
- Hashing: Fingerprint64 of the string (an integer's decimal text, as tf.as_string writes it) % num_bins.
- HashedCrossing: tf.sparse.cross_hashed of the features' preprocessed integer outputs (FingerprintCat64 from key
  0xDECAFCAFFE, integers as their own hash) % crossing_dim. Tested bit-equal with Keras' documented examples.
Where Keras has no rule and we add one (say so in errors and README):
- Missing cells (data.missing). A numeric feature's missing cells become the training mean (before rescaling,
  normalising or binning), plus a 0/1 "was missing" column after it when the training rows had any missing.
  A categorical's missing cell is out-of-vocabulary (not counted when adapting); a hashed one hashes "".
- `text`: TextVectorization's multi_hot / count / tf_idf vector (column 0 out-of-vocabulary) of dlcli's tokenizer
  (lower case, letter/digit words), which is not TextVectorization's standardisation; a missing cell is empty.
- `date`: not a FeatureSpace type. Year (normalised with the training mean and deviation), then sin and cos of
  month, day of week and day of year (cyclic), 7 columns.
- Only concat output and one_hot/float features: Keras' "int" output_mode cannot be concatenated either.
"""
import numpy as np

from dlcli.errors import ConfigError
from dlcli.layers.categorical import DISCRETIZATION_EPSILON, bin_boundaries, by_count, digitize, empty_summary, \
    hash_to_bins, hashed_cross, lookup_indices, merge_summaries, one_hot, summarize
from dlcli.registry import did_you_mean

# type -> {argument: default} (Keras' FeatureSpace class-method arguments; FeatureSpace's own defaults for the bare
# names: num_discretization_bins=32, hashing_dim=32, crossing_dim=32)
FEATURE_TYPES = {
    "float": {},
    "float_rescaled": {"scale": 1.0, "offset": 0.0},
    "float_normalized": {},
    "float_discretized": {"num_bins": 32, "bin_boundaries": None, "output_mode": "one_hot"},
    "integer_categorical": {"max_tokens": None, "num_oov_indices": 1, "output_mode": "one_hot"},
    "string_categorical": {"max_tokens": None, "num_oov_indices": 1, "output_mode": "one_hot"},
    "integer_hashed": {"num_bins": 32, "output_mode": "one_hot"},
    "string_hashed": {"num_bins": 32, "output_mode": "one_hot"},
    "date": {},
    # not a FeatureSpace shortcut: Keras' FeatureSpace.feature(preprocessor=TextVectorization(...)), with its
    # max_tokens (the OOV column included) and vector output modes, through dlcli's tokenizer (dlcli.data.text)
    "text": {"max_tokens": None, "output_mode": "multi_hot"},
}
TEXT_MODES = ("multi_hot", "count", "tf_idf")
NUMERIC = ("float", "float_rescaled", "float_normalized", "float_discretized")
INTEGER = ("integer_categorical", "integer_hashed")
STRING = ("string_categorical", "string_hashed")
CROSSABLE = ("float_discretized", *INTEGER, *STRING)  # preprocessors with integer outputs (Keras' HashedCrossing)
CROSS_DEFAULTS = {"crossing_dim": 32, "output_mode": "one_hot"}
MAX_WIDTH = 2**20  # the most columns one feature may produce (num_bins, max_tokens, crossing_dim)
EPSILON = 1e-7  # keras.backend.epsilon(), Normalization's floor on the deviation


def feature_specs(features: dict, crosses: list | None = None) -> tuple[dict, list]:
    """The config's `features:` (name -> type or {type, **arguments}) and `crosses:` with every default filled in;
    every mistake at once, as one ConfigError."""
    errors, specs = [], {}
    if not isinstance(features, dict) or not features:
        raise ConfigError("data.features: expected a mapping of column name -> feature type (e.g. {island: "
                          f"string_categorical}}); types: {', '.join(FEATURE_TYPES)}")
    for name, spec in features.items():
        spec = {"type": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, dict) else spec
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(kind, str) or kind not in FEATURE_TYPES:
            errors.append(f"data.features.{name}: unknown feature type {kind!r}{did_you_mean(str(kind), FEATURE_TYPES)}"
                          f"; types: {', '.join(FEATURE_TYPES)}")
            continue
        args = FEATURE_TYPES[kind]
        unknown = [k for k in spec if k != "type" and k not in args]
        errors += [f"data.features.{name}.{k}: unknown argument for {kind}{did_you_mean(k, args)}; {kind} takes: "
                   f"{', '.join(args) or 'no arguments'}" for k in unknown]
        full = {"type": kind, **args, **{k: v for k, v in spec.items() if k in args}}
        errors += _check_arguments(f"data.features.{name}", full)
        specs[str(name)] = full
    checked = []
    if crosses is not None and not isinstance(crosses, list):
        errors.append(f"data.crosses: expected a list of {{features: [a, b], crossing_dim: 32}}, found {crosses!r}")
        crosses = []
    for i, cross in enumerate(crosses or []):
        where = f"data.crosses[{i}]"
        if not isinstance(cross, dict) or not isinstance(cross.get("features"), list) or len(cross["features"]) < 2:
            errors.append(f"{where}: expected {{features: [a, b], crossing_dim: 32}} naming two or more features")
            continue
        unknown = [k for k in cross if k != "features" and k not in CROSS_DEFAULTS]
        errors += [f"{where}.{k}: unknown key{did_you_mean(k, ['features', *CROSS_DEFAULTS])}" for k in unknown]
        for f in cross["features"]:
            if not isinstance(f, str):
                errors.append(f"{where}.features: expected feature names, found {f!r}")
            elif f not in specs:
                errors.append(f"{where}: feature {f!r} is not in data.features{did_you_mean(str(f), specs)}")
            elif specs[f]["type"] not in CROSSABLE:
                errors.append(f"{where}: feature {f!r} is {specs[f]['type']}; crosses take features with integer "
                              f"outputs ({', '.join(CROSSABLE)}), as Keras' HashedCrossing does")
        full = {**CROSS_DEFAULTS, **{k: v for k, v in cross.items() if k in CROSS_DEFAULTS},
                "features": [str(f) for f in cross["features"]]}
        if not isinstance(full["crossing_dim"], int) or isinstance(full["crossing_dim"], bool) \
                or not 1 <= full["crossing_dim"] <= MAX_WIDTH:
            errors.append(f"{where}.crossing_dim: expected a positive integer, found {full['crossing_dim']!r}")
        if full["output_mode"] != "one_hot":
            errors.append(f"{where}.output_mode: only one_hot can be concatenated; found {full['output_mode']!r}")
        checked.append(full)
    if errors:
        raise ConfigError("; ".join(errors))
    return specs, checked


def _check_arguments(where: str, spec: dict) -> list[str]:
    errors = []

    def positive(key, minimum=1):
        v = spec.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= MAX_WIDTH):
            errors.append(f"{where}.{key}: expected an integer from {minimum} to {MAX_WIDTH:,}, found {v!r}")

    if spec["type"] == "text":
        if spec["output_mode"] not in TEXT_MODES:
            errors.append(f"{where}.output_mode: a text feature is one of {', '.join(TEXT_MODES)} (a vector that can "
                          f"be concatenated); found {spec['output_mode']!r}")
    elif spec.get("output_mode", "one_hot") != "one_hot":
        errors.append(f"{where}.output_mode: only one_hot features can be concatenated (output_mode: concat), as in "
                      f"Keras; found {spec['output_mode']!r}")
    positive("num_bins")
    positive("num_oov_indices", 0)
    positive("max_tokens", 2)
    if spec["type"] == "float_discretized" and spec.get("bin_boundaries") is not None:
        edges = spec["bin_boundaries"]
        if not isinstance(edges, list) or any(not isinstance(e, (int, float)) or isinstance(e, bool)
                                              or not np.isfinite(e) for e in edges) or \
                any(b <= a for a, b in zip(edges, edges[1:])) or len(edges) >= MAX_WIDTH:
            errors.append(f"{where}.bin_boundaries: expected increasing numbers, found {edges!r}")
    for key in ("scale", "offset"):
        if key in spec and (not isinstance(spec[key], (int, float)) or isinstance(spec[key], bool)
                            or not np.isfinite(spec[key])):
            errors.append(f"{where}.{key}: expected a finite number, found {spec[key]!r}")
    if spec["type"] in ("integer_categorical", "string_categorical") and spec["num_oov_indices"] == 0:
        errors.append(f"{where}.num_oov_indices: 0 makes an unseen value an error at predict time; use 1 or more")
    return errors


# --- adapt: training rows -> JSON state ------------------------------------------------------------------------------
def adapt(specs: dict, crosses: list, columns: dict) -> dict:
    """The state FeatureSpace.adapt would learn from `columns` (name -> parsed Column, training rows only, in file
    order), as plain JSON, plus each feature's output width. `specs`/`crosses` as feature_specs returns them (and as
    `specs_of(state)` recovers them, so a k-fold fold adapts again from a stored state)."""
    adapter = Adapter(specs, crosses)
    adapter.update(columns)
    return adapter.result()


ADAPT_ROWS = 65536  # adaptation reads the training rows in blocks of this many, in memory or streamed alike


class Adapter:
    """FeatureSpace.adapt over chunks of training rows in file order: per feature a running count, mean and sum of
    squared deviations (Chan's pairwise update), category counts, or Keras' Discretization summary merged batch by
    batch, updated on fixed blocks of ADAPT_ROWS rows whatever the chunks given, so a table adapted in memory and
    the same table streamed in chunks (dlcli.data.table_stream) get the same state."""

    def __init__(self, specs: dict, crosses: list):
        self.specs, self.crosses = specs, crosses
        self.stats = {name: {"count": 0, "mean": 0.0, "m2": 0.0, "missing": False, "summary": empty_summary(),
                             "counts": {}, "texts": []} for name in specs}
        self.pending, self.pending_rows = [], 0

    def update(self, columns: dict):
        n = len(next(iter(columns.values())).missing) if columns else 0
        self.pending.append(columns)
        self.pending_rows += n
        while self.pending_rows >= ADAPT_ROWS:
            self._block(ADAPT_ROWS)

    def _block(self, rows: int):
        """The first `rows` pending rows as one block."""
        joined = {k: _join([c[k] for c in self.pending]) for k in self.specs}
        block = {k: c.take(slice(0, rows)) for k, c in joined.items()}
        rest = {k: c.take(slice(rows, None)) for k, c in joined.items()}
        self.pending_rows -= rows
        self.pending = [rest] if self.pending_rows else []
        for name, spec in self.specs.items():
            _accumulate(self.stats[name], spec, block[name])

    def result(self) -> dict:
        if self.pending_rows:
            self._block(self.pending_rows)
        features = {}
        for name in sorted(self.specs):  # Keras concatenates features in sorted name order
            features[name] = _adapted(name, self.specs[name], self.stats[name])
        crossed = [{"name": "_X_".join(c["features"]), **c, "width": c["crossing_dim"]} for c in self.crosses]
        crossed.sort(key=lambda c: c["name"])
        return {"features": features, "crosses": crossed,
                "width": sum(f["width"] for f in features.values()) + sum(c["width"] for c in crossed)}


def _join(columns: list):
    if len(columns) == 1:
        return columns[0]
    return type(columns[0])(np.concatenate([c.values for c in columns]), np.concatenate([c.missing for c in columns]))


def _accumulate(stats: dict, spec: dict, col):
    kind = spec["type"]
    present = col.values[~col.missing]
    stats["missing"] |= bool(col.missing.any())
    if kind in NUMERIC or kind == "date":
        values = present.astype("datetime64[Y]").astype(np.int64) + 1970 if kind == "date" else present
        values = values.astype(np.float64)
        if len(values):
            n, mean = len(values), float(values.mean())
            m2 = float(((values - mean) ** 2).sum())
            total = stats["count"] + n
            delta = mean - stats["mean"]
            stats["mean"] += delta * n / total
            stats["m2"] += m2 + delta * delta * stats["count"] * n / total
            stats["count"] = total
        if kind == "float_discretized" and spec["bin_boundaries"] is None and len(present):
            stats["summary"] = merge_summaries(summarize(present, DISCRETIZATION_EPSILON), stats["summary"],
                                               DISCRETIZATION_EPSILON)
    elif kind in ("integer_categorical", "string_categorical"):
        counts = stats["counts"]
        for v, k in zip(*(a.tolist() for a in np.unique(present, return_counts=True))):
            counts[v] = counts.get(v, 0) + k
    elif kind == "text":
        stats["texts"] += present.tolist()


def _adapted(name: str, spec: dict, stats: dict) -> dict:
    kind, state = spec["type"], dict(spec)
    if (kind in NUMERIC or kind == "date") and stats["count"] == 0:
        raise ValueError(f"column '{name}' has no values in the training rows (every cell is missing)")
    if kind in NUMERIC:
        state["fill"] = stats["mean"]
        state["missing_indicator"] = stats["missing"]
        if kind == "float_normalized":
            state["mean"], state["variance"] = stats["mean"], stats["m2"] / stats["count"]
        if kind == "float_discretized":
            edges = spec["bin_boundaries"]
            if edges is None:
                edges = bin_boundaries(stats["summary"], spec["num_bins"]).tolist()
            state["boundaries"] = [float(e) for e in edges]  # bin_boundaries keeps what the config gave
            state["bins"] = len(edges) + 1
        state["width"] = (state.get("bins", 1)) + state["missing_indicator"]
    elif kind in ("integer_categorical", "string_categorical"):
        strings = kind == "string_categorical"
        values = np.asarray(list(stats["counts"]), dtype=str if strings else np.int64)
        kept = spec["max_tokens"] - spec["num_oov_indices"] if spec["max_tokens"] else None
        vocabulary = by_count(values, np.asarray(list(stats["counts"].values()), np.int64))[:kept]
        state["vocabulary"] = [str(v) for v in vocabulary] if strings else [int(v) for v in vocabulary]
        state["width"] = len(vocabulary) + spec["num_oov_indices"]
    elif kind in ("integer_hashed", "string_hashed"):
        state["width"] = spec["num_bins"]
    elif kind == "text":
        from dlcli.data.text import tokenize, vector_vocabulary

        state["vocabulary"] = vector_vocabulary([tokenize(t) for t in stats["texts"]], spec["max_tokens"],
                                                spec["output_mode"])
        state["width"] = spec["max_tokens"] or len(state["vocabulary"]["words"]) + 1
    elif kind == "date":
        state["year_mean"], state["year_std"] = stats["mean"], float(np.sqrt(stats["m2"] / stats["count"]))
        state["width"] = 7
    return state


def specs_of(state: dict) -> tuple[dict, list]:
    """The feature and cross specs a state was adapted from."""
    specs = {n: {"type": f["type"], **{k: f[k] for k in FEATURE_TYPES[f["type"]]}} for n, f in state["features"].items()}
    return specs, [{k: c[k] for k in ("features", *CROSS_DEFAULTS)} for c in state["crosses"]]


# --- transform: state + columns -> (N, width) float32 ----------------------------------------------------------------
def transform(state: dict, columns: dict) -> np.ndarray:
    """Every row's vector: each feature's block (sorted by name), then each cross's one-hot block."""
    blocks = list(transform_blocks(state, columns).values())
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((0, 0), np.float32)


def transform_blocks(state: dict, columns: dict) -> dict:
    """Each feature's block by name, then each cross's by its name (a_X_b): FeatureSpace's output_mode "dict", in
    concatenation order."""
    return expand(state, encode(state, columns))


def encode(state: dict, columns: dict) -> dict:
    """Each feature's and cross's compact codes (name -> tuple of arrays), from which `expand` makes the blocks: a
    numeric value (float32) or bin (int32) with its missing mask, a category's or bucket's index (int32), a date's
    or text's block as it is. A streamed table keeps rows as these (~35 bytes a penguins row)."""
    codes, indices = {}, {}
    for name, f in state["features"].items():
        codes[name], index = _encode(f, columns[name])
        if index is not None:
            indices[name] = index
    for cross in state["crosses"]:
        codes[cross["name"]] = (hashed_cross([indices[n] for n in cross["features"]],
                                             cross["crossing_dim"]).astype(np.int32),)
    return codes


def expand(state: dict, codes: dict) -> dict:
    """The float32 blocks of `encode`d rows: one-hot indices, values with their was-missing column."""
    blocks = {}
    for name, f in state["features"].items():
        kind, code = f["type"], codes[name]
        if kind in NUMERIC:
            block = one_hot(code[0], f["bins"]) if kind == "float_discretized" else code[0][:, None]
            if f["missing_indicator"]:
                block = np.concatenate([block, code[1].astype(np.float32)[:, None]], axis=1)
        elif kind in ("date", "text"):
            block = code[0]
        else:
            block = one_hot(code[0], f["width"])
        blocks[name] = block
    for cross in state["crosses"]:
        blocks[cross["name"]] = one_hot(codes[cross["name"]][0], cross["crossing_dim"])
    return blocks


def widths(state: dict) -> dict:
    """Each block's width by name, in concatenation order (the model inputs of output_mode dict)."""
    return {**{n: f["width"] for n, f in state["features"].items()}, **{c["name"]: c["width"] for c in state["crosses"]}}


def _encode(f: dict, col) -> tuple[tuple, np.ndarray | None]:
    """(the feature's codes, its integer output that crosses read, or None)."""
    kind = f["type"]
    if kind in NUMERIC:
        x = np.where(col.missing, f["fill"], col.values).astype(np.float64)
        if kind == "float_rescaled":
            x = x * f["scale"] + f["offset"]
        elif kind == "float_normalized":
            x = (x - f["mean"]) / max(np.sqrt(f["variance"]), EPSILON)
        if kind == "float_discretized":
            index = digitize(x, f["boundaries"]).astype(np.int32)
            return (index, col.missing), index
        return (x.astype(np.float32), col.missing), None
    if kind in ("integer_categorical", "string_categorical"):
        index = lookup(col, f["vocabulary"], f["num_oov_indices"], strings=kind == "string_categorical")
        return (index.astype(np.int32),), index
    if kind in ("integer_hashed", "string_hashed"):
        index = hash_to_bins(np.where(col.missing, "", col.values.astype(str)), f["num_bins"])
        return (index.astype(np.int32),), index
    if kind == "text":  # TextVectorization's vector: column 0 out-of-vocabulary; a missing cell is an empty text
        from dlcli.data.text import TokenSource, tokenize

        source = TokenSource.encode([tokenize(t) for t in np.where(col.missing, "", col.values).tolist()],
                                    f["vocabulary"])
        return (source.take(slice(0, len(source)))[0],), None
    if kind == "date":
        days = col.values.astype("datetime64[D]")
        years = days.astype("datetime64[Y]")
        month = (days.astype("datetime64[M]") - years.astype("datetime64[M]")).astype(np.float64)
        weekday = ((days.astype(np.int64) + 3) % 7).astype(np.float64)  # 1970-01-01 was a Thursday; Monday = 0
        day_of_year = (days - years.astype("datetime64[D]")).astype(np.float64)
        year_length = ((years + 1).astype("datetime64[D]") - years.astype("datetime64[D]")).astype(np.float64)
        year = (years.astype(np.int64) + 1970 - f["year_mean"]) / max(f["year_std"], EPSILON)
        angles = [2 * np.pi * month / 12, 2 * np.pi * weekday / 7, 2 * np.pi * day_of_year / year_length]
        parts = [year] + [g(a) for a in angles for g in (np.sin, np.cos)]
        return (np.stack(parts, axis=1).astype(np.float32),), None
    raise AssertionError(kind)  # feature_specs admitted only known types


def lookup(col, vocabulary: list, num_oov: int, strings: bool) -> np.ndarray:
    """StringLookup / IntegerLookup indices of a column, its missing cells out of vocabulary."""
    return lookup_indices(col.values, vocabulary, num_oov, strings, unknown=col.missing)


def describe(state: dict) -> list[tuple[str, str, int]]:
    """(name, what, width) per block in concatenation order, for the banner and inspect-shapes."""
    rows = []
    for name, f in state["features"].items():
        what = f["type"]
        if f["type"] == "text":
            what += f" ({f['output_mode']}, {len(f['vocabulary']['words'])} words + 1 OOV)"
        elif "vocabulary" in f:
            what += f" ({len(f['vocabulary'])} values + {f['num_oov_indices']} OOV)"
        elif "bins" in f:
            what += f" ({f['bins']} bins)"
        elif f["type"].endswith("_hashed"):
            what += f" ({f['num_bins']} bins)"
        if f.get("missing_indicator"):
            what += ", + was-missing column"
        rows.append((name, what, f["width"]))
    rows += [(c["name"], f"cross ({c['crossing_dim']} bins)", c["width"]) for c in state["crosses"]]
    return rows
