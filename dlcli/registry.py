"""A closed, explicit name -> object registry (Caffe's layer factory, Keras' `get(identifier)`)."""
import difflib
import inspect
from typing import Annotated, Any, NamedTuple

from dlcli.errors import ConfigError


class _SizeMark:
    """Marks a size argument in a signature: the config checker requires a positive integer or a list of them."""

    def __repr__(self):
        return "size"


SIZE = _SizeMark()
Size = Annotated[int, SIZE]  # units: Size, num_heads: Size
Sizes = Annotated[Any, SIZE]  # kernel_size: Sizes, an int or a list of ints (nested pairs too)
Shape = Annotated[list[int], SIZE]  # input_shape: Shape


def is_size(annotation) -> bool:
    return any(m is SIZE for m in getattr(annotation, "__metadata__", ()))


def did_you_mean(name: str, known) -> str:
    known = [k for k in known if isinstance(k, str)]  # a malformed config may hold lists or numbers as names
    # difflib finds the candidates; the fewest typing edits picks among them, so a swap of two letters ('adma')
    # means 'adam' rather than the longer 'adamax' difflib ranks first
    close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.6)
    # and case-insensitively ('dense' -> 'Dense', 'Rellu' -> 'ReLU', which case-sensitive difflib ranks below
    # 'GRUCell')
    lowered = {k.lower(): k for k in known}
    close += [lowered[k] for k in difflib.get_close_matches(str(name).lower(), lowered, n=5, cutoff=0.6)]
    close = sorted(dict.fromkeys(close), key=lambda k: _edits(str(name).lower(), k.lower()))[:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _edits(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of neighbours turning a into b (optimal string alignment)."""
    previous, current = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        before, previous, current = previous, current, [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], before[j - 2] + 1)
    return current[-1]


class Registry:
    def __init__(self, kind: str, name_attribute: str | None = None):
        """name_attribute: set on each class registered to the first name it is registered under, so that name (the
        one its config is written with: an optimizer's or loss's `name`) is given once, in the decorator."""
        self.kind, self.name_attribute = kind, name_attribute
        self._items: dict = {}

    def register(self, *names: str):
        def add(obj):
            for name in names or (obj.__name__,):
                if name in self._items:
                    raise ValueError(f"duplicate {self.kind} name '{name}'")
                self._items[name] = obj
            if self.name_attribute and names:
                setattr(obj, self.name_attribute, names[0])
            return obj

        return add

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str):
        if name not in self._items:
            raise ConfigError(self.unknown_message(name))
        return self._items[name]

    def create(self, identifier):
        """An instance from a name ('adam') or a {type: name, **args} mapping. A wrong argument name is a
        ConfigError listing the accepted ones: the constructor's and those it passes on through **kw."""
        if isinstance(identifier, dict):
            if "type" not in identifier:
                raise ConfigError(f"a {self.kind} mapping needs a 'type' key (the {self.kind} name); got {identifier}")
            name, args = identifier["type"], {k: v for k, v in identifier.items() if k != "type"}
        elif isinstance(identifier, str):
            name, args = identifier, {}
        else:
            raise ConfigError(f"a {self.kind} is a name or a {{type: name, ...}} mapping; got {identifier!r}")
        cls = self.get(name)
        params, takes_any = parameters(cls)
        unknown = [k for k in args if k not in params]
        if unknown and not takes_any:
            raise ConfigError(f"{self.kind} '{cls.__name__}' has no argument '{unknown[0]}'"
                              f"{did_you_mean(unknown[0], params)}; accepted: {', '.join(params) or 'none'}")
        return cls(**args)

    def unknown_message(self, name) -> str:
        return f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; known: {', '.join(self.names())}"


class Parameter(NamedTuple):
    annotation: Any  # None when not annotated (or not resolvable): not checked
    required: bool
    default: Any  # inspect.Parameter.empty when it has none


def parameters(target, skip_data_args=False) -> tuple[dict[str, Parameter], bool]:
    """{name: Parameter} a config may give `target`, and whether it takes any key (**kw): the one binder of a spec's
    keys to a signature, used by `Registry.create`, the config checker, the Keras importer and `dlcli list`.

    A class's keyword arguments come from its __init__ and, through `**kw`, from the classes it passes them on to
    (every layer passes name/trainable/lr_mult/input_shape to Layer). For loss/metric functions the leading
    arguments without defaults (y_true, y_pred) are the data, not config.
    """
    params: dict = {}
    if inspect.isclass(target):
        functions = [k.__dict__["__init__"] for k in target.__mro__ if "__init__" in k.__dict__ and k is not object]
        skip_first = True
        if not functions:
            return params, False
    else:
        functions, skip_first = [target], False
    for fn in functions:
        try:
            signature = _signature(fn)
        except (TypeError, ValueError):
            return params, True
        items = list(signature.parameters.values())[1 if skip_first else 0:]
        takes_more = False
        for p in items:
            if p.kind is p.VAR_KEYWORD:
                takes_more = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in params:
                # only the class's own arguments can be required: a parent's without a default is given by the
                # subclass itself (SimpleRNN passes Recurrent its recurrent_activation, ConvLSTM its filters as
                # units), so it is no key of the subclass's config (given, it would reach the parent twice)
                required = p.default is p.empty and fn is functions[0]
                if p.default is p.empty and fn is not functions[0]:
                    continue
                if required and skip_data_args and not inspect.isclass(target):
                    continue
                annotation = p.annotation if p.annotation is not p.empty else None
                if isinstance(annotation, str):
                    annotation = None  # unresolvable forward reference: not checked
                params[p.name] = Parameter(annotation, required, p.default)
        if not takes_more:
            return params, False
    return params, True


def _signature(fn):
    try:
        return inspect.signature(fn, eval_str=True)
    except NameError:
        return inspect.signature(fn)
