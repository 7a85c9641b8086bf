"""The graph executor: nodes made by calling layers on symbolic tensors, run in topological order.

Forward runs nodes in order, passing masks along; backward runs them in reverse, summing gradients where a tensor
fans out: a sum of two like arrays goes on unadded (engine/layer.GradientSum) to a layer that reads it so (an Add's
ReLU, through the layers that pass a gradient on), which adds as it reads, a pass over memory fewer. A layer called
more than once (shared weights) keeps one cache per node: the executor saves the layer's attributes after each
node's forward and restores them before that node's backward. An `observer` (divergence
reports, `inspect-shapes --trace`) sees every node's output and gradients without touching the layers:
`observer.forward(node, output)` and `observer.backward(node, output_grad, input_grad)`. As Keras 3 does, a
layer takes its floating inputs in its own dtype (a float64 conv between float32 layers) and the cast's gradient
goes back in the input's dtype: every pass (fit, predict, Sequential, functional) runs here.

A ReLU that only feeds a max pooling moves after it (relu(max z) == max(relu z), gradients included): it then runs
on a tensor pool_size times smaller. A ReLU layer that is the only reader of a BatchNormalization or an Add runs
inside that layer instead (its `post_activation`): BatchNormalization's compiled passes apply it and mask its
gradient in their own loops, an Add in place on its own output, and the ReLU layer passes its input through.
In training an Add of two inputs of one shape, one of them made by a BatchNormalization that only the Add reads,
runs inside that layer (`summed`: the v1 residual block's tail BN -> Add -> ReLU in one compiled pass): the graph
hands the layer the Add's other input, made before it, and the Add passes the sum on; its backward is unchanged.
In training a BatchNormalization whose only reader is a ReLU layer moved into a max pooling makes that pooling's
output itself (`pooled_norms`: a residual net's stem, BN -> ReLU -> MaxPooling, in one compiled pass); the ReLU
layer and the pooling pass their input, and then its gradient, on.
Observed runs keep every layer's own output, so nothing moves in them. In an inference pass a layer that can
pool its own output (`pools_own_output`: a few-channel Conv2D, or a Winograd one in its F(4x4) output transform)
does so when that pooling's windows tile it, and keeps its activation: the pooling then passes its input on. In
training the Winograd one does too, and a few-channel one where it reads the model's inputs (`poolable_in_training`):
the pooling then passes its output's gradient back, which the conv takes to its weights and input from where each
maximum came from.
"""
import copy
import itertools
import os
import queue
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext

import numpy as np

from dlcli.engine import activations, blas, lanes
from dlcli.engine.layer import GradientSum, Layer, autocast, autocast_inputs, compute_dtype, format_shape
from dlcli.errors import ShapeError


class SymbolicTensor:
    """A placeholder for a layer output in a graph: its shape (no batch axis) and the node that makes it."""

    symbolic = True  # Layer.__call__ asks this instead of importing the graph

    def __init__(self, shape, node=None, index=0, dtype="float32"):
        self.shape, self.node, self.index, self.dtype = tuple(shape), node, index, dtype

    @property
    def name(self) -> str:
        layer = self.node.layer
        return layer.name if len(layer.nodes) <= 1 and self.index == 0 else \
            f"{layer.name}:{layer.nodes.index(self.node)}:{self.index}"

    def wire(self, layer: Layer, inputs, call_args=None):
        return call_symbolic(layer, inputs, call_args)

    def __repr__(self):
        return f"<SymbolicTensor {self.name} shape=(None, {', '.join(map(str, self.shape))})>"


class Node:
    def __init__(self, layer: Layer, inputs: list[SymbolicTensor], multi_input: bool, output_shapes):
        self.layer, self.inputs, self.multi_input = layer, inputs, multi_input
        self.multi_output = isinstance(output_shapes, list)
        shapes = output_shapes if self.multi_output else [output_shapes]
        self.outputs = [SymbolicTensor(s, self, i) for i, s in enumerate(shapes)]
        self.state = None
        self.call_args: dict = {}  # this call's Layer.call_arguments, set on the layer before each use


class InputLayer(Layer):
    """The source of a graph: holds the input's shape and dtype; forward is the identity."""

    def __init__(self, shape, name: str | None = None, dtype: str = "float32"):
        super().__init__(name=name, dtype=dtype)
        self.shape = tuple(int(s) for s in shape)
        self.built, self.input_shape = True, self.shape

    def forward(self, x, training=False):
        return x

    def backward(self, grad):
        return grad


