"""`dlcli serve RUN_DIR`: argument parsing around dlcli.serve (the `serve` extra is imported only when it runs)."""
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlcli.commands.base import app, console, handles_errors


@app.command()
@handles_errors
def serve(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/mnist-mlp-20261124-101500.")],
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable from other "
                                           "machines (a warning says so).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    weights: Annotated[str, typer.Option(help="best or last.")] = "best",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most instances run as one model batch.")]
    = 64,
    max_delay_ms: Annotated[float, typer.Option("--max-delay-ms", min=0, help="Longest wait for more requests "
                                                                               "to batch with the first.")] = 5.0,
    api_key_env: Annotated[Optional[str], typer.Option(
        "--api-key-env", help="Name of an environment variable holding a key that /v1/ requests must send as "
                              "the X-API-Key header (or Authorization: Bearer KEY); others get 401.")] = None,
):
    """Serve a trained run over HTTP: POST /v1/predict, GET /v1/model, /healthz, /readyz, /metrics, and a page
    to try it at /. Concurrent requests are batched dynamically. SIGTERM or Ctrl-C finish what is in flight.

    Example: dlcli serve runs/mnist-mlp-20261124-101500 --port 8000

    Needs: pip install 'dlcli[serve]'.
    """
    from dlcli.errors import DlcliError
    from dlcli.serve import serve as run_server

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise DlcliError(f"--api-key-env {api_key_env}: that environment variable is not set or empty",
                             exit_code=2)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console(stderr=True).print(f"warning: listening on {host}: reachable from other machines"
                                   + ("" if api_key else " by anyone (no --api-key-env)"), markup=False)
    run_server(run_dir, host, port, weights, max_batch, max_delay_ms, api_key,
               log=lambda line: console().print(line, markup=False))
