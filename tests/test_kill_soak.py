"""A CI-sized kill soak (tools/kill_soak.py): SIGKILL a run at random moments, resume, end bit-identical."""
import importlib.util
from pathlib import Path


def test_random_kills_then_resume_end_bit_identical(tmp_path):
    path = Path(__file__).resolve().parents[1] / "tools" / "kill_soak.py"
    spec = importlib.util.spec_from_file_location("kill_soak", path)
    kill_soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kill_soak)
    lines = []
    totals = kill_soak.soak(trials=2, seed=1, workdir=tmp_path, log=lines.append)
    assert totals["kills"] >= 3, lines  # seed 1 kills the first trial four times
    assert totals["identical"] == 2, "\n".join(lines)
