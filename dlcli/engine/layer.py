"""The Layer base class and its parameters; calling a layer on symbolic tensors (engine/graph.py) wires a graph.

A layer (Keras' shape, numpy-ml's explicit backward pass):
- `build(input_shape)` creates weights with `add_weight`; shapes never include the batch axis.
- `output_shape(input_shape)` infers the output shape without data (a list of shapes for several outputs).
- `forward(x, training)` computes and caches what `backward` needs; a layer called on a list gets a list.
- `backward(grad)` returns the gradient w.r.t. the input (None for integer inputs) and *adds* to `param.grad`.
- `get_config()` returns the constructor arguments, recorded automatically, so a layer round-trips through YAML.
"""
import functools
import inspect
import re
from collections import defaultdict

import numpy as np

from dlcli import memory
from dlcli.engine import activations, initializers, regularizers
from dlcli.errors import ShapeError
from dlcli.registry import Registry, Shape

LAYERS = Registry("layer")
register = LAYERS.register  # @register("Dense") on each layer class: the names a config may use


def ranked(name: str, family: type, rank: int, doc: str | None = None, **attributes) -> type:
    """A layer family written once for any number of spatial axes, at one rank and registered under `name`
    (`Conv2D = ranked("Conv2D", _Conv, 2)`): the class belongs to the family's module, as if written there."""
    namespace = {"rank": rank, "__doc__": doc, "__module__": family.__module__, **attributes}
    return register(name)(type(name, (family,), namespace))


class Param:
    """One weight: its value, its accumulated gradient, and how the optimizer should treat it.

    `zero_grad` clears the gradient without writing it: the array keeps the last step's values and `grad_zeroed`
    says they stand for zeros. Reading `grad` writes the zeros first, so every `param.grad += ...` adds to zeros as
    before; a layer that knows its whole contribution takes `blank_grad()` and stores it there instead (Dense's
    kernel gradient as the GEMM's output), which saves the clearing pass and the addition over each such weight
    (the book MLP's 1.6 MB of gradients: ~30 us a step of clearing alone)."""

    __slots__ = ("name", "value", "_grad", "grad_zeroed", "trainable", "regularizer", "layer")

    def __init__(self, name, value, trainable=True, regularizer=None, layer=None):
        self.name, self.value, self.trainable, self.regularizer, self.layer = name, value, trainable, regularizer, layer
        self.grad = np.zeros_like(value) if trainable else None

    @property
    def grad(self) -> np.ndarray | None:
        if self.grad_zeroed:
            self._grad.fill(0)
            self.grad_zeroed = False
        return self._grad

    @grad.setter
    def grad(self, array):
        self._grad, self.grad_zeroed = array, False

    def zero_grad(self):
        """The gradient is zero from now on; the array is written when first read (or by `blank_grad`'s user)."""
        self.grad_zeroed = self._grad is not None

    def set_training(self, training: bool):
        """Whether the weight trains from now on (a weight created trainable; fit sets it from its layer's flag): one
        out of training has no gradient, as Keras takes none for a non-trainable variable, so each layer's backward
        skips its product (they all ask `grad is not None`); one back in training starts from zeros."""
        if not training:
            self._grad, self.grad_zeroed = None, False
        elif self._grad is None:
            self.grad = np.zeros_like(self.value)

    def blank_grad(self) -> np.ndarray | None:
        """The gradient's array for a caller that writes all of it, when it holds no contribution yet (zeroed);
        None when it does (the caller adds to `grad` then) or when the weight has no gradient."""
        if not self.grad_zeroed:
            return None
        self.grad_zeroed = False
        return self._grad

    @property
    def path(self) -> str:
        return f"{self.layer.name}/{self.name}" if self.layer is not None else self.name

    def __repr__(self):
        return f"Param({self.path}, shape={self.value.shape})"


_name_counts: defaultdict = defaultdict(int)


def clear_session():
    """Restart automatic layer names (dense, dense_1 ...) as Keras' `clear_session` does: a config then builds
    the same names every time, so weights files match the model their config rebuilds."""
    _name_counts.clear()


