"""``app.serving.spawn`` and ``benchmarks/_spawn.py``: the helper that starts a server and waits for it.

The happy paths run in every test that uses a server (tests.support, bench, the demo); here are the
ways it fails, each of which must end quickly and say why.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.serving.spawn import SpawnError, app_command
from benchmarks._spawn import ServerProcess, free_port, poll, probe_tcp
from client import ConnectError
from tests.support import ROOT

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_server_that_exits_ends_the_wait_at_once_with_its_code(tmp_short: Path) -> None:
    path = str(tmp_short / "s.sock")
    bad_mode = app_command("--socket", path, "--socket-mode", "abc")
    with ServerProcess(bad_mode, socket=path, cwd=ROOT) as server:
        began = time.monotonic()
        with pytest.raises(
            SpawnError, match=rf"uds-server exited with code 2 before it answered on unix://{path}"
        ):
            server.wait_ready(timeout=60)
        assert time.monotonic() - began < 30  # not the deadline: the exit ended it


def test_a_socket_that_never_appears_times_out_with_the_last_error(tmp_short: Path) -> None:
    path = str(tmp_short / "s.sock")
    with ServerProcess(SLEEPER, socket=path) as server, pytest.raises(SpawnError) as caught:
        server.wait_ready(timeout=0.3)
    assert str(caught.value) == (
        f"uds-server did not answer on unix://{path} within 0.3s (last error: no such file)"
    )


def test_a_port_that_never_answers_times_out_with_the_last_error() -> None:
    port = free_port()
    with ServerProcess(SLEEPER, port=port, name="sleeper") as server, pytest.raises(SpawnError) as caught:
        server.wait_ready(timeout=0.3)
    assert str(caught.value) == (
        f"sleeper did not answer on http://127.0.0.1:{port} within 0.3s (last error: connection refused)"
    )


def test_stop_kills_a_server_that_ignores_sigterm() -> None:
    ignoring = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('on', flush=1); "
        "time.sleep(60)"
    )
    with ServerProcess([sys.executable, "-c", ignoring], stdout=subprocess.PIPE, text=True) as server:
        assert server.proc.stdout is not None
        assert server.proc.stdout.readline() == "on\n"  # the handler is in place
        with pytest.raises(SpawnError, match=r"did not stop within 0\.2s of SIGTERM"):
            server.stop(timeout=0.2)
        assert server.proc.returncode == -9
        server.proc.stdout.close()


def test_env_overrides_and_removals_reach_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UDS_SOCKET", "/from/the/parent.sock")
    show = "import os; e = os.environ; print(e.get('UDS_SOCKET'), e['EXTRA'], e['PYTHONUNBUFFERED'])"
    with ServerProcess(
        [sys.executable, "-c", show],
        stdout=subprocess.PIPE,
        text=True,
        env={"UDS_SOCKET": None, "EXTRA": "x"},
    ) as child:
        out, _ = child.proc.communicate(timeout=30)
    assert out == "None x 1\n"


def test_probe_tcp_names_the_address_and_reason() -> None:
    port = free_port()
    with pytest.raises(ConnectError) as caught:
        probe_tcp("127.0.0.1", port, timeout=1)
    assert caught.value.address == f"http://127.0.0.1:{port}"
    assert caught.value.reason == "connection refused"


def test_poll_retries_only_what_it_is_told_to() -> None:
    answers = iter([None, False, "done"])
    assert poll(lambda: next(answers), 5, what="three calls", first_delay=0.001) == "done"

    def refused() -> None:
        raise ConnectError("unix:///x", "connection refused")

    with pytest.raises(TimeoutError, match=r"timed out after 0\.05s waiting for x; last error: ConnectError"):
        poll(refused, 0.05, what="x", first_delay=0.001)

    def broken() -> None:
        raise KeyError("not retried")

    with pytest.raises(KeyError):
        poll(broken, 5, what="y")
