"""Every registered layer has a gradient check: a new layer without a GRADIENT_CASES entry fails here
(Caffe's GradientChecker idea). Each family's test module keeps its own table; this collects them."""
import importlib
import pkgutil

import tests.layers
from dlcli import layers


def gradient_tables() -> dict:
    covered = {}
    for info in pkgutil.iter_modules(tests.layers.__path__):
        module = importlib.import_module(f"tests.layers.{info.name}")
        for name, cases in getattr(module, "GRADIENT_CASES", {}).items():
            covered.setdefault(name, []).extend(cases)
    return covered


def test_every_registered_layer_has_gradient_cases():
    covered = gradient_tables()
    missing = [name for name in layers.LAYERS.names() if not covered.get(name)]
    assert not missing, f"layers without a gradient check in any tests/layers GRADIENT_CASES table: {missing}"


def test_tables_name_only_registered_layers():
    unknown = [name for name in gradient_tables() if name not in layers.LAYERS]
    assert not unknown, f"GRADIENT_CASES names unknown layers: {unknown}"
