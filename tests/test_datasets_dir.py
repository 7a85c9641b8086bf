"""The suite finds the real datasets where the user keeps them: $DLCLI_DATA_DIR first, else ../shared/datasets."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import pytest
from tests.conftest import require_dataset
try:
    print("found", require_dataset("mnist"))
except pytest.skip.Exception as e:
    print("skipped", e.msg)
"""


def probe(**env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "DLCLI_DATA_DIR"} | env
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environ, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_require_dataset_honours_dlcli_data_dir_and_says_where_it_looked(tmp_path):
    (tmp_path / "mine" / "mnist").mkdir(parents=True)
    assert probe(DLCLI_DATA_DIR=str(tmp_path / "mine")) == f"found {tmp_path / 'mine' / 'mnist'}"
    (tmp_path / "empty").mkdir()
    skipped = probe(DLCLI_DATA_DIR=str(tmp_path / "empty"))
    assert skipped.startswith("skipped needs the dataset folder mnist/ (looked in $DLCLI_DATA_DIR "
                              f"({tmp_path / 'empty'}))")
