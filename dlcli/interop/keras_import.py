"""`dlcli import-keras`: a Keras model file as a dlcli run directory (config.yaml, weights/last.npz and best.npz,
meta.json naming the source), which inspect-shapes, evaluate, predict, export and train --init-from accept.

Sources: a Keras 3 `.keras` archive, or HDF5 weights (Keras 3 `.weights.h5`, or the legacy `.h5` layout with
layer_names / weight_names) with a dlcli `--config` describing the same architecture (a legacy full-model `.h5`
carries its own config). Weights are matched as Keras loads them: `.keras` / `.weights.h5` by the path Keras gives
each layer (layers/<class in snake_case>[_n]/vars/<i>), legacy files by the order of layers that have weights.
"""
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dlcli import checkpoint, fingerprint, run_files
from dlcli.config import Config
from dlcli.engine.layer import LAYERS, snake_case
from dlcli.errors import DlcliError, require
from dlcli.interop.keras_config import ConfigMapper, UnsupportedModel, without_dropped
from dlcli.interop.keras_files import SafeH5, read_file_bytes, read_keras_archive


@dataclass
class ImportReport:
    run_dir: Path
    source: Path
    layers: int
    params: int
    keras_version: str | None
    notes: list = field(default_factory=list)


def import_keras(source, output, config_path=None, overrides=()) -> ImportReport:
    """Read `source` safely, map it to a dlcli config and weights, and write the run directory `output`."""
    require("h5py", "keras", "dlcli import-keras")
    from dlcli.builder import build_model
    from dlcli.config import dump_yaml, load_config
    from dlcli.data.inputs import check_data_fits

    source, output = Path(source), Path(output)
    _check_output(output)
    notes: list = []
    keras_version = None
    if config_path is not None:
        config = load_config(config_path, list(overrides))
        data = read_keras_archive(source).weights if source.suffix == ".keras" else read_file_bytes(source)
        h5 = SafeH5(data, str(source))
        keras_order = None
    elif source.suffix == ".keras":
        archive = read_keras_archive(source)
        keras_version = archive.metadata.get("keras_version")
        h5 = SafeH5(archive.weights, f"{source}:model.weights.h5")
        config, keras_order = _mapped_config(archive.config, source, notes, overrides, archive.vocabularies)
    else:
        h5 = SafeH5(read_file_bytes(source), str(source))
        model_config = h5.attr(h5.file, "model_config")
        if not isinstance(model_config, str):
            raise DlcliError(f"{source} holds weights only; give the architecture with --config CONFIG.yaml (a dlcli "
                             f"config describing the same layers)", exit_code=2)
        keras_version = h5.attr(h5.file, "keras_version")
        config, keras_order = _mapped_config(json.loads(model_config), source, notes, overrides)
    model = build_model(config)
    try:
        check_data_fits(config.data, model)  # --set data.type=mnist on a model of 8 inputs: refused, not written
        if h5.group("layers") is not None:
            kinds = [getattr(layer, "keras_class_name", None) or type(layer).__name__ for layer in model.layers]
            order = keras_order or list(zip([layer.name for layer in model.layers], kinds, _layer_paths(kinds)))
            _load_keras3_weights(h5, model, order, check_names=keras_order is not None)
        else:
            _load_legacy_weights(h5, model)
    finally:
        h5.close()
    meta = {**run_files.versions_meta(config.seed), "name": config.name, "status": "imported",
            "imported": {"from": str(source.resolve()), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                         "keras_version": keras_version, "config": str(config_path) if config_path else None},
            "start": run_files.utc_now(), "params": model.count_params(), "classes": None, "notes": notes,
            **fingerprint.record(config.to_dict())}  # an edited config.yaml is caught as for a trained run
    _write_run(output, dump_yaml(config.to_dict()), model, meta)
    return ImportReport(output, source, len(model.layers), model.count_params(), keras_version, notes)


