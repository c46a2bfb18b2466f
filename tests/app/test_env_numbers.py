"""Numbers a service manager passes in the environment (WATCHDOG_USEC, LISTEN_FDS): a value that is
not a plain decimal number is one warning or one refusal line, never a traceback."""

from __future__ import annotations

from pathlib import Path

from app.serving.notify import Notifier
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
