"""Optional extras: a feature imports its optional package through dlcli.errors.require, which names an extra that
installs it, in one line."""
import ast
import sys
import tomllib
from pathlib import Path

import pytest

from dlcli.errors import DlcliError, require

ROOT = Path(__file__).resolve().parents[1]


def require_calls():
    """(file, module, extra) of every require(...) in the package."""
    for path in sorted((ROOT / "dlcli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                yield path.relative_to(ROOT), node.args[0].value, node.args[1].value


def test_every_required_module_is_in_the_extra_it_names_and_in_the_test_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    calls = list(require_calls())
    assert len({module for _, module, _ in calls}) >= 9, calls
    for path, module, extra in calls:
        for name in (extra, "test"):
            assert any(r.startswith(module) for r in extras.get(name, ())), f"{path}: {module} not in [{name}]"


def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(DlcliError) as missing:
        require("tokenizers", "text", "the bpe tokenizer")
    assert missing.value.message == "the bpe tokenizer needs tokenizers: pip install 'dlcli[text]'"
    assert missing.value.exit_code == 1
    assert require("json", "text") is __import__("json")
