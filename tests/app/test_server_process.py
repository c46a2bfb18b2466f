"""The uds-server process: log lines, peer credentials, clean stops, exit codes, log formats."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from uvicorn.server import ServerState

from app.config import Settings
from app.connection.protocol import PeerCredProtocol
from app.logs import JsonFormatter, TextFormatter, configure
from app.serving.run import run
from app.serving.server import Services, UdsServer, build_config, early_signals
from tests.support import ServerProcess, http_over_uds, running_server, wait_until

HELLO = json.dumps({"text": "Hello from client"}).encode()
JSON = {"content-type": "application/json"}


def _lines(server: ServerProcess) -> list[str]:
    """The server's output so far (read from its log file, which stays readable after stop())."""
    return _text(server).splitlines()


def _text(server: ServerProcess) -> str:
    return server.log_path.read_text(encoding="utf-8", errors="replace")


def test_demo_lines_exact_and_peer_credentials(tmp: Path) -> None:
    with running_server(tmp=tmp) as server:
        path = str(server.socket_path)
        assert f"🔌 Server listening on {path}" in _lines(server)
        status, body = http_over_uds(path, "POST", "/messages", HELLO, JSON)
        assert status == 201, body
        message = json.loads(body)
        assert message["reply"] == "Hello from server via UDS"
        assert message["peer"] == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
        wait_until(lambda: "📩 Server received: Hello from client" in _lines(server), what="received line")
        assert server.stop() == 0
    assert not os.path.exists(path)


def test_peer_pid_is_the_connecting_process(tmp: Path) -> None:
    """A child process connects: the peer pid is the child's, not ours."""
    import subprocess

    with running_server(tmp=tmp) as server:
        code = (
            "import json,os,sys; from tests.support import http_over_uds as h;"
            "s,b=h(sys.argv[1],'POST','/messages',b'{\"text\":\"x\"}',{'content-type':'application/json'});"
            "print(json.dumps({'pid':os.getpid(),'peer':json.loads(b)['peer']}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(server.socket_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
            timeout=60,
        )
        result = json.loads(out.stdout)
        assert result["peer"]["pid"] == result["pid"] != os.getpid()


def test_startup_lines_log_mode_and_group(tmp: Path) -> None:
    with running_server(tmp=tmp) as server:
        lines = _lines(server)
        mode_line = f"Socket {server.socket_path}: mode 0660, owner uid {os.getuid()}, group {os.getgid()}"
        assert any(line.startswith(mode_line) for line in lines), lines
        assert lines.index(f"🔌 Server listening on {server.socket_path}") > 0
        assert not any(line.startswith(("WARNING", "ERROR")) for line in lines), lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp: Path, sig: signal.Signals) -> None:
    path = str(tmp / "s.sock")
    with ServerProcess(["--socket", path], socket_path=path) as server:
        server.wait_ready()
        assert server.stop(sig) == 0
        lines = _lines(server)
    assert not os.path.exists(path)
    assert f"Received {sig.name}: draining 0 connection(s), 0 request(s) in flight (up to 20s)" in lines
    done = r"Drain done in \d+\.\d\ds: all requests finished"
    assert any(re.fullmatch(done, line) for line in lines), lines
    assert "Traceback" not in "\n".join(lines)


def test_signal_with_keepalive_connections_open(tmp: Path) -> None:
    path = str(tmp / "s.sock")
    with ServerProcess(["--socket", path], socket_path=path) as server:
        server.wait_ready()
        idle = []
        try:
            for _ in range(3):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                idle.append(conn)
                conn.settimeout(10)
                conn.connect(path)
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(b'{"status":"ok"}'):
                    chunk = conn.recv(4096)
                    assert chunk, data
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200")
            assert server.stop() == 0
            for conn in idle:
                assert conn.recv(4096) == b"", "idle keep-alive connections are closed on shutdown"
        finally:
            for conn in idle:
                conn.close()
        draining = "Received SIGTERM: draining 3 connection(s), 0 request(s) in flight (up to 20s)"
        assert draining in _lines(server)
    assert not os.path.exists(path)


def test_tcp_mode_for_debugging(tmp: Path) -> None:
    import http.client

    with ServerProcess(["--host", "127.0.0.1", "--port", "0"]) as server:
        match = wait_until(
            lambda: re.search(r"^🔌 Server listening on http://127\.0\.0\.1:(\d+)$", _text(server), re.M),
            what="TCP listening line",
        )
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("POST", "/messages", HELLO, JSON)
        response = conn.getresponse()
        assert response.status == 201
        assert json.loads(response.read())["peer"] is None
        conn.close()
        assert server.stop() == 0


