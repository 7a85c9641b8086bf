"""Sequential and Model (Keras' two ways to wire layers): compile, fit, evaluate, predict, summary, save.

A Sequential model is a graph whose nodes form a chain, so there is one engine (dlcli.engine.graph) for both.
`get_config()` returns the `model:` section of a YAML config and `dlcli.builder.model_from_config()` builds from it,
so a model written in Python and the same model written in YAML are interchangeable.
"""
import numpy as np

from dlcli import losses as losses_module
from dlcli import metrics as metrics_module
from dlcli import optimizers as optimizers_module
from dlcli.data.dataset import Dataset
from dlcli.data.source import ArraySource, Source, as_source, batch_indices
from dlcli.data.split import first_target, split_indices
from dlcli.engine.graph import Graph, Input, InputLayer, SymbolicTensor, inference_passes
from dlcli.engine.layer import Layer, assign_weights, build_seeded, format_shape, numpy_dtype
from dlcli.errors import ConfigError, DlcliError, ShapeError
from dlcli.registry import did_you_mean

INFERENCE_BYTES = 4 * 2**20
PREDICT_ROWS = 128  # at most, a predict pass's samples (Model._prediction_rows)


class Model:
    """Keras' functional Model: `Model(inputs=inp, outputs=out)` over symbolic tensors."""

    def __init__(self, inputs=None, outputs=None, name: str = "model"):
        self.name = name
        self.graph = None
        self.optimizer = None
        self.stop_training = False
        self.compiled = False
        self._pass_rows = (None, 0)  # (the graph, its samples per inference pass): the rule below, once per graph
        self.stepper = None  # the Run behind train_step
        if inputs is not None:
            self._set_graph(inputs, outputs)

    def _set_graph(self, inputs, outputs):
        self.inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        self.outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        self.graph = Graph(self.inputs, self.outputs)

    # --- structure ------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[Layer]:
        return self._require_graph().layers

    @property
    def input_names(self) -> list[str]:
        return [t.node.layer.name for t in self._require_graph().inputs]

    @property
    def output_names(self) -> list[str]:
        return [_tensor_ref(t) for t in self._require_graph().outputs]

    @property
    def weights(self):
        return [p for layer in self.layers for p in layer.weights]

    @property
    def trainable_weights(self):
        return [p for layer in self.layers for p in layer.trainable_weights]

    def weights_to_train(self) -> list:
        """The trainable weights, each given a gradient array, and every other weight's taken away
        (Param.set_training): what a step computes gradients for and updates. A fit asks as it starts, so, as in
        Keras, a change of `trainable` takes effect at the next fit (Keras: at the next compile)."""
        trainable = self.trainable_weights
        training = {id(p) for p in trainable}
        for p in self.weights:
            if p.trainable:
                p.set_training(id(p) in training)
        return trainable

    @property
    def non_trainable_weights(self):
        return [p for layer in self.layers for p in layer.non_trainable_weights]

    def get_layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise DlcliError(f"model '{self.name}' has no layer '{name}'")

    def count_params(self) -> int:
        return sum(layer.count_params() for layer in self.layers)

    def get_weights(self) -> list[np.ndarray]:
        """All weights in Keras' order: layer by layer, each layer's weights in creation order."""
        return [p.value.copy() for p in self.weights]

    def set_weights(self, values):
        assign_weights(self.weights, values, f"model '{self.name}'")

    def _require_graph(self) -> Graph:
        if self.graph is None:
            raise DlcliError(f"model '{self.name}' is not built yet: give the first layer input_shape=... "
                             f"or call build(input_shape)")
        return self.graph

    # --- compile --------------------------------------------------------------------------------------------
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None):
        graph = self._require_graph()
        if loss is None:
            raise ConfigError("compile() needs a loss, e.g. loss='sparse_categorical_crossentropy'")
        self.optimizer = optimizers_module.get(optimizer)
        names = self.output_names
        self.losses = [losses_module.get(x) for x in _per_output(loss, names, "loss")]
        weights = _per_output(loss_weights if loss_weights is not None else 1.0, names, "loss_weights")
        self.loss_weights = [float(w) for w in weights]
        metric_lists = _per_output(metrics or [], names, "metrics", listy=True)
        self.metrics = [[metrics_module.resolve(m, loss_fn, t.shape) for m in ms]
                        for ms, loss_fn, t in zip(metric_lists, self.losses, graph.outputs)]
        # Fuse softmax/sigmoid outputs with cross-entropy: the loss reads logits, for stability and speed.
        self.fused = []
        for t, loss_fn in zip(graph.outputs, self.losses):
            layer = t.node.layer
            act = getattr(layer, "activation", None)
            fusable = (act is not None and hasattr(act, "name") and loss_fn.fuses_with(act.name)
                       and len(layer.nodes) == 1 and not graph.consumers.get(id(t)) and not t.node.multi_output)
            layer.output_fused = bool(fusable)
            self.fused.append(layer if fusable else None)
        self.compiled = True
        self.compile_config = {"optimizer": self.optimizer.get_config(),
                               "loss": [losses_module.serialize(x) for x in self.losses],
                               "metrics": metric_lists, "loss_weights": self.loss_weights}

    def _metric_names(self) -> list[str]:
        prefix = [f"{n}_" if len(self.outputs) > 1 else "" for n in self.output_names]
        names = ["loss"] + ([f"{p}loss" for p in prefix] if len(self.outputs) > 1 else [])
        for p, ms in zip(prefix, self.metrics):
            names += [p + m.name for m in ms]
        return names

    # --- data plumbing --------------------------------------------------------------------------------------
    def _inputs_list(self, x) -> list[np.ndarray]:
        names = self.input_names
        if isinstance(x, dict):
            missing = [n for n in names if n not in x]
            if missing:
                raise DlcliError(f"no data for model input(s) {missing}; data has {sorted(x)}")
            xs = [x[n] for n in names]
        else:
            xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(xs) != len(names):
            raise DlcliError(f"model '{self.name}' has {len(names)} inputs ({', '.join(names)}); got {len(xs)} arrays")
        out = []
        for t, a in zip(self.graph.inputs, xs):
            a = np.asarray(a)
            if t.dtype == "string":
                if a.dtype.kind not in "USO":
                    raise DlcliError(f"input '{t.node.layer.name}' takes text (dtype string); got {a.dtype} values")
            elif a.dtype.kind == "f" and a.dtype != np.dtype(t.dtype):
                a = a.astype(t.dtype)
            elif a.dtype.kind in "iub" and np.dtype(t.dtype).kind == "f":
                a = a.astype(t.dtype)
            if a.shape[1:] != t.shape:
                raise ShapeError(f"input '{t.node.layer.name}' expects samples of shape {t.shape} "
                                 f"(batch shape {format_shape(t.shape)}); the data has {a.shape[1:]}")
            out.append(a)
        return out

    def _targets_list(self, y) -> list[np.ndarray]:
        names = self.output_names
        if isinstance(y, dict):
            missing = [n for n in names if n not in y]
            if missing:
                raise DlcliError(f"no targets for model output(s) {missing}; data has {sorted(y)}")
            return [np.asarray(y[n]) for n in names]
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        if len(ys) != len(names):
            raise DlcliError(f"model '{self.name}' has {len(names)} outputs; got {len(ys)} target arrays")
        return [np.asarray(a) for a in ys]

    # --- one step -------------------------------------------------------------------------------------------
    def compute_loss(self, ys, outs, sample_weight=None, with_grads=True, logits=None):
        """The batch loss (each loss's Keras reduction, sum_over_batch_size by default: the weighted mean) and
        d(loss)/d(outputs or logits). A fused loss reads its output layer's logits from the last pass, or from
        `logits` (one per output, None where not fused) when the pass ran elsewhere (a graph replica's)."""
        total, parts, grads = 0.0, [], []
        logits = logits or [None if fused is None else fused.logits for fused in self.fused]
        for y, out, loss_fn, w, z in zip(ys, outs, self.losses, self.loss_weights, logits):
            per_sample, grad = loss_fn.compute(y, out, logits=z)
            value, factor = loss_fn.reduce(per_sample, out, sample_weight)  # Keras' reduction
            scale = (factor * w).astype(grad.dtype).reshape((-1,) + (1,) * (grad.ndim - 1))
            parts.append(value)
            total += w * value
            if with_grads:
                grad *= scale
                grads.append(grad)
        return total, parts, grads

    def regularization_loss(self) -> float:
        return float(sum(layer.regularization_loss() for layer in self.layers))

    def train_step(self, xs, ys, sample_weight=None):
        """Keras' train_step: one step of dlcli.trainer.Run on a batch (forward, loss, backward, divergence gate,
        update), the step fit takes; (loss plus regularisation, each output's loss, the outputs). The model's steps
        share one Run, so the gate measures a rising loss from the first step's."""
        from dlcli.trainer import Run

        self.stepper = self.stepper or Run(self, verbose=0)
        return self.stepper.step(xs, ys, sample_weight)

    # --- Keras' user-facing API -------------------------------------------------------------------------------
    def fit(self, x, y, epochs=1, batch_size=32, validation_split=0.0, validation_data=None, shuffle=True,
            callbacks=None, verbose=1, class_weight=None, sample_weight=None, initial_epoch=0, seed=None,
            stratify=False):
        """Train for `epochs`; returns a History. `validation_split` takes a seeded *shuffled* fraction
        (Keras takes the unshuffled tail, a known trap with sorted data)."""
        from dlcli.trainer import Run

        self._require_compiled()
        rng = np.random.default_rng(seed)  # None: fresh entropy
        data = Dataset(self._inputs_list(x), self._targets_list(y))
        if validation_data is not None:
            data.x_val, data.y_val = self._inputs_list(validation_data[0]), self._targets_list(validation_data[1])
        elif validation_split:
            kept, off = split_indices(first_target(data.y_train), validation_split, rng, stratify)
            data = data.subset(kept, off)
            sample_weight = None if sample_weight is None else np.asarray(sample_weight)[kept]
        return Run(self, callbacks, verbose, rng).fit(
            data, epochs=epochs, batch_size=batch_size, shuffle=shuffle, class_weight=class_weight,
            sample_weight=sample_weight, initial_epoch=initial_epoch)

    def evaluate(self, x, y, batch_size=32, verbose=0, return_dict=False, sample_weight=None):
        """Loss and metrics over all samples, exact (each batch weighted by its size), as Keras' evaluate: the loss
        alone, a list, or with `return_dict` a dict by name. `x`: arrays, or a Source of inputs."""
        self._require_compiled()
        xs = x if isinstance(x, Source) else self._inputs_list(x)
        logs = self.evaluation_sums(xs, self._targets_list(y), batch_size, sample_weight)
        logs = logs.results(extra_loss=self.regularization_loss())
        if return_dict:
            return logs
        values = list(logs.values())
        return values[0] if len(values) == 1 else values

    def evaluation_sums(self, xs, ys, batch_size=32, sample_weight=None) -> metrics_module.RunningLogs:
        """The running loss and metric sums behind evaluate, which data-parallel evaluation adds up over ranks.
        `xs`: a list of arrays (one per input) or a Source."""
        logs = metrics_module.RunningLogs(self)
        source = as_source(xs)
        # passes of batch_size, at most the cache rule's rows, never sized by the threads: the sums are added per pass
        chunks = batch_indices(len(source), min(batch_size, self._inference_rows()))
        with source.batches(chunks) as inputs:
            # side by side on the BLAS threads as predict's; each pass brings the logits a fused loss reads
            for sl, (outs, logits) in zip(chunks, inference_passes(self.graph, inputs, self.fused)):
                yb = [a[sl] for a in ys]
                sw = None if sample_weight is None else sample_weight[sl]
                total, parts, _ = self.compute_loss(yb, outs, sw, with_grads=False, logits=logits)
                logs.update(total, parts, yb, outs, sw)
        return logs

    def predict(self, x, batch_size=32, verbose=0):
        """Outputs for `x` (arrays, or a Source of inputs), computed batch by batch (an array, or a list for
        several outputs). The same bits whatever `batch_size` (Keras' argument, kept for its callers) and the BLAS
        thread count: the passes are PREDICT_ROWS sized by the shapes alone (_prediction_rows), the last one padded
        with copies of its last sample, so every product sees the same row counts and each sample the same row in
        them (OpenBLAS' Haswell kernels round a row by both)."""
        source = x if isinstance(x, Source) else ArraySource(self._inputs_list(x))
        n, rows = len(source), self._prediction_rows()
        chunks = [[] for _ in self.outputs]
        with source.batches(batch_indices(n, rows)) as inputs:
            padded = ([a if len(a) == rows else a[np.minimum(np.arange(rows), len(a) - 1)] for a in xb]
                      for xb in inputs)
            for outs in inference_passes(self.graph, padded):
                for c, o in zip(chunks, outs):
                    c.append(o)
        results = [np.concatenate(c)[:n] if c else np.empty((0,) + t.shape, np.float32)
                   for c, t in zip(chunks, self.outputs)]
        return results[0] if len(results) == 1 else results

    def _inference_rows(self) -> int:
        """Samples per forward pass at inference (evaluate's, a served batch's most): about INFERENCE_BYTES of the
        largest activation a pass writes, so its intermediates stay in cache. An output a conv pools in its own pass
        is never written whole, so it does not count: the book convnet's largest is then its first pooled output, 193
        images a pass, where its first conv's output gave 48 (one thread, thread CPU per batch of 512, AMD EPYC at load
        9, best of 7: passes of 43 28.4 ms, 86 27.2, 128 25.8, 256 26.4; its conv 3 4.2 -> 3.1 ms and Dense layers 1.3
        -> 0.8 at 128: fewer, larger GEMMs and calls). No layer mixes samples at inference, so any pass size gives the
        same outputs up to BLAS's rounding, which depends on a product's row count and a row's place in it: OpenBLAS's
        Haswell kernels gave 468 of the book convnet's 512 predictions other last bits in passes of 171 than of 128,
        its SkylakeX kernels a lone sample's (predict's passes are sized for that, _prediction_rows)."""
        graph = self._require_graph()
        if self._pass_rows[0] is not graph:
            sizes = [int(np.prod(t.shape)) * numpy_dtype(t.dtype).itemsize for node in graph.nodes
                     for t in node.outputs if None not in t.shape and graph.written_at_inference(t)]
            self._pass_rows = (graph, max(INFERENCE_BYTES // max(sizes, default=1), 1))
        return self._pass_rows[1]

    def _prediction_rows(self) -> int:
        """Samples per predict pass: the largest power of two within _inference_rows and PREDICT_ROWS, from the shapes
        alone, so a prediction's bits do not depend on the batch size or the threads (predict). A power of two splits
        the usual batches (512) into equal passes, as many per thread on 1, 2 or 4 threads; the 193 rows the
        cache rule gives the book convnet ran 13-15% slower than 128 or 256 (one thread, thread CPU per 512
        samples, best of 7, AMD EPYC at load 3: Haswell 15.5 against 13.7 and 13.2 ms, SkylakeX 11.4 against 10.0
        and 9.6). PREDICT_ROWS bounds what a small predict pads its one pass to: the book MLP's passes of 128 cost
        3-5% more than of 1,024 per sample (3.75 / 2.13 against 3.57 / 1.93 ms per 512, Haswell / SkylakeX)."""
        return 1 << (min(self._inference_rows(), PREDICT_ROWS).bit_length() - 1)

    def __call__(self, x, training=False):
        outs = self.graph.forward(self._inputs_list(x), training)
        return outs[0] if len(outs) == 1 else outs

    def _require_compiled(self):
        if not self.compiled:
            raise DlcliError(f"model '{self.name}' must be compiled first: model.compile(optimizer, loss, metrics)")

    # --- summary --------------------------------------------------------------------------------------------
    def summary_rows(self) -> list[dict]:
        """One row per layer call: name, type, output shape, parameters, connected-to, FLOPs per sample."""
        graph = self._require_graph()
        rows, seen = [], set()
        for node in graph.nodes:
            layer = node.layer
            shapes = [t.shape for t in node.outputs]
            first = id(layer) not in seen
            seen.add(id(layer))
            in_shapes = [t.shape for t in node.inputs]
            called_on = in_shapes if node.multi_input or not in_shapes else in_shapes[0]
            vars(layer).update(node.call_args)
            flops = 0 if isinstance(layer, InputLayer) else layer.flops(called_on)
            name = _node_name(node)
            rows.append({
                "name": name if name == layer.name else f"{name} (shares {layer.name})",
                "type": "InputLayer" if isinstance(layer, InputLayer) else type(layer).__name__,
                "output_shape": shapes if node.multi_output else shapes[0],
                "params": layer.count_params() if first else 0,
                "trainable": layer.trainable,
                "connected_to": [_tensor_ref(t) for t in node.inputs],
                "flops": int(flops),
                "kept": 0 if isinstance(layer, InputLayer) else int(layer.kept_size(called_on)),
            })
        return rows

    def summary(self, print_fn=print):
        rows = self.summary_rows()
        functional = not isinstance(self, Sequential)
        rows = [r for r in rows if functional or r["type"] != "InputLayer"]
        # columns widen to their longest entry, so a long layer name never runs into its shape
        names = [f"{r['name']} ({r['type']})" for r in rows]
        shapes = [format_shape(r["output_shape"]) for r in rows]
        name_w = max([34] + [len(n) + 2 for n in names])
        shape_w = max([26] + [len(s) + 2 for s in shapes])
        header = (f"{'Layer (type)':<{name_w}}{'Output Shape':<{shape_w}}{'Param #':>10}"
                  + ("  Connected to" if functional else ""))
        lines = [f'Model: "{self.name}"', "-" * len(header), header, "=" * len(header)]
        for r, name, shape in zip(rows, names, shapes):
            line = f"{name:<{name_w}}{shape:<{shape_w}}{r['params']:>10,}"
            if functional:
                line += "  " + ", ".join(r["connected_to"])
            lines.append(line)
        trainable = sum(p.value.size for p in self.trainable_weights)
        total = self.count_params()
        lines += ["=" * len(header), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                  f"Non-trainable params: {total - trainable:,}"]
        print_fn("\n".join(lines))

    # --- config, save and load ------------------------------------------------------------------------------
    def get_config(self) -> dict:
        """The `model:` section of a YAML config for this graph (functional form)."""
        graph = self._require_graph()
        layers, seen = [], {}
        for node in graph.nodes:
            layer = node.layer
            if isinstance(layer, InputLayer):
                continue
            refs = [_tensor_ref(t) for t in node.inputs]
            entry_name = _node_name(node)
            if id(layer) in seen:
                entry = {"name": entry_name, "shares": layer.name}
            else:
                seen[id(layer)] = True
                entry = layer.get_config()
                entry.pop("input_shape", None)
            entry.update({a: v for a, v in node.call_args.items() if v != layer.call_arguments[a]
                          or a in entry and entry[a] != v})
            entry["inputs"] = refs if node.multi_input else refs[0]
            layers.append(entry)
        return {"type": "functional", "name": self.name,
                "inputs": [{"name": t.node.layer.name, "shape": list(t.shape),
                            **({"dtype": t.dtype} if t.dtype != "float32" else {})} for t in graph.inputs],
                "layers": layers, "outputs": [_tensor_ref(t) for t in graph.outputs]}

    def save(self, path, include_optimizer=True):
        """One .npz file (dlcli.checkpoint.save_model): architecture, compile settings, weights, optimizer state."""
        from dlcli.checkpoint import save_model

        save_model(path, self, include_optimizer)

    def weights_dict(self) -> dict:
        return {f"weights/{p.path}": p.value for p in self.weights}

    def load_weights_dict(self, arrays, source="weights file"):
        params = self.weights
        wanted = {f"weights/{p.path}": p for p in params}
        missing = [k for k in wanted if k not in arrays]
        if missing:
            raise DlcliError(f"{source} does not match this model: missing {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
        for key, p in wanted.items():
            v = arrays[key]
            if v.shape != p.value.shape:
                raise DlcliError(f"{source}: weight '{p.path}' has shape {v.shape}; the model expects {p.value.shape}")
            p.value = np.array(v, dtype=p.value.dtype)


class Sequential(Model):
    """A linear stack of layers; only the first needs `input_shape` (Keras' layer compatibility)."""

    def __init__(self, layers=None, name: str = "sequential"):
        super().__init__(name=name)
        self._stack: list[Layer] = []
        self._input = None
        for layer in layers or []:
            self.add(layer)

    def add(self, layer):
        if isinstance(layer, SymbolicTensor):  # Sequential([Input(shape=...), ...]) as in Keras 3
            self._input = layer
            return
        if not isinstance(layer, Layer):
            raise DlcliError(f"Sequential takes layers; got {type(layer).__name__}")
        if self.graph is not None:
            raise DlcliError("cannot add layers to a Sequential model after it is built")
        self._stack.append(layer)
        if len(self._stack) == 1 and self._input is None and layer.input_shape_hint is not None:
            self._input = Input(layer.input_shape_hint)

    def build(self, input_shape=None, rng: np.random.Generator | None = None):
        """Wire the stack; with `rng` (seeded) each layer's weights and dropout stream come from it, in order."""
        if self.graph is not None:
            return
        if input_shape is not None:
            self._input = Input(tuple(input_shape))
        if self._input is None:
            raise DlcliError(f"model '{self.name}' needs an input shape: give the first layer "
                             f"input_shape=(...) or call build(input_shape)")
        x = self._input
        for layer in self._stack:
            if rng is not None:
                build_seeded(layer, x.shape, rng)
            x = layer(x)
        self._set_graph(self._input, x)

    def _require_graph(self):
        if self.graph is None and (self._input is not None):
            self.build()
        return super()._require_graph()

    def get_config(self) -> dict:
        self._require_graph()
        layers = []
        for layer in self._stack:
            entry = layer.get_config()
            entry.pop("input_shape", None)
            layers.append(entry)
        return {"type": "sequential", "name": self.name, "input_shape": list(self._input.shape),
                **({"input_dtype": self._input.dtype} if self._input.dtype != "float32" else {}),
                "layers": layers}


def _node_name(node) -> str:
    """A call's name: the layer's for its first call; a shared call's own (its YAML entry name, or `<layer>_call<i>`)."""
    layer = node.layer
    index = layer.nodes.index(node)
    return layer.name if index == 0 else getattr(node, "name", None) or f"{layer.name}_call{index}"


def _tensor_ref(t) -> str:
    name = _node_name(t.node)
    return name if not t.node.multi_output else f"{name}:{t.index}"


def _per_output(value, names, what, listy=False):
    """Broadcast a compile argument to one entry per output (a dict keyed by output name, a list, or one)."""
    if isinstance(value, dict) and not (not listy and "type" in value):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ConfigError(f"compile {what} names unknown output '{unknown[0]}'{did_you_mean(unknown[0], names)}"
                              f"; outputs: {', '.join(names)}")
        default = [] if listy else None
        return [value.get(n, default) for n in names]
    if listy:
        if len(names) > 1 and isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
        return [list(value) for _ in names]
    if isinstance(value, list):
        if len(value) != len(names):
            raise ConfigError(f"compile {what} has {len(value)} entries for {len(names)} outputs")
        return value
    return [value for _ in names]
