"""YAML that remembers where each value came from: a file line, or a `--set key.path=value` override.

`safe_load` forgets line numbers, so configs are composed into nodes (same safe tags) and converted by hand,
recording the line of every key and value by path (`("model", "layers", 1, "units")`). Overrides edit that tree
and record themselves as the source of what they wrote, so an error can say `--set model.layers.1.units=abc`.
"""
import re
from dataclasses import dataclass, field

import yaml

# YAML 1.1 (PyYAML) reads `1e-3` as a string; YAML 1.2 and every user mean the float.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` plus YAML 1.2 floats without a dot (`1e-3`)."""


class Dumper(yaml.SafeDumper):
    """Block style; lists of scalars (shapes, metric names) in flow style; quotes what Loader would misread."""


for _cls in (Loader, Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _represent_list(dumper, data):
    flat = all(not isinstance(v, (dict, list, tuple)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=bool(data) and flat)


Dumper.add_representer(list, _represent_list)
Dumper.add_representer(tuple, _represent_list)


def dump_yaml(data: dict) -> str:
    """Block-style YAML keeping the dict's key order; `load_yaml` reads back an equal value."""
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)


def load_yaml(text: str):
    return yaml.load(text, Loader=Loader)


@dataclass
class Issue:
    """One problem: where it is (`file:line` or `--set ...`), the YAML path, and what is wrong."""

    where: str
    path: str
    message: str
    order: tuple = (0, 0)

    def __str__(self):
        return f"{self.where}: {self.path}: {self.message}" if self.path else f"{self.where}: {self.message}"


def format_path(path) -> str:
    return ".".join(str(p) for p in path)


def flatten(value, prefix: str = "") -> dict:
    """{'a': {'b': [1, {'c': 2}]}} -> {'a.b.0': 1, 'a.b.1.c': 2}: the dotted paths --set uses (an empty mapping or
    list is a value of its own)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out if out or not prefix else {prefix: value}


@dataclass
class Document:
    """Plain data parsed from YAML, plus where each path came from."""

    source: str
    data: object = None
    lines: dict = field(default_factory=dict)       # path -> (file, line) of its value
    key_lines: dict = field(default_factory=dict)   # path -> (file, line) of its key
    overrides: dict = field(default_factory=dict)   # path -> (the override's source, its position)
    issues: list = field(default_factory=list)      # problems found while reading (duplicate keys, bad --set)
    files: list = field(default_factory=list)       # every file read, in reading order (`extends:` bases first)

    def __post_init__(self):
        self.files = self.files or [self.source]

    def at(self, where: tuple) -> tuple[str, tuple]:
        """`file:line` and a sort key (files in reading order, then lines) for a (file, line) pair."""
        file, line = where
        rank = self.files.index(file) if file in self.files else len(self.files)
        return f"{file}:{line}", (0, rank, line)

    def locate(self, path, at_key: bool = False) -> tuple[str, tuple]:
        """(`file:line` or `--set ...`, sort key) for the innermost known source of `path`."""
        path = tuple(path)
        if at_key and path in self.key_lines:
            return self.at(self.key_lines[path])
        for i in range(len(path), -1, -1):
            prefix = path[:i]
            if prefix in self.overrides:
                return self.overrides[prefix][0], (1, self.overrides[prefix][1])
            if prefix in self.lines:
                return self.at(self.lines[prefix])
        return self.source, (0, 0)

    def issue(self, path, message: str, at_key: bool = False) -> Issue:
        where, order = self.locate(path, at_key)
        return Issue(where, format_path(path), message, order)


def parse_document(text: str, source: str) -> Document:
    """Compose `text` with the safe loader, keeping lines; a syntax error becomes an Issue with its line."""
    doc = Document(source)
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            doc.data = _convert(node, (), doc, loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if e.context_mark is not None and "<stream end>" in str(e.problem):
            mark = e.context_mark  # an unclosed bracket or quote: where it opened is where to look
        line = mark.line + 1 if mark is not None else 0
        context = f" ({e.context} at line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        doc.issues.append(Issue(f"{source}:{line}" if line else source, "",
                                f"YAML syntax error: {e.problem}{context}", (0, 0, line)))
    except yaml.YAMLError as e:
        doc.issues.append(Issue(source, "", f"YAML error: {e}"))
    except _Unsafe as e:
        doc.data = None
        message, line = e.args
        doc.issues.append(Issue(f"{source}:{line}", "", message, (0, 0, line)))
    finally:
        loader.dispose()
    return doc


MAX_NODES = 200_000  # a config is a few hundred values; aliases repeated inside aliases ("billion laughs") are not


class _Unsafe(Exception):
    """A document whose aliases recurse or expand past MAX_NODES: reported as one error, never a hang."""


def _convert(node, path, doc: Document, loader, active=()):
    loader.dlcli_nodes = getattr(loader, "dlcli_nodes", 0) + 1
    if loader.dlcli_nodes > MAX_NODES:
        raise _Unsafe(f"the document expands to more than {MAX_NODES:,} values (aliases repeated inside aliases?)",
                      node.start_mark.line + 1)
    if id(node) in active:
        raise _Unsafe(f"{format_path(path) or 'the document'}: a YAML alias refers to a node containing it "
                      f"(a structure that never ends)", node.start_mark.line + 1)
    doc.lines.setdefault(path, (doc.source, node.start_mark.line + 1))
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        active = (*active, id(node))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # `<<: *anchor` merge keys, as safe_load does
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (dict, list)):
                doc.issues.append(Issue(f"{doc.source}:{line}", format_path(path),
                                        "keys must be plain names or numbers", (0, 0, line)))
                continue
            child = (*path, key)
            if key in out:
                doc.issues.append(Issue(f"{doc.source}:{line}", format_path(child),
                                        f"duplicate key '{key}' (first given at line {doc.key_lines[child][1]})",
                                        (0, 0, line)))
                continue
            doc.key_lines[child] = (doc.source, line)
            doc.lines[child] = (doc.source, value_node.start_mark.line + 1)
            out[key] = _convert(value_node, child, doc, loader, active)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc, loader, active) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


# --- overrides: --set key.path=value, --seed, --name, a sweep trial's values ----------------------------------------
@dataclass(frozen=True)
class Override:
    """One value set over a config's document; `source` is what an error about it names (`--seed 3`)."""

    key: str  # the dotted path, as --set writes it: model.layers.1.units
    value: object
    source: str


def apply_override(doc: Document, override, position: int, promotable=lambda path: False):
    """Apply one override to `doc`: an `Override`, or the text of a `--set key.path=value` (value parsed as YAML);
    problems become doc.issues, named by the override's source.

    Digits index lists (`model.layers.1.units`); missing mappings on the way are created (the schema then names
    unknown keys). A string where `promotable(path)` holds is a `{type: name}` spec: setting into it turns
    `optimizer: rmsprop` into `{type: rmsprop, learning_rate: ...}`.
    """
    if isinstance(override, str):
        override = _parse_set(doc, override, position)
        if override is None:
            return
    where = override.source

    def fail(message):
        doc.issues.append(Issue(where, "", message, (1, position)))

    parts = [p.strip() for p in override.key.strip().split(".")]
    if not all(parts):
        return fail(_KEY_VALUE)
    if not isinstance(doc.data, dict):
        doc.data = {}
    node, path = doc.data, ()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                index = int(part)
            except ValueError:
                return fail(f"{format_path(path)} is a list: use an index 0..{len(node) - 1}, not '{part}'")
            if not -len(node) <= index < len(node):
                return fail(f"{format_path(path)} has {len(node)} items (indices 0..{len(node) - 1}); "
                            f"index {index} is out of range")
            step = index % len(node)
        else:
            step = int(part) if part.isdigit() and part not in node else part
        child = (*path, step)
        if last:
            forget(doc, child)
            node[step] = override.value
            doc.overrides[child] = (where, position)
            return
        nxt = node.get(step) if isinstance(node, dict) else node[step]
        if nxt is None and isinstance(node, dict):
            nxt = node[step] = {}
            doc.overrides[child] = (where, position)
        elif isinstance(nxt, str) and promotable(child):
            nxt = node[step] = {"type": nxt}
            doc.lines[(*child, "type")] = doc.lines.get(child, (doc.source, 0))
        elif not isinstance(nxt, (dict, list)):
            return fail(f"{format_path(child)} is {_kind(nxt)}, not a mapping or list: "
                        f"cannot set '{'.'.join(parts[i + 1:])}' inside it")
        node, path = nxt, child


_KEY_VALUE = "expected key.path=value, e.g. --set train.epochs=1 or --set model.layers.1.units=256"


def _parse_set(doc: Document, text: str, position: int) -> Override | None:
    """`--set key.path=value` as an Override (the value parsed as YAML); None after recording why it is not one."""
    where = f"--set {text}"
    key, eq, raw = text.partition("=")
    if not eq or not all(p.strip() for p in key.split(".")):
        doc.issues.append(Issue(where, "", _KEY_VALUE, (1, position)))
        return None
    try:
        return Override(key, load_yaml(raw), where)
    except yaml.YAMLError as e:
        doc.issues.append(Issue(where, "", f"the value '{raw}' is not valid YAML: {getattr(e, 'problem', e)}",
                                (1, position)))
        return None


def forget(doc: Document, path, inclusive: bool = False):
    """The lines recorded under `path` (and for `path` itself when inclusive) no longer describe anything: its value
    is replaced."""
    n = len(path) - inclusive
    for table in (doc.lines, doc.overrides, doc.key_lines):
        for p in [p for p in table if len(p) > n and p[:len(path)] == path]:
            del table[p]


def _kind(value) -> str:
    return f"the {type(value).__name__} {value!r}" if value is not None else "null"
