"""``--wait``: the client container may start before the server; back off until the socket answers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from client import WaitTimeout, wait_for_socket
from tests.support import PYTHON, ROOT, ServerProcess, run_cli, wait_until

REPLY_LINE = "📥 Client received: Hello from server via UDS"


def test_returns_at_once_when_the_server_answers(server_path: str) -> None:
    retries: list[tuple[str, float]] = []
    waited = wait_for_socket(server_path, 5.0, on_retry=lambda reason, delay: retries.append((reason, delay)))
    assert retries == []
    assert waited >= 0


def test_backs_off_exponentially_up_to_the_cap_then_gives_up(tmp_short: Path) -> None:
    path = str(tmp_short / "never.sock")
    retries: list[tuple[str, float]] = []
    with pytest.raises(WaitTimeout) as info:
        wait_for_socket(
            path,
            1.0,
            first_delay=0.01,
            max_delay=0.08,
            on_retry=lambda reason, delay: retries.append((reason, delay)),
        )
    delays = [delay for _, delay in retries]
    assert {reason for reason, _ in retries} == {"no such file"}
    assert delays[:4] == [0.01, 0.02, 0.04, 0.08]
    assert all(d <= 0.08 for d in delays)
    error = info.value
    assert error.waited >= 1.0
    assert error.reason == "no such file"
    assert error.exit_code == 3
    assert str(error).startswith(f"gave up waiting for unix://{path} after ")
    assert "(last error: no such file)" in str(error)


def test_last_reason_is_reported_for_a_refused_socket(refused_socket: str) -> None:
    with pytest.raises(WaitTimeout) as info:
        wait_for_socket(refused_socket, 0.2)
    assert info.value.reason == "connection refused"


def test_cli_waits_for_a_server_that_starts_later(tmp_short: Path) -> None:
    path = str(tmp_short / "late.sock")
    with subprocess.Popen(
        [PYTHON, "-m", "client", "--socket", path, "--wait", "60", "send", "Hello from client"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as client:
        assert client.stderr is not None
        stderr = client.stderr
        waiting = wait_until(stderr.readline, timeout=15, what="the client to report that it waits")
        assert waiting.startswith(f"uds-client: waiting up to 60s for unix://{path} (no such file)")
        assert client.poll() is None
        with ServerProcess(["--socket", path], socket_path=path) as server:
            try:
                out, err = client.communicate(timeout=60)
            finally:
                assert server.stop() == 0
    assert client.returncode == 0, err
    assert out == REPLY_LINE + "\n"


def test_cli_gives_up_after_the_deadline_with_exit_3(tmp_short: Path) -> None:
    path = str(tmp_short / "absent.sock")
    result = run_cli("--socket", path, "--wait", "0.5", "health")
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(rf"Error: gave up waiting for unix://{re.escape(path)} after \d+\.\ds ", last), last
    assert "(last error: no such file). Is the server running?" in last
    assert "Traceback" not in result.stderr
