"""Suite-wide setup: point DLCLI_DATA_DIR at ../shared/datasets when it exists (tests needing it skip otherwise)."""
import os
from pathlib import Path

import pytest

SHARED_DATASETS = (Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets").resolve()

if SHARED_DATASETS.is_dir() and "DLCLI_DATA_DIR" not in os.environ:
    os.environ["DLCLI_DATA_DIR"] = str(SHARED_DATASETS)


def require_shared(name: str) -> Path:
    folder = SHARED_DATASETS / name
    if not folder.is_dir():
        pytest.skip(f"needs the real dataset folder {folder} (the shared datasets live beside the checkout in "
                    f"../shared/datasets)")
    return folder