def unique_name(prefix: str) -> str:
    """Keras-style automatic names: dense, dense_1, dense_2 ..."""
    count = _name_counts[prefix]
    _name_counts[prefix] += 1
    return prefix if count == 0 else f"{prefix}_{count}"


def snake_case(name: str) -> str:
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()  # Keras: Conv2D -> conv2d


class GradientSum:
    """The two gradients of a tensor that two layers read (a residual block's input gets its conv's and its Add's),
    not yet added: in a training step's backward pass the graph hands them on as they are to a layer that
    `reads_gradient_sum`, which adds them as it reads them (the float32 sum the graph would make: the same bits), and
    adds them itself for any other. A layer that passes its output's gradient on unchanged passes this on too. Arrays
    of one shape and dtype, `a` C-contiguous, `b` perhaps strided."""
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b


class Layer:
    supports_masking = False  # True: the incoming mask passes through unchanged (Keras' default for most layers)
    activation_last = False  # True: `activation` is the last step of forward, so a later layer may apply it
    # where a .keras file keeps the layer's variables, below the layer's own group; a (group, keys) pair reads only
    # those keys of a group (SpectralNormalization's vars repeat its layer's kernel)
    keras_weight_groups = ("vars",)
    # Keras call arguments that each call of a shared layer may set ({name: Keras' default}): also constructor
    # arguments (the first call's), and keys of a YAML entry that `shares` the layer (that call's)
    call_arguments: dict = {}
    keras_package = "keras"  # whose class of the same name a .keras file may hold for it ("keras_hub")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(cls.__init__)

    def __init__(self, name: str | None = None, input_shape: Shape = None, trainable: bool = True,
                 lr_mult: float = 1.0, dtype: str = "float32"):
        self.name = name or unique_name(snake_case(type(self).__name__))
        self.input_shape_hint = tuple(input_shape) if input_shape is not None else None
        self.trainable = trainable
        self.lr_mult = lr_mult  # learning-rate multiplier for this layer's weights
        self.dtype = dtype
        self.params: dict[str, Param] = {}
        self.built = False
        self.input_shape = None
        self.rng = np.random.default_rng(0)
        self.nodes: list = []  # one per call on symbolic tensors; > 1 means shared weights
        self.input_mask = None  # set by the graph executor before forward when a mask flows in
        self.output_fused = False  # True: the loss consumes `self.logits` and backward skips the activation
        self.activation_moved = False  # True: the max pooling after this layer applies its activation (graph.py)
        self.input_grad_needed = True  # False when the input is data: backward may return None

    # --- building -------------------------------------------------------------------------------------------
    def build(self, input_shape):
        """Create weights for `input_shape` (no batch axis). Layers without weights need not override it."""

    def output_shape(self, input_shape):
        return input_shape

    def ensure_built(self, input_shape, rng: np.random.Generator | None = None):
        """Build once; later calls only check that the shape is the one built for."""
        if self.built:
            if _shape_key(input_shape) != _shape_key(self.input_shape):
                raise ShapeError(f"layer '{self.name}' was built for input shape {_fmt(self.input_shape)} "
                                 f"but is now called on {_fmt(input_shape)}")
            return
        self.rng = rng if rng is not None else np.random.default_rng()  # unseeded: fresh entropy, as in Keras
        self.input_shape = input_shape
        self.build(input_shape)
        self.built = True

    def add_weight(self, name, shape, initializer="zeros", regularizer=None, trainable=True) -> Param:
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape):
            raise ShapeError(f"layer '{self.name}' cannot build weight '{name}' of shape {tuple(shape)} from input "
                             f"shape {_fmt(self.input_shape)}: a layer that takes one input was given several?")
        memory.check_weight_fits(self.name, name, shape, self.dtype)  # a clear refusal, not NumPy's MemoryError
        value = initializers.get(initializer)(tuple(int(s) for s in shape), self.rng, self.dtype)
        param = Param(name, value, trainable, regularizers.get(regularizer), self)
        self.params[name] = param
        return param

    # --- the three passes -------------------------------------------------------------------------------------
    def forward(self, x, training=False):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def reads_gradient_sum(self) -> bool:
        """Whether backward takes its output's gradient as a GradientSum now (the graph adds it otherwise)."""
        return False

    def compute_mask(self, x, mask):
        """The mask this layer's output carries (Keras' compute_mask)."""
        return mask if self.supports_masking else None

    # --- activations, with the fused softmax/sigmoid + cross-entropy shortcut ------------------------------------
    def activate(self, z):
        if self.output_fused:
            self.logits = z
        return z if self.activation_moved else self.activation.forward(z)

    def activation_backward(self, grad):
        # When fused, the loss already returned d(loss)/d(logits): the activation's Jacobian is folded in.
        return grad if self.output_fused or self.activation_moved else self.activation.backward(grad)

    # --- weights ----------------------------------------------------------------------------------------------
    @property
    def weights(self) -> list[Param]:
        return list(self.params.values())

    @property
    def trainable_weights(self) -> list[Param]:
        return [p for p in self.params.values() if p.trainable and self.trainable]

    @property
    def non_trainable_weights(self) -> list[Param]:
        return [p for p in self.params.values() if not (p.trainable and self.trainable)]

    def count_params(self) -> int:
        return int(sum(p.value.size for p in self.params.values()))

    def flops(self, input_shape) -> int:
        """Multiply-adds x 2 per sample for one forward pass (0 where negligible); for inspect-shapes."""
        return 0

    @staticmethod
    def keras_call(args: list, kwargs: dict) -> tuple[list, dict]:
        """A Keras functional call as (the tensors dlcli calls the layer on, layer arguments that stand for call
        arguments in a YAML graph); keyword arguments left in `kwargs` must mean nothing (training=None), or the
        import refuses them."""
        return args, {}

    def kept_size(self, input_shape) -> int:
        """Values per sample the layer keeps for its backward pass besides its output (attention's (heads, T, S)
        probabilities), for the activation-memory estimate; 0 where that is about the output's size or less."""
        return 0

    def get_weights(self) -> list[np.ndarray]:
        return [p.value.copy() for p in self.params.values()]

    def set_weights(self, values):
        assign_weights(list(self.params.values()), values, f"layer '{self.name}'")

    def regularization_loss(self) -> float:
        return sum(p.regularizer.penalty(p.value) for p in self.params.values() if p.regularizer is not None)

    def add_regularization_grads(self):
        for p in self.trainable_weights:
            if p.regularizer is not None:
                p.grad += p.regularizer.gradient(p.value)

    # --- config -----------------------------------------------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor arguments (recorded at construction), made YAML-safe: config in = config out."""
        config = {"type": type(self).__name__}
        config.update({k: to_plain(v) for k, v in self._config.items()})
        config["trainable"] = self.trainable  # as it is now, as Keras' Layer.get_config (frozen since: frozen)
        config["name"] = self.name
        return config

    # --- calling on symbolic tensors builds the graph (Keras' functional API) --------------------------------
    def __call__(self, inputs, training=False, **call_args):
        unknown = set(call_args) - set(self.call_arguments)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no call argument {', '.join(sorted(unknown))}")
        tensors = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if tensors and all(getattr(t, "symbolic", False) for t in tensors):
            return tensors[0].wire(self, inputs, call_args)  # SymbolicTensor (engine/graph.py): add a node only
        # Eager call on arrays: build from the data's shape and run forward (a call argument not given is the
        # constructor's, else Keras' default, whatever an earlier call set)
        vars(self).update({a: call_args.get(a, self._config.get(a, default)) for a, default in
                           self.call_arguments.items()})
        several = isinstance(inputs, (list, tuple))
        inputs = autocast_inputs(self, inputs) if several else autocast_inputs(self, [inputs])[0]
        shape = [tuple(a.shape[1:]) for a in inputs] if several else tuple(inputs.shape[1:])
        self.ensure_built(shape)
        return self.forward(inputs, training)

    def __repr__(self):
        return f"<{type(self).__name__} '{self.name}'>"


