"""``--log-format json`` on a real server: every line it prints is one JSON object, carrying the demo
events, the peer and message id, the access log, a refused request, the drain and an error."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys

from app.logs import JsonFormatter
from tests.support import ServerProcess, http_over_uds, read_response, short_tmpdir, wait_until


def parsed(output: str) -> list[dict[str, object]]:
    """Every line of ``output`` as a JSON object with the four fields every line has."""
    entries = []
    for line in output.splitlines():
        entry = json.loads(line)  # any line that is not JSON fails the test here
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


def test_every_line_is_a_json_object() -> None:
    path = str(short_tmpdir() / "s.sock")
    with ServerProcess(
        ["--socket", path, "--store", "memory", "--log-format", "json", "--access-log"], socket_path=path
    ) as server:
        server.wait_ready()
        body = json.dumps({"text": "hello \x1b[31m json"}).encode()
        status, _ = http_over_uds(path, "POST", "/v1/messages", body, {"Content-Type": "application/json"})
        assert status == 201
        with socket.socket(socket.AF_UNIX) as conn:  # refused by the protocol: a warning line
            conn.settimeout(5)
            conn.connect(path)
            conn.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert read_response(conn)[0] == 400
        wait_until(lambda: "Rejected a request" in server.output, what="the refusal logged")
        assert server.stop(signal.SIGTERM) == 0
        output = server.output
    entries = parsed(output)
    messages = [entry["message"] for entry in entries]
    assert f"🔌 Server listening on {path}" in messages
    (received,) = [entry for entry in entries if str(entry["message"]).startswith("📩 Server received:")]
    assert received["message"] == "📩 Server received: hello \\x1b[31m json"  # escaped, as in text
    assert received["message_id"] == 1
    peer = received["peer"]
    assert isinstance(peer, dict)
    assert peer["uid"] == os.getuid()
    assert peer["gid"] == os.getgid()
    assert isinstance(peer["pid"], int)
    assert any(
        entry["logger"] == "uvicorn.access" and "POST /v1/messages" in str(entry["message"])
        for entry in entries
    )
    assert "uvicorn.error" in {entry["logger"] for entry in entries}  # uvicorn's own lines too
    (refused,) = [entry for entry in entries if str(entry["message"]).startswith("Rejected a request")]
    assert refused["level"] == "warning"
    assert any(str(message).startswith("Received SIGTERM: draining") for message in messages)
    assert any(str(message).startswith("Drain done in") for message in messages)


def test_an_error_is_a_json_object_too() -> None:
    path = str(short_tmpdir() / "s.sock")
    with ServerProcess(
        ["--socket", path, "--store", "memory", "--log-format", "json"], socket_path=path
    ) as server:
        server.wait_ready()
        os.unlink(path)  # the server notices within a second and stops with exit 3
        assert server.proc.wait(timeout=30) == 3
        output = server.output
    errors = [entry for entry in parsed(output) if entry["level"] == "error"]
    assert len(errors) == 1, output
    assert str(errors[0]["message"]).startswith(f"Socket {path} was removed or replaced by another program")


def test_an_exception_stays_on_its_line() -> None:
    try:
        raise RuntimeError("first line\nsecond line")
    except RuntimeError:
        record = logging.LogRecord(
            "uvicorn.error", logging.ERROR, "", 0, "Exception in ASGI application", None, sys.exc_info()
        )
    for debug in (False, True):
        line = JsonFormatter(debug).format(record)
        assert "\n" not in line
        entry = json.loads(line)
        assert entry["error"] == "RuntimeError: first line"
        assert ("traceback" in entry) is debug
