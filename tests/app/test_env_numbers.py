"""Numbers a service manager passes in the environment (WATCHDOG_USEC, LISTEN_FDS): a value that is
not a plain decimal number is one warning or one refusal line, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.serving.activation import inherited_socket
from app.serving.notify import Notifier
from app.serving.private_dir import SocketError
from tests.app.test_notify import Manager, manager  # noqa: F401 - the fixture
from tests.support import ServerProcess


def test_a_superscript_watchdog_usec_is_one_warning(tmp: Path, manager: Manager) -> None:  # noqa: F811
    """``"²".isdigit()`` is true, yet ``int("²")`` fails: the server warns and serves on."""
    path = str(tmp / "s.sock")
    env = {"NOTIFY_SOCKET": str(tmp / "notify"), "WATCHDOG_USEC": "²"}
    with ServerProcess(["--socket", path, "--store", "memory"], socket_path=path, env=env) as server:
        server.wait_ready()
        manager.wait_for("READY=1")
        assert server.stop() == 0
    assert "WARNING WATCHDOG_USEC=² is not a positive number: no watchdog pings" in server.output
    assert "Traceback" not in server.output
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "²"}).watchdog_every is None


def test_a_superscript_listen_fds_is_refused_in_one_line() -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "²"}
    with pytest.raises(SocketError) as caught:
        inherited_socket(environ)
    assert str(caught.value) == (
        "cannot serve the sockets passed by the service manager (LISTEN_FDS=²): "
        "pass one listening Unix stream socket (ListenStream=/path in the .socket unit)"
    )
