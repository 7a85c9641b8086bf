"""Config composition: `extends: base.yaml` (or a list of files, merged in order) under a config's top level.

Paths are relative to the file that names them. Mappings merge deeply; lists and scalars replace; `null` deletes the
key it is written over; a spec whose `type` changes (`optimizer: {type: sgd}` over `{type: adam, beta_1: 0.8}`)
replaces the old spec instead of merging arguments meant for another class, and a mapping without `type` merged over
a bare name (`optimizer: {learning_rate: 0.01}` over `optimizer: rmsprop`) fills that name's arguments, as `--set`
does. Every value keeps the file and line it was written at, so errors point into the right file.
"""
import copy
import os
from pathlib import Path

from dlcli.yaml_lines import Document, Issue, forget, parse_document


def compose_document(text: str, source: str, promotable=lambda path: False) -> Document:
    """Parse `text` (read from `source`) and everything it extends into one Document.

    A missing or unreadable base, a cycle, or a YAML syntax error anywhere leaves `data` None with the issues (naming
    the chain of files), since whatever was merged without that file would only produce misleading errors.
    """
    return _compose(text, source, (), promotable)


def _compose(text: str, source: str, chain: tuple, promotable) -> Document:
    doc = parse_document(text, source)
    if not isinstance(doc.data, dict) or "extends" not in doc.data:
        return doc
    bases = doc.data.pop("extends")
    where = doc.lines.get(("extends",), (source, 0))
    doc.key_lines.pop(("extends",), None)
    if isinstance(bases, str):
        bases, paths = [bases], [("extends",)]
    elif isinstance(bases, list) and bases and all(isinstance(b, str) for b in bases):
        paths = [("extends", i) for i in range(len(bases))]
    else:
        doc.issues.append(doc.issue(("extends",), "expected a config file path or a list of them (relative to "
                                                  f"this file), e.g. extends: mnist.yaml; found {bases!r}"))
        doc.data = None
        return doc
    here = (*chain, source)
    merged = None
    for base, path in zip(bases, paths):
        target = os.path.normpath(Path(source).parent / base)
        at, order = doc.at(doc.lines.get(path, where))
        if any(_same_file(target, seen) for seen in here):
            cycle = " -> ".join([*here[[_same_file(target, s) for s in here].index(True):], target])
            doc.issues.append(Issue(at, "extends", f"a cycle of extends: {cycle}", order))
            doc.data = None
            return doc
        try:
            base_text = Path(target).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = "file not found" if isinstance(e, FileNotFoundError) else str(e)
            doc.issues.append(Issue(at, "extends", f"cannot read {target}: {reason} (extends chain: "
                                                   f"{' -> '.join([*here, target])})", order))
            doc.data = None
            return doc
        base_doc = _compose(base_text, target, here, promotable)
        if base_doc.data is not None and not isinstance(base_doc.data, dict):
            base_doc.issues.append(base_doc.issue((), "a config that is extended must be a mapping of sections"))
            base_doc.data = None
        if merged is None:
            merged = base_doc
        else:
            _merge_documents(merged, base_doc, promotable)
        if base_doc.data is None:
            merged.data = None
    _merge_documents(merged, doc, promotable)
    merged.source = source
    return merged


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _merge_documents(dst: Document, src: Document, promotable):
    """Merge `src` over `dst` in place (data, line tables, issues, files)."""
    dst.issues.extend(src.issues)
    dst.files.extend(f for f in src.files if f not in dst.files)
    if dst.data is None or src.data is None:
        dst.data = None
        return
    _merge(dst, src, dst.data, src.data, (), promotable)


def _merge(dst: Document, src: Document, into: dict, over: dict, path: tuple, promotable):
    for key, value in over.items():
        child = (*path, key)
        old = into.get(key)
        if value is None:  # `null` deletes what a base file wrote
            into.pop(key, None)
            forget(dst, child, inclusive=True)
            continue
        if isinstance(old, str) and isinstance(value, dict) and "type" not in value and promotable(child):
            old = into[key] = {"type": old}
            dst.lines[(*child, "type")] = dst.lines.get(child, (dst.source, 0))
        if isinstance(old, dict) and isinstance(value, dict) and old.get("type", value.get("type")) == \
                value.get("type", old.get("type")):
            _copy_lines(dst, src, child, only_self=True)
            _merge(dst, src, old, value, child, promotable)
            continue
        into[key] = copy.deepcopy(value)
        forget(dst, child, inclusive=True)
        _copy_lines(dst, src, child)


def _copy_lines(dst: Document, src: Document, path: tuple, only_self: bool = False):
    n = len(path)
    for table_src, table_dst in ((src.lines, dst.lines), (src.key_lines, dst.key_lines)):
        for p, where in table_src.items():
            if p[:n] == path and (len(p) == n or not only_self):
                table_dst[p] = where
