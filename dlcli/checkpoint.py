"""A model's state on disk: every file holding weights, optimizer state or RNG states is written and read here.

- weights files (a run's weights/best.npz and last.npz, an imported Keras model's): every weight by its path
- the one-file model (`Model.save`, `dlcli.builder.load_model`): the architecture and compile settings as JSON, the
  weights, the optimizer state
- resumable checkpoints (checkpoint/state.npz): weights, optimizer state, every RNG state, callback state and the
  trainer's position (epoch, next batch, step, samples seen, the epoch's running metric sums)

Written atomically (dlcli.run_files.atomic_savez: temp file, fsync, rename), so a crash mid-write leaves the previous
file whole. Everything but arrays is JSON (no pickle); a damaged or foreign file is a DlcliError.
"""
import json
from pathlib import Path

import numpy as np

from dlcli import run_files
from dlcli.errors import DlcliError

KIND = "dlcli-checkpoint"
VERSION = 1
HEADER = "__checkpoint__"
MODEL_FORMAT = 1
MODEL_HEADER = "__dlcli__"


def save_weights(path, model):
    run_files.atomic_savez(path, model.weights_dict())


def load_weights(path, model):
    model.load_weights_dict(run_files.load_npz(path), source=str(path))


def save_model(path, model, include_optimizer: bool = True):
    arrays = {MODEL_HEADER: np.array(json.dumps({"format": MODEL_FORMAT, "model": model.get_config(),
                                                 "compile": getattr(model, "compile_config", None)}))}
    arrays.update(model.weights_dict())
    if include_optimizer and model.optimizer is not None:
        arrays.update(_optimizer_arrays(model))
    run_files.atomic_savez(path, arrays)


def read_model(path) -> tuple[dict, dict]:
    """(header, arrays) of a file `save_model` wrote: the header's "model" builds it, then `restore_arrays`."""
    arrays = run_files.load_npz(path)  # a damaged or pickled file: a clear error that never suggests allow_pickle
    if MODEL_HEADER not in arrays:
        raise DlcliError(f"{path} is not a dlcli model file (no architecture record)")
    return json.loads(str(arrays[MODEL_HEADER])), arrays


def restore_arrays(model, arrays, source):
    """Weights, and optimizer state when the arrays hold some, back into `model` (a saved model, a checkpoint)."""
    model.load_weights_dict(arrays, source=source)
    state = {k[len("optimizer/"):]: v for k, v in arrays.items() if k.startswith("optimizer/")}
    if state:
        model.optimizer.set_state(state)


def _optimizer_arrays(model) -> dict:
    return {f"optimizer/{k}": v for k, v in model.optimizer.get_state().items()}


def describe_position(p: dict) -> str:
    """'epoch 3, batch 40 (step 1,240)', or 'the start of epoch 3 (step 1,200)' between epochs: how the resume
    banner, meta.json, a divergence report and an interrupted run all name where a checkpoint stands."""
    where = f"epoch {p['epoch'] + 1}, batch {p['batch']}" if p["batch"] else f"the start of epoch {p['epoch'] + 1}"
    return f"{where} (step {p['step']:,})"


def resume_banner(state: dict) -> str:
    """What a loaded checkpoint continues, for people: position, samples seen, learning rate, best so far."""
    p = state["header"]["position"]
    best = [cb["state"] for cb in state["header"]["callbacks"] if cb["type"] == "ModelCheckpoint"]
    best_text = ""
    if best and best[0].get("best") is not None:
        best_text = f", best so far {best[0]['best']:.4f} (epoch {best[0]['best_epoch']})"
    return (f"resuming at {describe_position(p)}: {p['samples_seen']:,} samples seen, learning rate "
            f"{p['learning_rate']:.4g}{best_text}")


def layer_rngs(model) -> dict[str, np.random.Generator]:
    """Every layer's generator by path, including layers held inside wrappers (Bidirectional, TimeDistributed)."""
    return {path: layer.rng for path, layer in layer_paths(model).items()
            if isinstance(getattr(layer, "rng", None), np.random.Generator)}


def layer_paths(model) -> dict:
    """Every layer by path, wrapped ones too ("bidirectional/forward_layer"), each once. The model's own layers go by
    their names before any is looked inside: a layer may hold another of the model's for the engine (a conv pooling
    its own output keeps the pooling in `pool_after` once a training step ran), and that one is still its own."""
    found = {layer.name: layer for layer in model.layers}
    seen = {id(layer) for layer in model.layers}

    def visit(layer, path):
        for key, value in vars(layer).items():
            for i, inner in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                if _is_layer(inner) and id(inner) not in seen:
                    seen.add(id(inner))
                    inner_path = f"{path}/{key}" + (f"/{i}" if isinstance(value, (list, tuple)) else "")
                    found[inner_path] = inner
                    visit(inner, inner_path)

    for layer in model.layers:
        visit(layer, layer.name)
    return found