def test_json_log_format(tmp: Path) -> None:
    with running_server("--log-format", "json", "--access-log", tmp=tmp) as server:
        path = str(server.socket_path)
        assert http_over_uds(path, "POST", "/messages", HELLO, JSON)[0] == 201
        wait_until(lambda: "Server received" in _text(server), what="received line")
        assert server.stop() == 0
        entries = [json.loads(line) for line in _lines(server)]
    for entry in entries:
        assert {"ts", "level", "logger", "message"} <= entry.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    messages = {entry["message"]: entry for entry in entries}
    assert messages[f"🔌 Server listening on {path}"]["logger"] == "app.serving.server"
    assert messages["📩 Server received: Hello from client"]["logger"] == "app.messages"
    assert any(e["logger"] == "uvicorn.access" and "POST /messages" in e["message"] for e in entries), entries


def test_access_log_off_by_default(tmp: Path) -> None:
    with running_server(tmp=tmp) as server:
        assert http_over_uds(str(server.socket_path))[0] == 200
        assert server.stop() == 0
        assert "GET /healthz" not in _text(server)


def test_exit_codes(tmp: Path) -> None:
    """0 clean stop, 2 bad usage, 3 startup failure."""
    with running_server(tmp=tmp) as server:
        assert server.stop() == 0
    with ServerProcess(["--socket-mode", "abc"]) as usage:
        assert usage.proc.wait(30) == 2
    blocker = tmp / "file"
    blocker.write_text("x")
    with ServerProcess(["--socket", str(blocker / "s.sock")]) as failure:
        assert failure.proc.wait(30) == 3
        assert _lines(failure) == [
            f"ERROR cannot create the socket's directory {blocker}: it exists and is not a directory; "
            "choose another --socket"
        ]


def test_cannot_create_parent_directory(tmp: Path) -> None:
    with ServerProcess(["--socket", "/proc/uds-example/s.sock"]) as server:
        assert server.proc.wait(30) == 3
        lines = _lines(server)
        assert len(lines) == 1, lines
        assert lines[0].startswith("ERROR cannot create the socket's directory /proc/uds-example: ")