def Input(shape, name: str | None = None, dtype: str = "float32") -> SymbolicTensor:
    """Keras' `Input(shape=..., name=...)`: a symbolic tensor to call layers on."""
    layer = InputLayer(shape, name=name, dtype=dtype)
    node = Node(layer, [], False, layer.shape)
    node.outputs[0].dtype = dtype
    layer.nodes.append(node)
    return node.outputs[0]


def call_symbolic(layer: Layer, inputs, call_args=None):
    multi = isinstance(inputs, (list, tuple))
    # a call argument not given is the layer's setting (its constructor's) for its first call, Keras' default after
    call_args = {a: (call_args or {}).get(a, getattr(layer, a) if not layer.nodes else default)
                 for a, default in layer.call_arguments.items()}
    vars(layer).update(call_args)
    tensors = list(inputs) if multi else [inputs]
    shapes = [t.shape for t in tensors] if multi else tensors[0].shape
    layer.ensure_built(shapes)
    try:
        out_shape = layer.output_shape(shapes)
    except ShapeError:
        raise
    except (ValueError, IndexError, TypeError) as e:
        raise ShapeError(f"layer '{layer.name}' ({type(layer).__name__}) cannot take input shape "
                         f"{format_shape(shapes)}: {e}") from None
    node = Node(layer, tensors, multi, out_shape)
    node.call_args = call_args
    layer.nodes.append(node)
    return node.outputs if node.multi_output else node.outputs[0]


def topological_nodes(outputs: list[SymbolicTensor]) -> list[Node]:
    """Nodes needed for `outputs`, each after the nodes it reads from (depth-first post-order)."""
    order, done, active = [], set(), set()

    def visit(node):
        if id(node) in done:
            return
        if id(node) in active:
            raise ShapeError(f"the graph has a cycle through layer '{node.layer.name}'")
        active.add(id(node))
        for t in node.inputs:
            visit(t.node)
        active.discard(id(node))
        done.add(id(node))
        order.append(node)

    for t in outputs:
        visit(t.node)
    return order