def numpy_dtype(dtype: str) -> np.dtype:
    """An input's dtype name as NumPy's: "string" (text read by StringLookup, Hashing, HashedCrossing at the data
    edge) is any NumPy text array, sized here as object pointers."""
    return np.dtype(object) if dtype == "string" else np.dtype(dtype)


@functools.cache
def compute_dtype(dtype: str) -> np.dtype | None:
    """The dtype a layer of `dtype` computes in, if floating (Keras casts floating inputs to it), else None."""
    dtype = numpy_dtype(dtype)
    return dtype if dtype.kind == "f" else None


def autocast(x, dtype: np.dtype | None):
    """`x` in `dtype` if both are floating (None: not floating) and differ, else `x` itself."""
    return x.astype(dtype) if dtype is not None and _floating_other_than(x, dtype) else x


def autocast_inputs(layer: "Layer", inputs: list) -> list:
    """Keras 3's autocast (Layer.__call__, dtype_policy.convert_input), one home for the graph, a layer called on
    arrays and generate's cached decoder: each floating array among `inputs` in the layer's dtype where that is
    floating (a lookup's int or string layer casts nothing); `inputs` itself where nothing changes."""
    compute = compute_dtype(layer.dtype)
    if compute is None or not any(_floating_other_than(x, compute) for x in inputs):
        return inputs
    return [autocast(x, compute) for x in inputs]


