"""A real PostgreSQL server for the sweep's many-machines test: the one .ci/run starts ($DLCLI_TEST_POSTGRES_URL), or
a throwaway cluster started here with Debian's initdb/pg_ctl; the test skips (saying why) only when neither exists."""
import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest

ENV = "DLCLI_TEST_POSTGRES_URL"


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    if os.environ.get(ENV):
        yield os.environ[ENV]
        return
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip(f"no PostgreSQL server: set {ENV} (as .ci/run does) or install Debian's postgresql package "
                    f"(initdb and pg_ctl start a throwaway server)")
    folder = tempfile.mkdtemp(prefix="dlcli-pg-")
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the package's postgres user
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(folder, "data"), _free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", data, "-A", "trust", "-U", "dlcli"], check=True,
                       capture_output=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", data, "-l", os.path.join(folder, "log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True,
                       capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        output = getattr(e, "stderr", b"") or b""
        pytest.skip(f"could not start a PostgreSQL server with {initdb}: {e} {output.decode(errors='replace')}")
    try:
        yield f"postgresql://dlcli@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "fast", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