class Graph:
    def __init__(self, inputs: list[SymbolicTensor], outputs: list[SymbolicTensor]):
        self.inputs, self.outputs = inputs, outputs
        self.nodes = topological_nodes(outputs)
        sources = [n for n in self.nodes if isinstance(n.layer, InputLayer)]
        given = {id(t.node) for t in inputs}
        for n in sources:
            if id(n) not in given:
                raise ShapeError(f"the outputs depend on input '{n.layer.name}', which is not among the model's "
                                 f"inputs ({', '.join(t.node.layer.name for t in inputs)})")
        self.layer_nodes = [n for n in self.nodes if not isinstance(n.layer, InputLayer)]  # the nodes a pass runs
        self.layers = []
        for n in self.nodes:
            if not isinstance(n.layer, InputLayer) and n.layer not in self.layers:
                self.layers.append(n.layer)
        consumers: dict = {}
        for n in self.nodes:
            for t in n.inputs:
                consumers[id(t)] = consumers.get(id(t), 0) + 1
        self.consumers = consumers
        self.movable = [(layer, pool, type(layer.activation)())
                        for layer, pool in _movable_activations(self.nodes, consumers, outputs)]
        self.absorbed = [(layer, relu, type(relu.activation)())
                         for layer, relu in _absorbed_relus(self.nodes, consumers, outputs, self.movable)]
        self.summed = _summed_adds(self.nodes, consumers, outputs)
        self.pooled_norms = _pooled_normalisations(consumers, outputs, self.movable)
        self.cast_from: dict = {}  # set by each forward
        # (layer, its output's sizes) of the unshared layers that prepare a training pass (a Winograd conv's U)
        self.prepared = [(n.layer, n.outputs[0].shape[:-1]) for n in self.layer_nodes
                         if hasattr(n.layer, "prepare_pass") and len(n.layer.nodes) == 1]
        self.reads_data = None  # _reading_data's nodes, found at the first backward pass (the layers built)
        self.poolable = {id(pool) for layer, pool, _ in self.movable
                         if getattr(layer, "pools_own_output", None) and layer.pools_own_output(pool)}
        self.poolable_in_training = {id(pool) for layer, pool, _ in self.movable
                                     if id(pool) in self.poolable and layer.pools_own_output(
                                         pool, training=True,
                                         reads_inputs=all(isinstance(t.node.layer, InputLayer)
                                                          for t in layer.nodes[0].inputs))}

    def written_at_inference(self, tensor: SymbolicTensor) -> bool:
        """Whether an inference pass writes `tensor` whole: not the output of a conv that pools it in its own pass
        (`poolable`, and the conv's pools_in_its_pass), which only its pooled maximum leaves."""
        layer = tensor.node.layer
        return not any(layer is conv and id(pool) in self.poolable and conv.pools_in_its_pass(pool.pool_size,
                                                                                             tensor.shape[:-1])
                       for conv, pool, _ in self.movable)

    def replica(self) -> "Graph":
        """The same graph over twins of its layers: each twin shares its weights (the Param objects) but keeps its
        own caches, so another thread can run an inference pass on it at the same time."""
        twins = {id(layer): _twin(layer) for layer in self.layers}
        other = copy.copy(self)
        other.nodes = []
        for node in self.nodes:
            node = copy.copy(node)
            node.layer = twins.get(id(node.layer), node.layer)  # input layers hold no state
            other.nodes.append(node)
        other.layer_nodes = [n for n in other.nodes if not isinstance(n.layer, InputLayer)]
        other.reads_data = None
        other.layers = [twins[id(layer)] for layer in self.layers]
        other.movable = [(twins[id(layer)], twins[id(pool)], type(act)()) for layer, pool, act in self.movable]
        other.absorbed = [(twins[id(layer)], twins[id(relu)], type(act)()) for layer, relu, act in self.absorbed]
        other.poolable = {id(twins[id(pool)]) for _, pool, _ in self.movable if id(pool) in self.poolable}
        other.summed = other.pooled_norms = other.prepared = []  # inference: nothing summed, pooled or prepared
        return other

    def _move_activations(self, move: bool, fuse=frozenset(), training=False):
        """Each max pooling in `movable` applies the activation of the layer before it, or none does; those in
        `fuse` (ids: `poolable` or `poolable_in_training`) are applied by that layer instead, activation and all;
        in `training` each Add in `summed` is made by the BatchNormalization before it, and each pooling in
        `pooled_norms` by the BatchNormalization before its ReLU layer. Reset on every call: another graph over the
        same layers (a feature extractor ending at the conv) may have moved it."""
        for layer in self.layers:
            layer.activation_moved = False
            if getattr(layer, "post_activation", None) is not None:
                layer.post_activation = None
            if getattr(layer, "summed_by", None) is not None:
                layer.summed_by = None
            if getattr(layer, "sum_activation", None) is not None:
                layer.sum_activation = None
            if getattr(layer, "pool_after", None) is not None:
                layer.pool_after = None
            if getattr(layer, "pooled_before", False):
                layer.pooled_before = False
        if move:
            for layer, pool, activation in self.movable:
                if id(pool) in fuse:
                    layer.pool_after, pool.pooled_before = pool, True
                else:
                    layer.activation_moved, pool.post_activation = True, activation
            for layer, relu, activation in self.absorbed:
                relu.activation_moved, layer.post_activation = True, activation
        if move and training:
            for node, add, _, index in self.summed:
                node.layer.sum_activation, add.summed_by = add.post_activation, index
            for layer, pool in self.pooled_norms:
                layer.pool_after, pool.pooled_before, pool.post_activation = pool, True, None

    def forward(self, xs: list, training: bool = False, observer=None, inference_pass: bool = False) -> list:
        """The outputs for inputs `xs`. In training, or in an `inference_pass` (predict, evaluate: no backward
        follows), a layer may pool its own output (`poolable`); a forward with neither (model(x), whose backward the
        gradient checks may call) runs the layers apart."""
        values, masks = dict(zip(self.inputs, xs)), {}  # by tensor; a mask only where a layer made one
        self._move_activations(observer is None, self.poolable_in_training if training else
                               self.poolable if inference_pass else frozenset(), training)
        residuals = {node: (other, add) for node, add, other, _ in self.summed} if training and observer is None \
            else {}
        self.cast_from = {}  # {node: its inputs' dtypes} where forward cast them: backward casts back
        # in training the layers' deferred work (lanes.defer: what the Winograd convs read of their weights) is done
        # while the caller waits for its lanes, or by the pass's end
        with lanes.deferring() if training else nullcontext():
            try:
                for layer, out_sizes in self.prepared if training else ():
                    layer.prepare_pass(out_sizes)
                return self._forward(values, masks, residuals, observer, training)
            finally:
                for layer, _ in self.prepared if training else ():
                    layer.end_pass()

    def _forward(self, values, masks, residuals, observer, training):
        for node in self.layer_nodes:
            layer = node.layer
            ins = [values[t] for t in node.inputs]
            cast = autocast_inputs(layer, ins)
            if cast is not ins:  # the cast's gradient goes back in the input's dtype (backward below)
                self.cast_from[node] = [compute_dtype(str(getattr(x, "dtype", "object"))) for x in ins]
                ins = cast
            mask = None
            if masks:
                in_masks = [masks.get(t) for t in node.inputs]
                if not node.multi_input:
                    mask = in_masks[0]
                elif any(m is not None for m in in_masks):
                    mask = in_masks
            layer.input_mask = mask
            if node.call_args:
                vars(layer).update(node.call_args)
            x = ins if node.multi_input else ins[0]
            if node in residuals:
                other, add = residuals[node]
                layer.residual = autocast(values[other], compute_dtype(add.dtype))  # as the Add would take it
            out = layer.forward(x, training)
            if observer is not None:
                observer.forward(node, out)
            out_mask = layer.compute_mask(x, mask)
            if len(layer.nodes) > 1:
                node.state = _snapshot(layer)
            if not node.multi_output:
                values[node.outputs[0]] = out
                if out_mask is not None:
                    masks[node.outputs[0]] = out_mask
                continue
            out_masks = out_mask if isinstance(out_mask, list) else [out_mask] * len(out)
            for t, v, m in zip(node.outputs, out, out_masks):
                values[t] = v
                if m is not None:
                    masks[t] = m
        return [values[t] for t in self.outputs]

    def backward(self, grads: list, need_input_grads: bool = False, observer=None) -> list:
        """Gradients w.r.t. each output in; gradients w.r.t. each input out when `need_input_grads`."""
        # the layers' deferred work (lanes.defer: the Winograd convs' kernel gradients) is done by the block's end;
        # an observer reads each layer's weight gradients as it goes, so none is deferred then
        with lanes.deferring() if observer is None else nullcontext():
            return self._backward(grads, need_input_grads, observer)

    def _backward(self, grads, need_input_grads, observer):
        acc: dict = {}  # by tensor
        if self.reads_data is None:
            self.reads_data = _reading_data(self.layer_nodes)
        held = observer is None  # a fan-out's two gradients reach a layer that reads_gradient_sum unadded
        for t, g in zip(self.outputs, grads):
            _accumulate(acc, t, g)
        for node in reversed(self.layer_nodes):
            layer = node.layer
            if node.multi_output:
                out_grads = [acc.get(t) for t in node.outputs]
                if all(g is None for g in out_grads):
                    continue  # this node does not reach any output with a loss
                g_out = [np.zeros((_batch(out_grads),) + t.shape, layer.dtype) if g is None else _added(g)
                         for g, t in zip(out_grads, node.outputs)]
            else:
                g_out = acc.get(node.outputs[0])
                if g_out is None:
                    continue
            if node.state is not None:
                vars(layer).update(node.state)
            # Nobody needs d(loss)/d(data): the first layers may skip that product (a large one for convs), also
            # after layers without weights (a Dense after a Flatten of the images); an observer sees the rest
            layer.input_grad_needed = need_input_grads or (
                node not in self.reads_data if observer is None else
                not all(isinstance(t.node.layer, InputLayer) for t in node.inputs))
            if isinstance(g_out, GradientSum) and not layer.reads_gradient_sum():
                g_out = _added(g_out)
            g_in = layer.backward(g_out)
            if observer is not None:
                observer.backward(node, g_out, g_in)
            g_in = g_in if node.multi_input else [g_in]
            if node in self.cast_from:
                g_in = [autocast(_added(g), dtype) for g, dtype in zip(g_in, self.cast_from[node])]
            for t, g in zip(node.inputs, g_in):
                _accumulate(acc, t, g, held)
        return [_added(acc.get(t)) for t in self.inputs]


