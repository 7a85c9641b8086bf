"""Models in and out of dlcli: ONNX export (onnx_graph, onnx_export; each layer emits its own nodes) and Keras import
(keras_files, keras_config, keras_import). Each needs an optional extra; `require(...)` names the pip install when it
is missing."""
import importlib

from dlcli.errors import DlcliError


def require(module: str, extra: str):
    """Import an optional dependency, or fail with the one line a user needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DlcliError(f"this command needs the '{module}' package: pip install 'dlcli[{extra}]'") from None
