"""The catalogue against Keras 3's public names (tests/keras_names.py): every Keras name is done, not yet done, or
left out with a reason; done names are registered, not-yet-done ones are not (so the list stays true); `dlcli list`
prints each family with arguments and defaults, and a misspelt name gets a did-you-mean."""
import inspect
import os

import pytest
from typer.testing import CliRunner

from dlcli.catalogue import _registry, entries
from dlcli.cli import app
from tests.keras_names import DONE, FAMILIES, KERAS_VERSION, OTHER_LAYERS, TODO

runner = CliRunner()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_keras_name_is_done_pending_or_left_out_with_a_reason(family):
    registry = _registry(family)
    names = FAMILIES[family]
    missing = [n for n, status in names.items() if status == DONE and n not in registry]
    assert not missing, f"{family} marked done but not registered: {missing}"
    finished = [n for n, status in names.items() if status.startswith(TODO) and n in registry]
    assert not finished, f"{family} registered now: mark them done in tests/keras_names.py: {finished}"
    aliases = {n: s.removeprefix("alias of ") for n, s in names.items() if s.startswith("alias of ")}
    assert all(target in names for target in aliases.values()), aliases
    unexplained = [n for n, status in names.items() if status not in (DONE,) and not status.startswith(TODO)
                   and not status.startswith("alias of ") and len(status) < 20]
    assert not unexplained, f"{family}: a name left out needs its reason: {unexplained}"


def test_registered_layers_are_keras_layers():
    from dlcli import layers

    foreign = [n for n in layers.LAYERS.names() if n not in FAMILIES["layers"] and n not in OTHER_LAYERS]
    assert not foreign, f"layers dlcli registers that Keras {KERAS_VERSION} does not have (list them in " \
                        f"tests/keras_names.py OTHER_LAYERS with where they come from): {foreign}"


def test_the_list_is_keras_own_when_keras_is_installed(monkeypatch):
    # Keras reads its backend once, at import, and defaults to TensorFlow, which no extra installs: JAX unless set
    monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "jax"))
    keras = pytest.importorskip("keras", reason="Keras or its backend not installed (the test extra has both): "
                                                "names not re-read")
    if keras.__version__ != KERAS_VERSION:
        pytest.skip(f"tests/keras_names.py lists Keras {KERAS_VERSION}; Keras {keras.__version__} is installed")
    modules = {"layers": keras.layers, "activations": keras.activations, "losses": keras.losses,
               "metrics": keras.metrics, "optimizers": keras.optimizers, "schedules": keras.optimizers.schedules,
               "initializers": keras.initializers}
    for family, module in modules.items():
        public = {n for n in dir(module) if not n.startswith("_")
                  and (inspect.isclass(getattr(module, n)) or family in ("activations", "initializers")
                       and inspect.isfunction(getattr(module, n)))}
        assert public == set(FAMILIES[family]), (family, public ^ set(FAMILIES[family]))


def test_dlcli_list_prints_arguments_and_defaults():
    result = runner.invoke(app, ["list", "metrics"])
    assert result.exit_code == 0, result.output
    assert "AUC, auc" in result.output and "num_thresholds=200" in result.output
    result = runner.invoke(app, ["list", "layers", "ReLU"])
    assert result.exit_code == 0 and "max_value=None" in result.output and "negative_slope=0.0" in result.output
    assert "Dense" not in result.output
    names, arguments = entries("optimizers", "nadam")[0]
    assert names == ["Nadam", "nadam"] and "beta_1=0.9" in arguments and "epsilon=1e-07" in arguments
    assert "units (required)" in entries("layers", "Dense")[0][1]


@pytest.mark.parametrize("args,needle", [(["list", "layer"], "did you mean 'layers'"),
                                         (["list", "layers", "Rellu"], "did you mean 'ReLU'"),
                                         (["list", "activations", "softshrink"], "did you mean 'soft_shrink'")])
def test_misspelt_names_get_a_did_you_mean(args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output