def _mapped_config(keras_config: dict, source, notes, overrides, vocabularies=None) -> tuple[Config, list]:
    """(the validated dlcli Config, _weight_order's [(layer name, class name, parent)]). An adapted lookup layer's
    vocabulary, which Keras keeps in the archive's assets, becomes its `vocabulary` argument."""
    from dlcli.builder import build_model
    from dlcli.config import validate_config

    if vocabularies:
        keras_config = _with_vocabularies(keras_config, vocabularies)
    mapper = ConfigMapper(notes)
    model_spec = without_dropped(mapper.model(keras_config))
    name = str(model_spec.pop("name"))
    config = {"name": name, "data": {"type": "none"}, "model": model_spec,  # seed and train: the schema's defaults
              "compile": {"loss": "mean_squared_error"}}
    probe = build_model(validate_config(config, f"{source} (imported)"))
    activations = [getattr(getattr(t.node.layer, "activation", None), "name", None) for t in probe.outputs]
    config["compile"] = mapper.compile(keras_config.get("compile_config"), probe.output_names, activations)
    typed = validate_config(config, f"{source} (imported)", list(overrides))
    return typed, _weight_order(keras_config)


def _weight_order(keras_config: dict) -> list[tuple]:
    """[(layer name, class name, group path in model.weights.h5)] in the order Keras saves them: the model's
    layers (not keras.ops calls, which hold no weights), numbered per class; a nested Sequential's layers numbered
    again under its own path (layers/sequential/layers/conv2d)."""
    def walk(entries, prefix, skip_input):
        kept = [e for e in entries if not str(e.get("module", "")).startswith("keras.src.ops")
                and not (skip_input and e.get("class_name") == "InputLayer")]
        order = []
        for e, path in zip(kept, _layer_paths([e["class_name"] for e in kept])):
            order.append((e.get("name") or e["config"]["name"], e["class_name"], prefix + path))
            if e["class_name"] == "Sequential":
                order += walk(e["config"].get("layers") or [], f"{prefix}{path}/", True)
        return order

    body = keras_config.get("config") or {}
    return walk(body.get("layers") or [], "", keras_config.get("class_name") == "Sequential")


def _with_vocabularies(keras_config: dict, vocabularies: dict) -> dict:
    """A copy of the config whose lookup layers without a vocabulary take theirs from the assets (integers parsed for
    IntegerLookup)."""
    keras_config = json.loads(json.dumps(keras_config))
    body = keras_config.get("config") or {}
    entries = [e for e in body.get("layers") or [] if isinstance(e, dict)]
    functional = keras_config.get("class_name") != "Sequential"
    kept = [e for e in entries if functional or e.get("class_name") != "InputLayer"]
    for entry, path in zip(kept, _layer_paths([e.get("class_name") for e in kept])):
        cfg = entry.get("config")
        if entry.get("class_name") in ("StringLookup", "IntegerLookup") and isinstance(cfg, dict) \
                and cfg.get("vocabulary") is None and path in vocabularies:
            lines = vocabularies[path]
            if entry["class_name"] == "IntegerLookup":
                try:
                    lines = [int(v) for v in lines]
                except ValueError as e:
                    raise DlcliError(f"assets/{path}/vocabulary.txt: IntegerLookup's vocabulary holds a non-integer "
                                     f"({e})", exit_code=2) from None
            cfg["vocabulary"] = lines
    return keras_config


def _layer_paths(kinds: list) -> list[str]:
    """Keras 3's paths for layers of these classes in model order: layers/<snake_case(class)>[_n], numbered per
    class (the weights' groups and the assets' folders). A class Keras exports under another name
    (GroupQueryAttention) names its path by the class itself."""
    counts: dict = {}
    paths = []
    for kind in kinds:
        if kind in LAYERS:
            kind = getattr(LAYERS.get(kind), "keras_class_name", None) or kind
        base = snake_case(str(kind))
        paths.append(f"layers/{base}" + (f"_{counts[base]}" if counts.get(base) else ""))
        counts[base] = counts.get(base, 0) + 1
    return paths


