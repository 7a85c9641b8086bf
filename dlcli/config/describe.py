"""What a config error says about types and values: 'expected an integer or a list of 2 integers, found 'abc''.

`describe` words an annotation, `expected` a pydantic error, `found` the value; `type_adapter` checks a value against an
annotation (pydantic, lax as YAML users expect) and `plain` turns what it returns back into YAML's lists."""
import types
import typing
from typing import Annotated, Literal

from pydantic import TypeAdapter

_EXPECTED = {"int": "an integer", "float": "a number", "finite_number": "a finite number", "bool": "true or false",
             "string": "a string", "list": "a list", "tuple": "a list", "dict": "a mapping", "model": "a mapping",
             "model_attributes": "a mapping", "mapping": "a mapping", "none_required": "null"}


def expected(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    base = kind.split("_")[0] if kind.split("_")[0] in ("int", "float", "bool") else kind.removesuffix("_type")
    if base in _EXPECTED:
        return _EXPECTED[base]
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        return f"a value {bounds[kind]} {next(iter(ctx.values()))}"
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind == "too_short":
        return f"at least {ctx.get('min_length')} item{'s' if ctx.get('min_length') != 1 else ''}"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} items"
    msg = err.get("msg", kind)
    return msg[:1].lower() + msg[1:].removeprefix("nput should be ").removeprefix("Input should be ")


def found(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        text = repr(list(value))
        return f"the list {text}" if len(text) <= 40 else f"a list of {len(value)} items"
    return f"a {type(value).__name__}"


_ADAPTERS: dict = {}


def type_adapter(annotation):
    if annotation is None:
        return None
    try:
        if annotation not in _ADAPTERS:
            try:
                _ADAPTERS[annotation] = TypeAdapter(annotation)
            except Exception:  # an annotation pydantic cannot check (a custom class): leave it to the constructor
                _ADAPTERS[annotation] = None
        return _ADAPTERS[annotation]
    except TypeError:  # unhashable annotation
        return None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
               list: "a list", dict: "a mapping", tuple: "a list"}


def describe(annotation) -> str:
    """'int | tuple[int, int]' -> 'an integer or a list of 2 integers'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return describe(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple) and args:
        if origin is tuple and Ellipsis not in args:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {plural(args[0])}"
            return "a list of (" + ", ".join(describe(a) for a in args) + ")"
        return f"a list of {plural(args[0])}"
    if origin is dict and args:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}"
    if annotation in _TYPE_WORDS:
        return _TYPE_WORDS[annotation]
    if origin in _TYPE_WORDS:
        return _TYPE_WORDS[origin]
    return getattr(annotation, "__name__", str(annotation))


def plural(annotation) -> str:
    words = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
    return words.get(annotation, f"({describe(annotation)})")


def plain(value):
    """Pydantic may return tuples; configs hold lists (YAML has no tuples)."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value

