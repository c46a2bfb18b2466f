"""Code that another uid plants never runs in a Python process the project starts.

``python -m`` puts the working directory first on ``sys.path``, and ``PYTHONPATH`` or a
``sitecustomize`` module reach every interpreter that honours the environment. So the workers of
``--workers``, the server and client that ``uds-demo`` starts and the server of ``bench.py --spawn``
(``app.serving.spawn.app_command``) run in isolated mode. Each test lets uid 65534 plant packages
named like ours (and ``sitecustomize``) in a world-writable directory, starts the process as root
with that directory as its working directory or on ``PYTHONPATH``, and checks that nothing planted
ran (a planted module would write to a directory only root can write) and that the process works.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from app.serving import spawn
from benchmarks import _spawn
from tests.support import (
    ROOT,
    http_over_uds,
    python_as_nobody,
    read_response,
    short_tmpdir,
    wait_until,
)

BIN = Path(sys.executable).parent
JSON = {"Content-Type": "application/json"}

_PLANT = """
import os, sys
root, witness, *names = sys.argv[1:]
payload = (
    "import os\\n"
    f"with open(os.path.join({witness!r}, str(os.getpid())), 'a') as f:\\n"
    "    f.write(f'{__name__} ran as uid {os.getuid()}\\\\n')\\n"
)
for name in names:
    if name.endswith('.py'):
        with open(os.path.join(root, name), 'w') as f:
            f.write(payload)
        continue
    os.mkdir(os.path.join(root, name))
    for module in ('__init__.py', '__main__.py', 'workers.py'):
        with open(os.path.join(root, name, module), 'w') as f:
            f.write(payload)
"""


class Planted:
    """A world-writable directory (mode 1777, like /tmp) and a root-only one that planted code
    would write to."""

    def __init__(self) -> None:
        self.root = short_tmpdir("plant")
        self.root.chmod(0o1777)
        self.witness = short_tmpdir("ran")  # 0700, root's: only code running as root writes here

    def plant(self, *names: str) -> None:
        """uid 65534 writes packages ``names`` (or modules ``x.py``) whose import leaves a trace."""
        done = python_as_nobody("-c", _PLANT, str(self.root), str(self.witness), *names, cwd="/")
        assert done.returncode == 0, done.stderr
        assert all((self.root / name).exists() for name in names)

    def ran(self) -> str:
        """What planted code wrote: empty while nothing planted has run."""
        return "".join(path.read_text() for path in sorted(self.witness.iterdir()))

    @contextlib.contextmanager
    def checked(self) -> Iterator[None]:
        """Whatever fails in the block, first say whether planted code ran."""
        try:
            yield
        finally:
            assert self.ran() == "", f"planted code ran:\n{self.ran()}"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.witness, ignore_errors=True)


@pytest.fixture
def planted() -> Iterator[Planted]:
    where = Planted()
    try:
        yield where
    finally:
        where.remove()


@pytest.fixture
def log() -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="uds-planted-", suffix=".log")
    os.close(fd)
    yield Path(name)
    Path(name).unlink(missing_ok=True)


def _uds_server(
    path: str, data: Path, log: Path, cwd: Path, env: dict[str, str | None]
) -> spawn.ServerProcess:
    """``uds-server --workers 2`` as an operator runs it: the installed command."""
    command = [str(BIN / "uds-server"), "--socket", path, "--workers", "2", "--data-dir", str(data)]
    with log.open("wb") as out:
        return spawn.ServerProcess(command, socket=path, stdout=out, cwd=cwd, env=env)


def _workers(server: spawn.ServerProcess) -> list[int]:
    return sorted(child.pid for child in psutil.Process(server.proc.pid).children())


def _served_by_replacement(server: spawn.ServerProcess, path: str, planted: Planted) -> None:
    """Kill a worker; its replacement (started now, after the planting) must serve alone."""
    first, second = _workers(server)
    os.kill(first, signal.SIGKILL)
    wait_until(
        lambda: planted.ran() or (len(_workers(server)) == 2 and first not in _workers(server)),
        what="a replacement worker",
    )
    assert planted.ran() == ""
    os.kill(second, signal.SIGSTOP)  # only the replacement can answer now
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(path)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_response(conn)[0] == 200
    finally:
        os.kill(second, signal.SIGCONT)
    assert planted.ran() == ""


def test_workers_never_import_from_a_world_writable_working_directory(planted: Planted, log: Path) -> None:
    planted.plant("app", "client", "uvicorn", "sitecustomize.py")
    tmp = short_tmpdir("pw")
    path = str(tmp / "s.sock")
    try:
        with planted.checked(), _uds_server(path, tmp / "data", log, planted.root, {}) as server:
            server.wait_ready()
            wait_until(
                lambda: planted.ran() or "2 workers serving" in log.read_text(),
                timeout=30,
                what="both workers serving",
            )
            assert planted.ran() == "", log.read_text()
            _served_by_replacement(server, path, planted)
            assert server.stop() == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_workers_never_import_from_pythonpath(planted: Planted, log: Path) -> None:
    """``PYTHONPATH`` names a world-writable directory, empty when the server starts; what is
    planted there later never reaches a replacement worker."""
    tmp = short_tmpdir("pp")
    path = str(tmp / "s.sock")
    try:
        env: dict[str, str | None] = {"PYTHONPATH": str(planted.root)}
        with planted.checked(), _uds_server(path, tmp / "data", log, tmp, env) as server:
            server.wait_ready()
            wait_until(
                lambda: "2 workers serving" in log.read_text(), timeout=30, what="both workers serving"
            )
            planted.plant("app", "client", "uvicorn", "sitecustomize.py", "usercustomize.py")
            _served_by_replacement(server, path, planted)
            assert http_over_uds(path)[0] == 200
            assert server.stop() == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("where", ["cwd", "PYTHONPATH"])
def test_the_spawn_helper_server_never_imports_planted_code(planted: Planted, where: str) -> None:
    """``bench.py --spawn``, the other benchmarks and the demo start servers through ``app_command``."""
    planted.plant("app", "client", "uvicorn", "sitecustomize.py")
    tmp = short_tmpdir("ps")
    path = str(tmp / "s.sock")
    env: dict[str, str | None] = {"PYTHONPATH": str(planted.root)} if where == "PYTHONPATH" else {}
    cwd = planted.root if where == "cwd" else tmp
    try:
        command = spawn.app_command("--socket", path, "--store", "memory")
        with planted.checked(), _spawn.spawn(command, socket=path, cwd=cwd, env=env, timeout=30):
            status, _ = http_over_uds(path, "POST", "/messages", b'{"text": "hi"}', JSON)
            assert status == 201
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_demo_never_imports_from_a_world_writable_working_directory(planted: Planted) -> None:
    planted.plant("app", "client", "uvicorn", "httpx2", "sitecustomize.py")
    done = subprocess.run(
        [str(BIN / "uds-demo")], capture_output=True, text=True, cwd=planted.root, timeout=120, check=False
    )
    assert planted.ran() == "", done.stdout + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Client received: Hello from server via UDS" in done.stdout


def test_the_demo_children_never_import_from_pythonpath(planted: Planted) -> None:
    """The demo's own process honours ``PYTHONPATH`` (whoever set it owns it); the server and
    client it starts do not. So the planted packages are ones that only those two import."""
    planted.plant("uvicorn", "httpx2", "httpcore2")
    done = subprocess.run(
        [str(BIN / "uds-demo")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(planted.root)},
        timeout=120,
        check=False,
    )
    assert planted.ran() == "", done.stdout + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Client received: Hello from server via UDS" in done.stdout