# --- weights ------------------------------------------------------------------------------------------------------
def _load_keras3_weights(h5, model, order, check_names: bool):
    """Keras 3 layout: layers/<snake_case(class)>[_n] numbered per class in the model's layer order."""
    by_name = {layer.name: layer for layer in model.layers}
    for name, kind, path in order:
        layer = by_name.get(name)
        if layer is None:
            continue  # an InputLayer
        params = list(layer.params.values())
        values = []
        for sub in layer.keras_weight_groups:
            sub, only = (sub, None) if isinstance(sub, str) else sub  # (group, keys): the rest repeat other weights
            group = h5.group(f"{path}/{sub}")
            if group is None:
                continue  # a layer without weights (Keras writes no group, or an empty one)
            stored = h5.attr(group, "name")
            if check_names and sub == "vars" and stored not in (None, name):
                raise DlcliError(f"{h5.source}: {path} holds layer '{stored}', expected '{name}'")
            keys = sorted(group, key=lambda k: int(k) if k.isdigit() else -1)
            if keys != [str(i) for i in range(len(keys))]:
                raise DlcliError(f"{h5.source}: {path}/{sub} holds {keys}; Keras numbers a layer's weights 0, 1, ...")
            keys = keys if only is None else [k for k in keys if k in only]
            for key in keys:
                if len(values) == len(params):
                    raise DlcliError(f"{h5.source}: {path} has more weight arrays than dlcli's "
                                     f"{type(layer).__name__} '{name}' ({len(params)})")
                p = params[len(values)]
                values.append(h5.read(group, key, p.value.shape, f"weight '{p.path}'", p.value.dtype))
        if len(values) != len(params):
            raise DlcliError(f"{h5.source}: layer '{name}' ({kind}) has {len(values)} weight arrays under {path}; "
                             f"dlcli's layer has {len(params)} ({', '.join(p.name for p in params)})")
        layer.set_weights(values)


def _load_legacy_weights(h5, model):
    """The legacy HDF5 layout (Keras 2, Keras 3's .h5): layer_names and weight_names attributes, matched in the order
    of layers that have weights, as Keras' load_weights does."""
    root = h5.group("model_weights") or h5.file
    names = h5.attr(root, "layer_names")
    if not isinstance(names, list):
        raise UnsupportedModel(f"{h5.source}: neither a Keras 3 weights file (layers/...) nor a legacy one "
                               f"(layer_names)")
    stored = []
    for layer_name in names:
        group = h5.group(f"{root.name}/{layer_name}")
        weight_names = h5.attr(group, "weight_names") if group is not None else None
        if weight_names:
            stored.append((layer_name, group, weight_names))
    layers = [layer for layer in model.layers if layer.params]
    if len(stored) != len(layers):
        raise DlcliError(f"{h5.source} has weights for {len(stored)} layers ({', '.join(s[0] for s in stored)}); "
                         f"the config's model has {len(layers)} layers with weights "
                         f"({', '.join(layer.name for layer in layers)})")
    for layer, (layer_name, group, weight_names) in zip(layers, stored):
        params = list(layer.params.values())
        if len(weight_names) != len(params):
            raise DlcliError(f"{h5.source}: layer '{layer_name}' has {len(weight_names)} weight arrays; dlcli's "
                             f"'{layer.name}' has {len(params)}")
        values = []
        for p, weight in zip(params, weight_names):
            parent, _, leaf = weight.rpartition("/")
            values.append(h5.read(h5.group(f"{group.name}/{parent}") if parent else group, leaf, p.value.shape,
                                  f"weight '{p.path}' ({layer_name}/{weight})", p.value.dtype))
        layer.set_weights(values)


# --- the run directory ------------------------------------------------------------------------------------------------
def _check_output(output: Path):
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DlcliError(f"{output} already exists; give a new directory with --output", exit_code=2)


def _write_run(output: Path, config_yaml: str, model, meta: dict):
    """Everything in a hidden temporary directory beside `output`, renamed into place at the end: an error leaves
    nothing behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        run = run_files.RunDir(tmp)
        run.write_text(run.config, config_yaml)
        checkpoint.save_weights(run.last_weights, model)
        checkpoint.save_weights(run.best_weights, model)
        lines: list = []
        model.summary(print_fn=lines.append)
        run.write_text(run.summary, "\n".join(lines) + "\n")
        run.write_json(run.meta, meta)
        _check_output(output)
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
