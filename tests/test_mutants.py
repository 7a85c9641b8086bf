"""tools/mutate.py's mutants stay aimed: each snippet it replaces is still in its file exactly once, and the tests
meant to catch it still exist. A refactor that moved a line used to leave a mutant quietly stale until the next
mutation run."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutate  # noqa: E402 (tools/ is not a package)


def test_every_mutant_snippet_occurs_once_in_its_file():
    mutate.check_snippets(list(mutate.MUTANTS))  # SystemExit naming the mutant otherwise


def test_every_mutants_tests_exist():
    for name, (_, _, _, tests) in mutate.MUTANTS.items():
        for test in tests:
            file, _, function = test.partition("::")
            assert (ROOT / file).is_file(), f"mutant {name}: no {file}"
            function = function.split("[")[0]
            assert not function or re.search(rf"^def {function}\(", (ROOT / file).read_text(), re.M), \
                f"mutant {name}: no {test}"