def _is_layer(obj) -> bool:
    from dlcli.engine.layer import Layer

    return isinstance(obj, Layer)


def save(files, model, callbacks, position: dict, rank_rngs: list | None = None, run_header: dict | None = None):
    """Write the checkpoint of the run directory `files` (a NoRunDir, on ranks other than 0, writes nothing):
    `position` is the trainer's JSON-safe state; `rank_rngs` every data-parallel rank's layer RNG states (rank 0's
    are the run's own, under "rngs"); `run_header` JSON the run keeps with it (its config record, fingerprint)."""
    arrays = {**model.weights_dict(), **_optimizer_arrays(model)}
    cb_states = []
    for i, cb in enumerate(_stateful(callbacks)):
        cb_states.append({"type": type(cb).__name__, "state": _split(cb.get_state(), f"callback/{i}", arrays)})
    header = {**(run_header or {}), "kind": KIND, "version": VERSION, "position": position,
              "callbacks": cb_states, "rngs": {k: g.bit_generator.state for k, g in layer_rngs(model).items()}}
    if rank_rngs is not None:
        header["rank_rngs"] = rank_rngs
    arrays[HEADER] = np.array(json.dumps(header))
    files.write_npz(files.checkpoint, arrays)


def load(path) -> dict:
    """{'header': ..., 'arrays': ...} from a checkpoint file, or a DlcliError saying what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        path = run_files.RunDir(path).checkpoint
    if not path.exists():
        raise DlcliError(f"no checkpoint at {path}: the run stopped before its first checkpoint (written after each "
                         f"epoch, and every train.checkpoint_every batches); start it again")
    arrays = run_files.load_npz(path)  # damaged zip / pickled content -> a clear DlcliError
    try:
        header = json.loads(str(arrays.pop(HEADER)))
        ok = header.get("kind") == KIND and isinstance(header.get("position"), dict)
    except (KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DlcliError(f"{path} is not a dlcli checkpoint (no valid {HEADER} record); give a run directory "
                         f"written by `dlcli train`")
    if header.get("version") != VERSION:
        raise DlcliError(f"{path} is a version {header.get('version')} checkpoint; this dlcli reads version {VERSION}")
    return {"path": path, "header": header, "arrays": arrays}


def restore(checkpoint: dict, model, callbacks) -> dict:
    """Put weights, optimizer state, layer RNGs and callback state back; returns the trainer position."""
    header, arrays, path = checkpoint["header"], checkpoint["arrays"], checkpoint["path"]
    restore_arrays(model, arrays, str(path))
    rngs = layer_rngs(model)
    saved = current_paths(model, header.get("rngs", {}))
    if set(saved) != set(rngs):
        raise DlcliError(f"{path} was written for layers {sorted(saved)}; this model has {sorted(rngs)}")
    for key, state in saved.items():
        rngs[key].bit_generator.state = state
    states = header.get("callbacks", [])
    want = [s["type"] for s in states]
    callbacks = _stateful(callbacks)
    have = [type(cb).__name__ for cb in callbacks]
    if want != have:
        raise DlcliError(f"{path} was written with callbacks {want}; this run has {have} (train.callbacks must "
                         f"stay the same to resume)")
    for cb, entry in zip(callbacks, states):
        cb.set_state(_join(entry["state"], arrays))
    return header["position"]


def current_paths(model, saved: dict) -> dict:
    """`saved` (layer path -> state) by today's paths. Checkpoints written before layer_paths named the model's own
    layers first saved a pooling its conv or BatchNormalization made in training as "<that layer>/pool_after"."""
    graph = model.graph
    pairs = [(layer, pool) for layer, pool, _ in graph.movable] + list(graph.pooled_norms) if graph else []
    renamed = {f"{layer.name}/pool_after": pool.name for layer, pool in pairs}
    return {renamed.get(path, path): state for path, state in saved.items()}


def _stateful(callbacks) -> list:
    """Callbacks with state to keep (those overriding get_state); others may come and go between runs."""
    from dlcli.callback import Callback

    return [cb for cb in callbacks if type(cb).get_state is not Callback.get_state]


def _split(obj, prefix, arrays):
    """JSON-safe copy of `obj` with each array moved into `arrays` under a key left in its place."""
    if isinstance(obj, np.ndarray):
        arrays[prefix] = obj
        return {"__array__": prefix}
    if isinstance(obj, dict):
        return {k: _split(v, f"{prefix}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return np.array(arrays[obj["__array__"]])
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj
