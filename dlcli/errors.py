"""The one error type the library raises for problems a user can fix; the CLI prints it and exits with its code.
`require` is the one way a feature imports an optional extra."""
import importlib


class DlcliError(Exception):
    """A user-facing error: `message` is one paragraph; `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ConfigError(DlcliError):
    """A bad config file or --set override (exit code 2, like a usage error)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class NothingToDo(DlcliError):
    """A request that is already done (resuming a finished run): the CLI says why and exits 0, so a script or a
    scheduler that resumes until the run is complete succeeds."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=0)


class ShapeError(DlcliError):
    """Layers that cannot be connected: names the layer and both shapes."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class ExportError(DlcliError):
    """A model part with no ONNX mapping (exit 2: nothing is written)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


def require(module: str, extra: str, feature: str = "this command"):
    """Import an optional dependency, or fail with the one line that installs its extra: "`feature` needs `module`:
    pip install 'dlcli[extra]'" (exit 1: the input is fine, the environment lacks a package)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DlcliError(f"{feature} needs {module}: pip install 'dlcli[{extra}]'") from None


def plural(count: int, word: str) -> str:
    """'1 epoch', '3 epochs': counts in messages."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"