def _reading_data(nodes) -> set:
    """The nodes that read only the inputs or tensors that layers without weights (Flatten, Reshape, Dropout) made
    from the inputs alone: no gradient of their inputs reaches a weight."""
    made = set()  # those tensors
    for node in nodes:
        if not node.layer.params and all(isinstance(t.node.layer, InputLayer) or t in made for t in node.inputs):
            made.update(node.outputs)
    return {node for node in nodes if all(isinstance(t.node.layer, InputLayer) or t in made for t in node.inputs)}


# passes handed to the threads ahead of the one the caller waits for, per thread: a thread held up (a busy machine
# deschedules it) keeps only its pass waiting, while the others run the passes after it
AHEAD = 4


def inference_passes(graph: Graph, batches, logits_of=()):
    """graph.forward(xb) (inference) of each batch, in order. With several BLAS threads, passes run side by side,
    one per thread on replicas of the graph, each with one BLAS thread: then NumPy's element-wise work (one core
    per call) runs on every core too. Predict at batch 512 on 2 cores, the book convnet: 46 -> 39 ms (one process,
    best of 5), the resnet: 235 -> 160 ms. `logits_of`: layers of `graph` (None for none) whose logits a fused
    loss reads (evaluate): each pass then gives (outputs, those logits) from the graph or replica it ran on."""
    where = [None if layer is None else graph.layers.index(layer) for layer in logits_of]

    def outputs(g, xb):  # copied: the next pass on this replica may reuse a layer's buffers
        outs = [o.copy() for o in g.forward(xb, training=False, inference_pass=True)]
        if not logits_of:
            return outs
        return outs, [None if i is None else g.layers[i].logits.copy() for i in where]

    batches = iter(batches)
    head = list(itertools.islice(batches, 2))
    batches = itertools.chain(head, batches)
    # one pass (a served request) runs on one BLAS thread, with no replica or thread to start
    lanes = blas.threads() if len(head) == 2 else 1
    if lanes < 2:
        with blas.one_thread():
            for xb in batches:
                yield outputs(graph, xb)
        return
    free = queue.SimpleQueue()
    free.put(graph)

    def run(xb):
        try:
            g = free.get_nowait()
        except queue.Empty:  # another thread's first pass: its replica, made there while the first pass runs
            g = graph.replica()
        try:
            return outputs(g, xb)
        finally:
            free.put(g)

    pool, pending = _pass_pool(lanes), deque()
    with blas.one_thread():
        try:
            for xb in batches:
                pending.append(pool.submit(run, xb))
                if len(pending) >= AHEAD * lanes:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (an error, the caller closed us): no pass still runs on our graphs after we return
            for future in pending:
                future.cancel()
            wait(pending)