def test_permission_denied_is_a_startup_failure(tmp: Path) -> None:
    """A user who may not write the socket's directory gets one line and exit 3."""
    import subprocess

    assert os.geteuid() == 0, "this test switches to the nobody user"
    os.chmod(tmp, 0o755)  # nobody may enter, not write
    path = tmp / "s.sock"
    result = subprocess.run(
        [sys.executable, "-m", "app", "--socket", str(path), "--store", "memory"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        user=65534,
        group=65534,
        extra_groups=[],
        check=False,
    )
    assert result.returncode == 3, result
    assert result.stdout.splitlines() == [
        f"ERROR cannot bind {path}: permission denied; uid 65534 needs write access to {tmp} "
        "(check its owner and mode)"
    ]
    assert not path.exists()


def test_group_not_allowed_is_a_startup_failure(tmp: Path) -> None:
    """chown to a group the user is not in fails with one line, exit 3, and no socket left."""
    import subprocess

    assert os.geteuid() == 0, "this test switches to the nobody user"
    os.chown(tmp, 65534, 65534)  # the server's own directory: no warning about other writers
    path = tmp / "s.sock"
    result = subprocess.run(
        [sys.executable, "-m", "app", "--socket", str(path), "--socket-group", "0", "--store", "memory"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        user=65534,
        group=65534,
        extra_groups=[],
        check=False,
    )
    assert result.returncode == 3, result
    assert result.stdout.splitlines() == [
        f"ERROR cannot give {path} to group 0: operation not permitted; "
        "the server's user must be root or a member of that group (--socket-group)"
    ]
    assert not path.exists()


# In-process: lifespan failure, draining flag, formatters ------------------------------------------


async def _failing_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no store"})


def test_lifespan_failure_exits_3_and_removes_socket(tmp: Path) -> None:
    path = str(tmp / "s.sock")
    with pytest.raises(SystemExit) as exit_info:
        run(Settings(socket=path, store="memory"), app_factory=lambda _settings, **_services: _failing_app)
    assert exit_info.value.code == 3
    assert not os.path.exists(path)


def test_signal_before_serving_stops_cleanly(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM while the application is being built: exit 0, nothing left behind, handlers restored."""
    path = str(tmp / "s.sock")
    before = signal.getsignal(signal.SIGTERM)

    def factory(_settings: Settings, **_services: object) -> object:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the build")

    with caplog.at_level(logging.INFO, logger="app.serving.server"):
        assert run(Settings(socket=path, store="memory"), app_factory=factory) == 0
    assert "Stopped before serving" in caplog.text
    assert not os.path.exists(path)
    assert signal.getsignal(signal.SIGTERM) is before


def test_handle_exit_marks_app_draining() -> None:
    settings = Settings(store="memory")
    services = Services.build(settings)
    app = services.application(settings)
    server = UdsServer(build_config(settings, app), "/x.sock", services)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        server.handle_exit(signal.SIGTERM, None)
        assert client.get("/readyz").json() == {"status": "draining"}
    assert services.hub.draining, "event streams are told to end"
    assert server.should_exit


def test_config_carries_the_settings() -> None:
    settings = Settings(request_timeout=7.0, send_timeout=3.0, max_connections=12, keepalive_timeout=1.5)
    config = build_config(settings, _failing_app)
    protocol = _protocol_of(config)
    assert (protocol.request_timeout, protocol.send_timeout) == (7.0, 3.0)
    assert protocol.max_connections == 12
    assert config.timeout_keep_alive == 1.5
    assert _protocol_of(build_config(settings, _failing_app, max_connections=5)).max_connections == 5


def _protocol_of(config: uvicorn.Config) -> PeerCredProtocol:
    """The protocol uvicorn would make for one connection under ``config``."""
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = config.http_protocol_class(
            config=config, server_state=ServerState(), app_state={}, _loop=loop
        )  # type: ignore[call-arg]
    finally:
        loop.close()
    assert isinstance(protocol, PeerCredProtocol)
    return protocol


def test_captured_signal_is_not_raised_again_after_the_stop() -> None:
    """uvicorn raises a captured SIGTERM again once its handlers are gone; UdsServer must not."""
    settings = Settings(store="memory")
    server = UdsServer(build_config(settings, _failing_app), "/x.sock", Services.build(settings))
    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda sig, _frame: seen.append(sig))
    try:
        with server.capture_signals():
            assert signal.getsignal(signal.SIGTERM) == server.handle_exit
            signal.raise_signal(signal.SIGTERM)
            wait_until(lambda: server.should_exit, what="SIGTERM handled by the server")
        assert server.signals == [signal.SIGTERM]
        assert seen == [], "the signal reached the handler restored after the stop"
        assert signal.getsignal(signal.SIGTERM) is not server.handle_exit
    finally:
        signal.signal(signal.SIGTERM, before)


def _record(name: str, level: int, msg: str, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


def test_text_formatter() -> None:
    fmt = TextFormatter()
    demo = "📩 Server received: Hello"
    assert fmt.format(_record("app.messages", logging.INFO, demo)) == demo
    assert fmt.format(_record("app", logging.INFO, "x")) == "x"
    assert fmt.format(_record("uvicorn.error", logging.INFO, "Shutting down")) == "INFO Shutting down"
    assert fmt.format(_record("app.serving.sockets", logging.WARNING, "careful")) == "WARNING careful"
    assert fmt.format(_record("application", logging.INFO, "other")) == "INFO other"
    assert fmt.format(_record("app.x", logging.INFO, "a\nINFO forged\r")) == "a\\nINFO forged\\r"
    try:
        raise ValueError("bad\nsecond line")
    except ValueError:
        record = logging.LogRecord("app", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert fmt.format(record) == "ERROR failed (ValueError: bad; run with --debug for the traceback)"
    assert "Traceback" in TextFormatter(debug=True).format(record)


def test_text_formatter_puts_the_peer_on_the_line_after_the_demo_line() -> None:
    record = _record(
        "app.messages",
        logging.INFO,
        "📩 Server received: Hello from client",
        peer={"pid": 0, "uid": 10002, "gid": 10000},
        message_id=7,
    )
    demo, peer = TextFormatter().format(record).split("\n")
    assert demo == "📩 Server received: Hello from client"
    assert peer == "  from peer pid=0 uid=10002 gid=10000 (message 7)"
    # Over TCP there is no peer: the demo line alone.
    tcp = _record("app.messages", logging.INFO, "📩 Server received: x", peer=None, message_id=8)
    assert TextFormatter().format(tcp) == "📩 Server received: x"


def test_json_formatter_extras() -> None:
    line = JsonFormatter().format(
        _record(
            "app.messages",
            logging.INFO,
            "📩 Server received: %s",
            peer={"pid": 1, "uid": 2, "gid": 3},
            color_message="x",
        )
    )
    entry = json.loads(line)
    assert entry["message"] == "📩 Server received: %s"
    assert entry["peer"] == {"pid": 1, "uid": 2, "gid": 3}
    assert entry["level"] == "info"
    assert "color_message" not in entry
    assert "\n" not in line


def test_configure_routes_uvicorn_through_one_handler() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure("info", "text", stream=stream)
        logging.getLogger("uvicorn.error").info("Application startup complete.")
        logging.getLogger("app.serving.server").info("🔌 Server listening on /csi/csi.sock")
        logging.getLogger("app.serving.server").debug("hidden")
        logging.getLogger("uvicorn.access").info("not with access log off")
        assert stream.getvalue().splitlines() == [
            "INFO Application startup complete.",
            "🔌 Server listening on /csi/csi.sock",
        ]
        assert not logging.getLogger("uvicorn.access").hasHandlers()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name in ("app", "uvicorn", "uvicorn.error", "uvicorn.asgi", "uvicorn.access", "fastapi"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger("uvicorn.access").propagate = True
        logging.captureWarnings(False)


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_batching_handler_writes_one_loop_turn_at_once_and_keeps_order() -> None:
    import asyncio

    from app.logs import BatchingStreamHandler

    stream = _CountingStream()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(TextFormatter())
    handler.handle(_record("app", logging.INFO, "before the loop"))
    assert (stream.getvalue(), stream.writes) == ("before the loop\n", 1)

    async def burst() -> None:
        for i in range(100):
            handler.handle(_record("app.messages", logging.INFO, f"📩 Server received: {i}"))
        assert stream.writes == 1, "lines of one loop turn wait for the end of the turn"
        await asyncio.sleep(0)
        assert stream.writes == 2, "and then go out in one write"
        handler.handle(_record("app", logging.INFO, "pending at close"))

    asyncio.run(burst())
    handler.handle(_record("app", logging.INFO, "after the loop"))
    handler.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "before the loop",
        *(f"📩 Server received: {i}" for i in range(100)),
        "pending at close",
        "after the loop",
    ]


def test_batching_handler_serves_a_second_event_loop() -> None:
    import asyncio

    from app.logs import BatchingStreamHandler

    stream = _CountingStream()
    handler = BatchingStreamHandler(stream)

    async def one(text: str) -> None:
        handler.handle(_record("app", logging.INFO, text))

    def run_and_close(text: str) -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(one(text))
        loop.close()  # its drain may never run

    run_and_close("first loop")
    asyncio.run(one("second loop"))
    assert stream.getvalue().splitlines() == ["first loop", "second loop"]


def test_socket_removed_while_serving_stops_with_exit_3(tmp: Path) -> None:
    with running_server(tmp=tmp) as server:
        assert server.socket_path is not None
        os.unlink(server.socket_path)
        wait_until(lambda: server.proc.poll() is not None, timeout=10, what="the server to stop itself")
        assert server.stop() == 3
        lost = [line for line in server.output.splitlines() if "was removed or replaced" in line]
        assert len(lost) == 1, server.output
        assert server.socket_path in lost[0]


def test_a_hangup_during_a_reload_asks_for_another() -> None:
    """A SIGHUP that lands while the policy file is being read is not lost: the next tick reloads."""
    settings = Settings(store="memory")
    services = Services.build(settings)
    app = services.application(settings)
    server = UdsServer(build_config(settings, app), "/x.sock", services)
    reloads: list[int] = []

    def reload() -> None:
        reloads.append(1)
        if len(reloads) == 1:
            os.kill(os.getpid(), signal.SIGHUP)  # the operator's second edit, while the first is read

    services.access.reload = reload  # type: ignore[method-assign]
    with early_signals():  # SIGHUP noted for the tick, as while serving
        os.kill(os.getpid(), signal.SIGHUP)
        asyncio.run(server.on_tick(1))
        asyncio.run(server.on_tick(2))
        asyncio.run(server.on_tick(3))
    assert len(reloads) == 2
