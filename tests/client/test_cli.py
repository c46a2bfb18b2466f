"""``uds-client`` as a user runs it: a real process against a real server; every exit code."""

from __future__ import annotations

import contextlib
import json
import signal
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli import _main as cli
from tests.support import PYTHON, ROOT, run_cli, running_server, wait_until

REPLY_LINE = "📥 Client received: Hello from server via UDS"


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


# --- exit 0 ----------------------------------------------------------------------------------------


def test_send_prints_the_demo_line(server_path: str) -> None:
    result = run_cli("--socket", server_path, "send", "Hello from client")
    assert result.returncode == 0, result.stderr
    assert result.stdout == REPLY_LINE + "\n"
    assert result.stderr == ""


def test_send_json(server_path: str) -> None:
    result = run_cli("--socket", "unix://" + server_path, "send", "as json", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["text"] == "as json"
    assert body["reply"] == "Hello from server via UDS"
    assert set(body["peer"]) == {"pid", "uid", "gid"}


def test_socket_from_env_and_flag_precedence(server_path: str, tmp_short: Path) -> None:
    env = {"UDS_SOCKET": f"unix://{server_path}"}
    assert run_cli("health", env=env).returncode == 0
    flag_wins = run_cli("--socket", str(tmp_short / "other.sock"), "health", env=env)
    assert flag_wins.returncode == 3
    assert str(tmp_short / "other.sock") in flag_wins.stderr


def test_messages_text_and_json(server_path: str) -> None:
    for text in ("first", "second"):
        assert run_cli("--socket", server_path, "send", text).returncode == 0
    result = run_cli("--socket", server_path, "messages", "--limit", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(": first")
    assert lines[1].endswith(": second")
    as_json = json.loads(run_cli("--socket", server_path, "messages", "--limit", "2", "--json").stdout)
    assert [m["text"] for m in as_json["messages"]] == ["first", "second"]


def test_version_text_and_json(server_path: str) -> None:
    text = run_cli("--socket", server_path, "version")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("app ")
    data = json.loads(run_cli("--socket", server_path, "version", "--json").stdout)
    assert data["app"] == "1.0.0"
    assert {"python", "uvicorn", "fastapi"} <= set(data)


def test_openapi_to_stdout_and_file(server_path: str, tmp_short: Path) -> None:
    printed = run_cli("--socket", server_path, "openapi")
    assert printed.returncode == 0, printed.stderr
    assert "/messages" in json.loads(printed.stdout)["paths"]
    target = tmp_short / "spec.json"
    written = run_cli("--socket", server_path, "openapi", "--output", str(target))
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert json.loads(target.read_text(encoding="utf-8")) == json.loads(printed.stdout)


def test_openapi_to_an_unwritable_place_is_one_line(server_path: str, tmp_short: Path) -> None:
    result = run_cli("--socket", server_path, "openapi", "--output", str(tmp_short / "no" / "dir.json"))
    assert result.returncode == 2
    assert "cannot write" in _one_error_line(result)


def test_raw_get(server_path: str) -> None:
    result = run_cli("--socket", server_path, "get", "/healthz")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"status": "ok"}


def test_health_and_ready_are_quiet(server_path: str) -> None:
    for args in (("health",), ("health", "--ready")):
        result = run_cli("--socket", server_path, *args)
        assert result.returncode == 0
        assert result.stdout == ""
        assert result.stderr == ""


def test_version_flag() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "uds-client 1.0.0"


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("send", "messages", "version", "openapi", "get", "health", "bench", "proxy", "docs"):
        assert command in result.stdout
    assert "--every" in run_cli("send", "--help").stdout


# --- exit 1: the server answered an error ----------------------------------------------------------


def test_get_unknown_path_exits_1_printing_the_body(server_path: str) -> None:
    result = run_cli("--socket", server_path, "get", "/messages/987654")
    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == 404
    line = _one_error_line(result)
    assert f"unix://{server_path} answered 404 for GET /messages/987654" in line


def test_empty_text_exits_1_with_the_servers_message(server_path: str) -> None:
    result = run_cli("--socket", server_path, "send", "")
    assert result.returncode == 1
    assert "answered 422" in _one_error_line(result)


def test_too_long_text_exits_1(server_path: str) -> None:
    result = run_cli("--socket", server_path, "send", "x" * 5000)
    assert result.returncode == 1
    assert "answered 422" in _one_error_line(result)


# --- exit 2: usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("send",),
        ("--timeout", "abc", "health"),
        ("--timeout", "0", "health"),
        ("--wait", "-1", "health"),
        ("messages", "--limit", "0"),
        ("send", "x", "--every", "1", "--then-wait"),
        ("--sock", "/x.sock", "health"),
    ],
)
def test_bad_usage_exits_2(args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "usage:" in result.stderr


@pytest.mark.parametrize("address", ["relative.sock", "tcp://127.0.0.1:80", "unix://host/x.sock"])
def test_bad_address_exits_2_quoting_it(address: str) -> None:
    result = run_cli("--socket", address, "health")
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "invalid socket address" in line
    assert repr(address) in line


def test_bad_address_from_env_exits_2() -> None:
    result = run_cli("health", env={"UDS_SOCKET": "ftp://x"})
    assert result.returncode == 2
    assert "'ftp://x'" in _one_error_line(result)


def test_get_needs_an_absolute_path(server_path: str) -> None:
    result = run_cli("--socket", server_path, "get", "healthz")
    assert result.returncode == 2
    assert "must start with '/'" in _one_error_line(result)


def test_missing_external_command_module_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli._EXTERNAL, "ghost", ("client.ghost_command_absent", "a missing command"))
    monkeypatch.setitem(cli._COMMANDS, "ghost", ("a missing command", None, cli._external_builder("ghost")))
    assert cli.main(["ghost"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "Error: 'uds-client ghost' is not available: module client.ghost_command_absent is not installed"
    )


# --- exit 3: cannot reach the socket ---------------------------------------------------------------


def test_nonexistent_socket_exits_3_with_one_clear_line() -> None:
    result = run_cli("--socket", "/nonexistent/x.sock", "health")
    assert result.returncode == 3
    assert _one_error_line(result) == (
        "Error: cannot connect to unix:///nonexistent/x.sock (no such file). Is the server running?"
    )
    send = run_cli("--socket", "/nonexistent/x.sock", "send", "x")
    assert send.returncode == 3
    assert _one_error_line(send) == _one_error_line(result)


def test_refused_socket_exits_3(refused_socket: str) -> None:
    for command in (("health",), ("send", "x")):
        result = run_cli("--socket", refused_socket, *command)
        assert result.returncode == 3
        assert "(connection refused)" in _one_error_line(result)


def test_silent_server_exits_3_timed_out(silent_socket: str) -> None:
    for command in (("health",), ("send", "x")):
        result = run_cli("--socket", silent_socket, "--timeout", "0.3", *command)
        assert result.returncode == 3
        line = _one_error_line(result)
        assert "(timed out)" in line
        assert "--timeout" in line


def test_debug_shows_the_traceback_and_request_log(server_path: str) -> None:
    failed = run_cli("--debug", "--socket", "/nonexistent/x.sock", "send", "x")
    assert failed.returncode == 3
    assert "Traceback" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("Error: cannot connect")
    ok = run_cli("--debug", "--socket", server_path, "send", "logged")
    assert ok.returncode == 0
    assert "POST /messages -> 201" in ok.stderr


# --- send --every / --then-wait: a container's main process ------------------------------------


@contextlib.contextmanager
def _cli_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Run ``uds-client`` in the background, collecting its stdout lines; killed if still alive."""
    with subprocess.Popen([PYTHON, "-m", "client", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT) as proc:
        assert proc.stdout is not None
        stream = proc.stdout
        lines: list[str] = []

        def pump() -> None:
            for line in stream:
                lines.append(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            yield proc, lines
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_send_every_repeats_until_a_signal_then_exits_0(server_path: str, sig: signal.Signals) -> None:
    with _cli_process("--socket", server_path, "send", "periodic", "--every", "0.05") as (proc, lines):
        wait_until(lambda: len(lines) >= 3, timeout=15, what="three periodic sends")
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
    assert set(lines) == {REPLY_LINE}


def test_send_then_wait_idles_until_sigterm(server_path: str) -> None:
    with _cli_process("--socket", server_path, "send", "Hello from client", "--then-wait") as (proc, lines):
        wait_until(lambda: lines == [REPLY_LINE], timeout=15, what="the reply line")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert lines == [REPLY_LINE]


def test_send_every_keeps_going_when_the_server_goes_away(tmp_short: Path) -> None:
    with running_server(tmp=tmp_short) as own:
        assert own.socket_path is not None
        with _cli_process("--socket", own.socket_path, "send", "x", "--every", "0.05") as (proc, lines):
            wait_until(lambda: len(lines) >= 1, timeout=15, what="the first reply")
            own.stop()
            assert proc.stderr is not None
            first_error = wait_until(proc.stderr.readline, timeout=15, what="an error line")
            assert first_error.startswith("Error: ")
            assert own.socket_path in first_error
            assert proc.poll() is None  # still running: the container does not crash-loop
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0


# --- one-shot cost ---------------------------------------------------------------------------------


def test_health_does_not_import_httpx(server_path: str) -> None:
    code = (
        "import sys\n"
        "from client.cli import main\n"
        f"rc = main(['--socket', {server_path!r}, 'health'])\n"
        "heavy = sorted(m for m in ('httpx', 'httpcore', 'h11', 'anyio', 'http.client', 'email') "
        "if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 []"


def test_send_does_not_import_httpx(server_path: str) -> None:
    code = (
        "import sys\n"
        "from client.cli import main\n"
        f"rc = main(['--socket', {server_path!r}, 'send', 'lean'])\n"
        "print(rc, sorted(m for m in ('httpx', 'httpcore', 'h11', 'anyio') if m in sys.modules))\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 []"


def test_cli_module_top_level_imports_only_the_standard_library() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import client.cli\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "stdlib = set(sys.stdlib_module_names)\n"
        "print(sorted(n for n in new if n not in stdlib and n != 'client'))\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_command_word_is_found_after_global_options() -> None:
    assert cli._command_in(["--socket", "send", "health"]) == "health"
    assert cli._command_in(["--timeout", "3", "--debug", "bench", "--x"]) == "bench"
    assert cli._command_in(["--socket=/a.sock", "proxy"]) == "proxy"
    assert cli._command_in(["--debug"]) is None


# --- health against answers a real server rarely gives -------------------------------------------


class _CannedHandler(socketserver.BaseRequestHandler):
    server: _CannedServer

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            data += chunk
        self.request.sendall(self.server.answer)


class _CannedServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, answer: bytes) -> None:
        self.answer = answer
        super().__init__(path, _CannedHandler)


@contextlib.contextmanager
def _canned(tmp: Path, answer: bytes) -> Iterator[str]:
    """A socket whose every request gets ``answer`` (raw bytes), then the connection closes."""
    server = _CannedServer(str(tmp / "canned.sock"), answer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield str(server.server_address)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_health_ready_exits_1_while_draining(tmp_short: Path) -> None:
    body = b'{"status":"draining"}'
    answer = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
    with _canned(tmp_short, answer) as path:
        result = run_cli("--socket", path, "health", "--ready")
    assert result.returncode == 1
    assert _one_error_line(result) == (
        f'Error: unix://{path} is not ready: /readyz answered 503 {{"status":"draining"}}'
    )


def test_health_reads_a_chunked_answer(tmp_short: Path) -> None:
    answer = (b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n"
              b"5\r\nbroke\r\n3;x=1\r\nn!!\r\n0\r\n\r\n")
    with _canned(tmp_short, answer) as path:
        result = run_cli("--socket", path, "health")
    assert result.returncode == 1
    assert _one_error_line(result).endswith("/healthz answered 500 broken!!")


def test_health_against_something_that_is_not_http_exits_3(tmp_short: Path) -> None:
    with _canned(tmp_short, b"SSH-2.0-OpenSSH_9.2\r\n\r\n") as path:
        result = run_cli("--socket", path, "health")
    assert result.returncode == 3
    assert "did not answer with HTTP/1.x" in _one_error_line(result)