_pass_pools: dict = {}  # {threads: the executor running inference passes}, kept for the process


def _pass_pool(threads: int) -> ThreadPoolExecutor:
    """The threads inference passes run on, started once: a pool per call started and joined its threads every
    predict (~0.1 ms of the caller's wall time; the graph replicas, ~0.07 ms of CPU, are made on those threads)."""
    pool = _pass_pools.get(threads)
    if pool is None:
        pool = _pass_pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dlcli-infer")
    return pool


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_pass_pools.clear)  # a forked child has none of its parent's threads


def _twin(layer: Layer) -> Layer:
    twin = copy.copy(layer)
    vars(twin).update(_snapshot(layer))  # its activation and inner layers too: they keep caches
    return twin


def _movable_activations(nodes, consumers, outputs) -> list:
    """(layer, max pooling) pairs where the layer's activation may run after the pooling instead: the pooling is its
    only consumer, and neither layer is shared (a shared layer's caches are per call)."""
    pairs = []
    for node in nodes:
        pool = node.layer
        if not getattr(pool, "window_maximum", False) or len(pool.nodes) != 1 or node.multi_input:
            continue
        source = node.inputs[0]
        layer = source.node.layer
        if (layer.activation_last and getattr(layer.activation, "commutes_with_max", False)
                and len(layer.nodes) == 1 and consumers[id(source)] == 1
                and not any(source is t for t in outputs)):
            pairs.append((layer, pool))
    return pairs


def _absorbed_relus(nodes, consumers, outputs, movable) -> list:
    """(layer, ReLU layer) pairs where the layer may apply the plain ReLU itself: the layer takes a post_activation
    and has none moved in from elsewhere, the ReLU layer is its output's only reader, neither is shared, and the
    ReLU does not move into a pooling itself."""
    moved = {id(layer) for pair in movable for layer in pair[:2]}
    pairs = []
    for node in nodes:
        relu = node.layer
        if (not getattr(relu, "standalone_activation", False) or not isinstance(relu.activation, activations.ReLU)
                or not relu.activation.plain or len(relu.nodes) != 1 or id(relu) in moved):
            continue
        source = node.inputs[0]
        layer = source.node.layer
        if (hasattr(layer, "post_activation") and id(layer) not in moved and len(layer.nodes) == 1
                and consumers[id(source)] == 1 and not any(source is t for t in outputs)):
            pairs.append((layer, relu))
    return pairs


