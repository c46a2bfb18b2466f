"""``uds-demo``: the Pod's conversation end to end, as its two containers' logs show it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.demo import RECEIVED as SERVER_LINE
from app.demo import _Lines, _run_client, main
from tests.support import ROOT, wait_until

LISTENING = re.compile(r"\[uds-server\] 🔌 Server listening on (/tmp/uds-demo-[^/]+)/csi\.sock")
RECEIVED = "[uds-server] 📩 Server received: Hello from client"
REPLIED = "[uds-client] 📥 Client received: Hello from server via UDS"


def test_demo_prints_both_sides_and_cleans_up() -> None:
    demo = Path(sys.executable).parent / "uds-demo"
    assert demo.exists(), f"{demo} is missing: install the project (pip install -e .)"
    result = subprocess.run([str(demo)], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stdout.splitlines()
    listening = [line for line in lines if line.startswith("[uds-server] 🔌 Server listening on ")]
    assert len(listening) == 1, result.stdout
    match = LISTENING.fullmatch(listening[0])
    assert match, listening[0]
    assert RECEIVED in lines
    assert REPLIED in lines
    assert lines.index(listening[0]) < lines.index(RECEIVED) < lines.index(REPLIED)
    assert not Path(match.group(1)).exists(), "the demo left its temp directory behind"
    assert result.stderr == ""


def test_demo_rejects_arguments_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bogus"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "Error: uds-demo takes no arguments (got --bogus); try uds-demo --help\n"


def test_the_clients_answer_is_printed_after_the_servers_line_even_when_it_arrives_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The race of a busy machine, made certain: the client has answered before the server's line."""
    done = tmp_path / "done"
    answer = REPLIED.removeprefix("[uds-client] ")
    client = [sys.executable, "-c", f"import pathlib; print({answer!r}); pathlib.Path({str(done)!r}).touch()"]
    server_read, server_write = os.pipe()
    with open(server_read, encoding="utf-8") as server_stream, open(server_write, "w") as writer:
        server = _Lines("uds-server", server_stream)
        running = threading.Thread(target=_run_client, args=(client, server))
        running.start()
        wait_until(done.exists, timeout=30, what="the client to answer")
        writer.write(SERVER_LINE + "\n")
        writer.close()  # the server's reader sees the end
        running.join(15)
        server.join(15)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[uds-server] {SERVER_LINE}", REPLIED]
