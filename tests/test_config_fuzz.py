"""Config fuzzing (hypothesis): mutate every shipped config (delete keys, swap types, huge and negative numbers,
unicode, deep nesting, unknown keys, YAML tags) and check each outcome is a built model or an exit-2 error whose
every line is `file:line: ...`: never a traceback (any other exception fails the test), never a hang (deadline).

CI runs FUZZ_EXAMPLES per config (default 40, about 300 in all); by hand: DLCLI_FUZZ_EXAMPLES=2000 python -m
pytest -q tests/test_config_fuzz.py
"""
import math
import os
import re
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dlcli.builder import build_model  # noqa: E402
from dlcli.config import parse_config  # noqa: E402
from dlcli.errors import ConfigError, DlcliError  # noqa: E402

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
EXAMPLES = int(os.environ.get("DLCLI_FUZZ_EXAMPLES", "40"))

scalars = st.one_of(
    st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, -2**63, 10**20]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308, -1e-308, math.inf]),
    st.text(max_size=12), st.sampled_from(["", "ünïcödé", "名前", "\u202e", "relu", "Dense", "../../x", "a/b"]),
    st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
TAGS = ["!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14",
        "!!float nan", "!!str 5", "&a [*a]", "!custom 3", "!!omap [a: 1]"]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _parent(data, path):
    node = data
    for p in path[:-1]:
        node = node[p]
    return node


def _mutate(draw, data):
    paths = [p for p in _paths(data) if p]
    path = draw(st.sampled_from(paths))
    parent, key = _parent(data, path), path[-1]
    op = draw(st.sampled_from(["delete", "replace", "replace", "nest", "add_key", "deep"]))
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = draw(values)
    elif op == "nest":
        parent[key] = [parent[key]] if draw(st.booleans()) else {"type": parent[key]}
    elif op == "add_key" and isinstance(parent[key], dict):
        parent[key][draw(st.text(min_size=1, max_size=8))] = draw(values)
    elif op == "deep":
        deep = draw(scalars)
        for _ in range(draw(st.integers(5, 60))):
            deep = [deep] if draw(st.booleans()) else {"k": deep}
        parent[key] = deep


def _check_outcome(text: str, source: str):
    try:
        build_model(parse_config(text, source))
    except DlcliError as e:
        assert e.exit_code == 2, f"exit {e.exit_code} for a bad config:\n{e.message}"
        if isinstance(e, ConfigError) and getattr(e, "issues", None):
            for issue in e.issues:
                line = str(issue)
                assert re.match(rf"{re.escape(source)}:\d+: ", line) or line.startswith("--set "), line


@pytest.fixture(autouse=True)
def small_machine(monkeypatch):
    """Pretend 256 MiB are free, so a fuzzed `units: 10**8` is refused instead of allocated."""
    monkeypatch.setattr("dlcli.memory.available_bytes", lambda: 256 << 20)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_mutated_configs_build_or_exit_2_with_file_line(config):
    original = yaml.safe_load(config.read_text())
    source = str(config.with_name(f"fuzzed-{config.name}"))

    # no shrinking: a failure prints its draws at once instead of minutes of shrinking in CI
    @settings(max_examples=EXAMPLES, deadline=5000, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(st.data())
    def run(data):
        mutated = yaml.safe_load(yaml.safe_dump(original))
        for _ in range(data.draw(st.integers(1, 3))):
            _mutate(data.draw, mutated)
        text = yaml.safe_dump(mutated, allow_unicode=True, sort_keys=False)
        if data.draw(st.integers(0, 4)) == 0:  # a YAML tag or alias in place of one value
            lines = [i for i, line in enumerate(text.splitlines()) if re.match(r"\s*[\w-]+: \S", line)]
            if lines:
                i = data.draw(st.sampled_from(lines))
                rows = text.splitlines()
                rows[i] = rows[i].split(": ", 1)[0] + ": " + data.draw(st.sampled_from(TAGS))
                text = "\n".join(rows) + "\n"
        _check_outcome(text, source)

    run()