def _floating_other_than(x, dtype: np.dtype) -> bool:
    return getattr(x, "dtype", dtype) != dtype and x.dtype.kind == "f"


def build_seeded(layer: Layer, input_shape, rng: np.random.Generator):
    """Build `layer` with a generator of its own drawn from `rng`, the model's seeded stream: layers built in the
    same order get the same weights and dropout streams every time, and never share one. A built (shared) layer
    draws nothing."""
    if not layer.built:
        layer.ensure_built(input_shape, np.random.default_rng(int(rng.integers(2**63))))


def assign_weights(params: list[Param], values, owner: str):
    """Copy arrays into params in order, checking count and shapes (Keras' set_weights)."""
    if len(values) != len(params):
        raise ShapeError(f"{owner} has {len(params)} weight arrays; got {len(values)}")
    for p, v in zip(params, values):
        v = np.asarray(v)
        if v.shape != p.value.shape:
            raise ShapeError(f"weight '{p.path}' has shape {p.value.shape}; got an array of shape {v.shape}")
        p.value = v.astype(p.value.dtype, copy=True)


def _recording_init(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        outermost = "_config" not in self.__dict__
        if outermost:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            config = dict(bound.arguments)
            config.pop("self")
            config.update(config.pop("kw", {}) or {})
            config.update(config.pop("kwargs", {}) or {})
            self.__dict__["_config"] = config
        init(self, *args, **kwargs)
        if outermost:
            # base-class arguments a subclass passes through **kw, with their defaults filled in
            self._config.setdefault("trainable", self.trainable)
            self._config.pop("name", None)
            if self.input_shape_hint is not None:
                self._config["input_shape"] = list(self.input_shape_hint)
            else:
                self._config.pop("input_shape", None)
            if self.lr_mult != 1.0:
                self._config["lr_mult"] = self.lr_mult
            else:
                self._config.pop("lr_mult", None)
            self._config.pop("dtype", None)

    return wrapper


def to_plain(value):
    """YAML-safe form of a constructor argument (initializers, activations, layers, tuples)."""
    if isinstance(value, initializers.Initializer):
        return initializers.serialize(value)
    if isinstance(value, regularizers.Regularizer):
        return value.get_config()
    if isinstance(value, activations.Activation):
        return value.name
    if isinstance(value, Layer):
        return value.get_config()
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _shape_key(shape):
    return [tuple(s) for s in shape] if isinstance(shape, list) else tuple(shape)


def _fmt(shape) -> str:
    if isinstance(shape, list):
        return "[" + ", ".join(_fmt(s) for s in shape) + "]"
    return "(None, " + ", ".join(str(s) for s in shape) + ")" if shape else "(None,)"


format_shape = _fmt
