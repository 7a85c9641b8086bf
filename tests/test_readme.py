"""README.md stays true: its YAML examples are valid configs and its two commands are the ones CI runs."""
import re
from pathlib import Path

import pytest

from dlcli.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def yaml_blocks():
    return re.findall(r"```yaml\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(yaml_blocks())))
def test_readme_configs_validate(index):
    text = yaml_blocks()[index]
    if "compile:" not in text and "extends:" not in text:  # a fragment (the functional graph): wrap it in the minimum around it
        text = "data: {type: mnist}\n" + text + "compile: {loss: sparse_categorical_crossentropy}\n"
    # written as if they were files in configs/ (so `extends: mnist.yaml` finds the shipped config)
    config = parse_config(text, source=str(ROOT / "configs" / f"README.md yaml block {index}"))
    from dlcli.builder import build_model

    build_model(config)  # names, shapes and schedules all resolve


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && python -m pytest -q' in README
    assert 'pip install -e ".[test]" && python -m pytest -q' in ci
    assert "pip install -e . && DLCLI_DATA_DIR=../shared/datasets dlcli train configs/mnist.yaml" in README