def _pooled_normalisations(consumers, outputs, movable) -> list:
    """(BatchNormalization, max pooling) where in training the layer may make the pooling's output itself (a
    residual net's stem, BN -> ReLU -> MaxPooling, in one pass): the pooling takes the plain ReLU of a ReLU layer
    (`movable`) that is the layer's only reader, the layer's output is not a model output, none of them is shared,
    and the layer can pool in the pooling's windows (pools_in_training)."""
    found = []
    for relu, pool, _ in movable:
        if (not getattr(relu, "standalone_activation", False) or not isinstance(relu.activation, activations.ReLU)
                or not relu.activation.plain):
            continue
        source = relu.nodes[0].inputs[0]
        layer = source.node.layer
        if (hasattr(layer, "pools_in_training") and len(layer.nodes) == 1 and consumers[id(source)] == 1
                and not any(source is t for t in outputs) and layer.pools_in_training(pool)):
            found.append((layer, pool))
    return found


def _summed_adds(nodes, consumers, outputs) -> list:
    """(BatchNormalization node, Add layer, the Add's other input, the node's place among the Add's inputs) where the
    layer may make the Add's sum itself: two inputs of one shape, the layer's output read by the Add alone and not a
    model output, the other input made before it; neither layer shared."""
    order = {id(node): i for i, node in enumerate(nodes)}
    found = []
    for node in nodes:
        add = node.layer
        if not hasattr(add, "summed_by") or len(add.nodes) != 1 or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a.shape != b.shape:
            continue
        index = 0 if order[id(a.node)] > order[id(b.node)] else 1  # the input made last
        mine, other = node.inputs[index], node.inputs[1 - index]
        layer = mine.node.layer
        if (hasattr(layer, "sum_activation") and layer.dtype == add.dtype and len(layer.nodes) == 1
                and consumers[id(mine)] == 1
                and not any(mine is t for t in outputs) and order[id(other.node)] < order[id(mine.node)]):
            found.append((mine.node, add, other, index))
    return found


def _snapshot(obj) -> dict:
    """A layer's attributes after one call. Caches also live in sub-objects (an activation keeps its output, a
    wrapper its inner layer's inputs): those are copied, recursively, so the next call cannot overwrite them."""
    state = dict(vars(obj))
    for key, value in state.items():
        if hasattr(value, "forward") and hasattr(value, "backward") and hasattr(value, "__dict__"):
            state[key] = copy.copy(value)
            vars(state[key]).update(_snapshot(value))
    return state


def _accumulate(acc, tensor, grad, held=False):
    """The tensor's gradient so far plus grad; with `held` a second one of like arrays is kept unadded (GradientSum)
    for the layer that reads it."""
    if grad is None:
        return
    if tensor in acc:
        a, b = _added(acc[tensor]), _added(grad)
        if held and _alike(a, b) and (a.flags.c_contiguous or b.flags.c_contiguous):
            acc[tensor] = GradientSum(a, b) if a.flags.c_contiguous else GradientSum(b, a)  # a + b == b + a
        else:
            acc[tensor] = _sum(a, b)
    else:
        acc[tensor] = grad


def _added(grad):
    """A GradientSum's two gradients added (_sum); any other gradient as it is."""
    return _sum(grad.a, grad.b) if isinstance(grad, GradientSum) else grad


def _alike(a, b) -> bool:
    """Arrays of one shape and dtype."""
    return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype


def _sum(a, b):
    """a + b (a new array: the first gradient may be another layer's cache), on the lanes' ranges where both are
    contiguous arrays of one shape and dtype (a residual block's input gradient: 0.3-0.5 ms of the calling thread's
    CPU a sum at 64x14x14x32, AMD EPYC at load 14)."""
    if _alike(a, b) and a.flags.c_contiguous and b.flags.c_contiguous:
        return lanes.flat_parts(lambda out, x, y: np.add(x, y, out=out), np.empty_like(a), a, b)
    return a + b


def _batch(grads) -> int:
    return next(g.shape[0] for g in grads if g is not None)
