"""A 0660 socket shared by group: a client outside the group gets exit 3 and "permission denied".

The tests run as root (as CI does) and run ``uds-client`` in a child dropped to uid/gid 65534.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.support import NOBODY, PYTHON, ROOT, python_as_nobody, running_server

SOCKET_GID = 4242  # a group nobody belongs to unless the test adds it


@pytest.fixture(scope="module", autouse=True)
def _nobody_can_run_the_client() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests drop a child to uid 65534 and need root (CI runs them as root)")
    probe = python_as_nobody("-c", "import client.cli")
    if probe.returncode != 0:
        pytest.fail(
            f"uid {NOBODY} cannot run {PYTHON} -m client from {ROOT}: make the repository and its venv "
            f"readable by others (chmod -R o+rX), and build the venv on /usr/bin/python3.\n{probe.stderr}"
        )


@pytest.fixture
def shared_dir(tmp_short: Path) -> Path:
    tmp_short.chmod(0o755)  # others may reach the socket; its own mode decides who may connect
    return tmp_short


def test_client_outside_the_group_gets_permission_denied(shared_dir: Path) -> None:
    with running_server("--socket-mode", "660", "--socket-group", str(SOCKET_GID), tmp=shared_dir) as server:
        path = server.socket_path
        assert path is not None
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == SOCKET_GID
        for command in (("health",), ("send", "Hello from client")):
            result = python_as_nobody("-m", "client", "--socket", path, *command)
            assert result.returncode == 3, result.stderr
            assert result.stderr.strip() == (
                f"Error: cannot connect to unix://{path} (permission denied). "
                "Check that your user is in the socket's group (ls -l on the socket)."
            )


def test_client_in_the_group_gets_through(shared_dir: Path) -> None:
    with running_server("--socket-mode", "660", "--socket-group", str(SOCKET_GID), tmp=shared_dir) as server:
        assert server.socket_path is not None
        result = python_as_nobody(
            "-m",
            "client",
            "--socket",
            server.socket_path,
            "send",
            "Hello from client",
            extra_groups=[SOCKET_GID],
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "📥 Client received: Hello from server via UDS\n"
