"""Suite-wide setup: where the real datasets are. $DLCLI_DATA_DIR when set, else ../shared/datasets beside the
checkout (then DLCLI_DATA_DIR is pointed there, so the code under test finds the same files). Tests that need a
dataset call require_dataset and skip, saying where they looked, when it is absent."""
import os
from pathlib import Path

import pytest

SHARED_DATASETS = (Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets").resolve()

# read once, here: tests/data's fixtures unset $DLCLI_DATA_DIR around each test
if os.environ.get("DLCLI_DATA_DIR"):
    DATASETS_DIR = Path(os.environ["DLCLI_DATA_DIR"]).expanduser().resolve()
    _LOOKED = f"$DLCLI_DATA_DIR ({DATASETS_DIR})"
else:
    DATASETS_DIR = SHARED_DATASETS
    _LOOKED = f"{SHARED_DATASETS}, beside the checkout, as $DLCLI_DATA_DIR is not set"
    if SHARED_DATASETS.is_dir():
        os.environ["DLCLI_DATA_DIR"] = str(SHARED_DATASETS)


def require_dataset(name: str) -> Path:
    """DATASETS_DIR/name (e.g. "mnist", "imdb-reviews"), or skip the test saying where it looked."""
    folder = DATASETS_DIR / name
    if not folder.is_dir():
        pytest.skip(f"needs the dataset folder {name}/ (looked in {_LOOKED}); set DLCLI_DATA_DIR to a folder "
                    f"holding {name}/")
    return folder


require_shared = require_dataset  # the old name, for branches written before require_dataset


@pytest.fixture(params=["numba", "numpy"])
def kernel_path(request, monkeypatch):
    """Both kernel paths (dlcli/kernels): the Numba kernels and their NumPy twins."""
    monkeypatch.setenv("DLCLI_KERNELS", request.param)
    return request.param
