"""``uds-client``: a few runs as a user makes them (a real process against a real server), and its
output and every exit code in process, ``main([...])`` against real and raw servers."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli import _main as cli
from tests.client.conftest import Drip, answering, json_answer, raw_server
from tests.support import PYTHON, ROOT, run_cli, running_server, wait_until

REPLY_LINE = "📥 Client received: Hello from server via UDS"


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


# --- as a user runs it: a real process ------------------------------------------------------------


def test_send_prints_the_demo_line(server_path: str) -> None:
    result = run_cli("--socket", server_path, "send", "Hello from client")
    assert result.returncode == 0, result.stderr
    assert result.stdout == REPLY_LINE + "\n"
    assert result.stderr == ""


def test_health_from_the_env_var_is_quiet(server_path: str) -> None:
    result = run_cli("health", "--ready", env={"UDS_SOCKET": f"unix://{server_path}"})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_nonexistent_socket_exits_3_with_one_clear_line() -> None:
    result = run_cli("--socket", "/nonexistent/x.sock", "send", "x")
    assert result.returncode == 3
    assert _one_error_line(result) == (
        "Error: cannot connect to unix:///nonexistent/x.sock (no such file). Is the server running?"
    )


def test_send_against_a_dripping_server_ends_within_the_timeout(dripping: tuple[str, Drip]) -> None:
    path, drip = dripping
    started = time.monotonic()
    result = run_cli("--socket", path, "--timeout", "1", "send", "x")
    elapsed = time.monotonic() - started
    assert result.returncode == 3
    assert "(timed out)" in _one_error_line(result)
    assert drip.sent >= 3  # the server kept sending: only a deadline on the whole request ends this
    assert elapsed < 1 * 2 + 1 + 1.5, f"took {elapsed:.2f}s"  # + the interpreter's start


def test_bad_usage_exits_2() -> None:
    result = run_cli("send", "x", "--every", "1", "--then-wait")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "usage:" in result.stderr


def test_debug_shows_the_traceback_and_request_log(server_path: str) -> None:
    failed = run_cli("--debug", "--socket", "/nonexistent/x.sock", "send", "x")
    assert failed.returncode == 3
    assert "Traceback" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("Error: cannot connect")
    ok = run_cli("--debug", "--socket", server_path, "send", "logged")
    assert ok.returncode == 0
    assert "GET /_ping -> 200" in ok.stderr
    assert "POST /v1/messages -> 201" in ok.stderr


# --- output, in process: main() against a real server ------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in err
    return lines[0]


def test_send_json(server_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--socket", "unix://" + server_path, "send", "as json", "--json")
    assert (code, err) == (0, "")
    body = json.loads(out)
    assert body["text"] == "as json"
    assert body["reply"] == "Hello from server via UDS"
    assert set(body["peer"]) == {"pid", "uid", "gid"}


def test_socket_flag_wins_over_the_env_var(
    server_path: str, tmp_short: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UDS_SOCKET", f"unix://{server_path}")
    assert _run(capsys, "version")[0] == 0
    code, _, err = _run(capsys, "--socket", str(tmp_short / "other.sock"), "health")
    assert code == 3
    assert str(tmp_short / "other.sock") in _error_line(err)


def test_messages_text_and_json(server_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    for text in ("first", "second"):
        assert _run(capsys, "--socket", server_path, "send", text)[0] == 0
    code, out, err = _run(capsys, "--socket", server_path, "messages", "--limit", "2")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(": first")
    assert lines[1].endswith(": second")
    code, out, _ = _run(capsys, "--socket", server_path, "messages", "--limit", "2", "--json")
    assert [m["text"] for m in json.loads(out)["messages"]] == ["first", "second"]


def test_version_text_and_json(server_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--socket", server_path, "version")
    assert (code, err) == (0, "")
    assert out.startswith("app ")
    data = json.loads(_run(capsys, "--socket", server_path, "version", "--json")[1])
    assert data["app"] == "1.0.0"
    assert {"python", "uvicorn", "fastapi"} <= set(data)


def test_openapi_to_stdout_and_file(
    server_path: str, tmp_short: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, printed, err = _run(capsys, "--socket", server_path, "openapi")
    assert (code, err) == (0, "")
    assert "/v1/messages" in json.loads(printed)["paths"]
    target = tmp_short / "spec.json"
    assert _run(capsys, "--socket", server_path, "openapi", "--output", str(target)) == (0, "", "")
    assert json.loads(target.read_text(encoding="utf-8")) == json.loads(printed)


def test_openapi_to_an_unwritable_place_is_one_line(
    server_path: str, tmp_short: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(tmp_short / "no" / "d.json")
    code, _, err = _run(capsys, "--socket", server_path, "openapi", "--output", target)
    assert code == 2
    assert "cannot write" in _error_line(err)


def test_raw_get(server_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--socket", server_path, "get", "/healthz")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"status": "ok"}


def test_health_and_ready_are_quiet(server_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (("health",), ("health", "--ready")):
        assert _run(capsys, "--socket", server_path, *args) == (0, "", "")


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == "uds-client 1.0.0"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("send", "messages", "version", "openapi", "get", "health", "proxy", "docs"):
        assert command in out
    assert "bench" not in out  # a developer tool now: benchmarks/bench.py
    assert "connect, send and the entire answer" in " ".join(out.split())
    with pytest.raises(SystemExit):
        cli.main(["send", "--help"])
    assert "--every" in capsys.readouterr().out


# --- exit 1: the server answered an error ----------------------------------------------------------


def test_get_unknown_path_exits_1_printing_the_body(
    server_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "--socket", server_path, "get", "/messages/987654")
    assert code == 1
    assert json.loads(out)["status"] == 404
    assert f"unix://{server_path} answered 404 for GET /messages/987654" in _error_line(err)


@pytest.mark.parametrize("text", ["", "x" * 5000])
def test_invalid_text_exits_1_with_the_servers_message(
    server_path: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "--socket", server_path, "send", text)
    assert (code, out) == (1, "")
    assert "answered 422" in _error_line(err)


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
def test_bad_usage_exits_2_in_process(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "usage:" in err


@pytest.mark.parametrize("address", ["relative.sock", "tcp://127.0.0.1:80", "unix://host/x.sock"])
def test_bad_address_exits_2_quoting_it(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "--socket", address, "health")
    assert code == 2
    line = _error_line(err)
    assert "invalid socket address" in line
    assert repr(address) in line


def test_bad_address_from_env_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UDS_SOCKET", "ftp://x")
    code, _, err = _run(capsys, "send", "x")
    assert code == 2
    assert "'ftp://x'" in _error_line(err)


def test_get_needs_an_absolute_path(server_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "--socket", server_path, "get", "healthz")
    assert code == 2
    assert "must start with '/'" in _error_line(err)


def test_missing_external_command_module_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli._EXTERNAL, "ghost", "client.ghost_command_absent")
    monkeypatch.setitem(cli._COMMANDS, "ghost", "a missing command")
    assert cli.main(["ghost"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "Error: 'uds-client ghost' is not available: module client.ghost_command_absent is not installed"
    )


# --- exit 3: cannot reach the socket ---------------------------------------------------------------


@pytest.mark.parametrize("command", [("health",), ("send", "x"), ("messages",)])
def test_unreachable_sockets_exit_3(
    refused_socket: str, command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "--socket", "/nonexistent/x.sock", *command)
    assert code == 3
    assert _error_line(err) == (
        "Error: cannot connect to unix:///nonexistent/x.sock (no such file). Is the server running?"
    )
    code, _, err = _run(capsys, "--socket", refused_socket, *command)
    assert code == 3
    assert "(connection refused)" in _error_line(err)


@pytest.mark.parametrize("command", [("health",), ("send", "x")])
def test_silent_server_exits_3_timed_out(
    silent_socket: str, command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "--socket", silent_socket, "--timeout", "0.3", *command)
    assert code == 3
    line = _error_line(err)
    assert "(timed out)" in line
    assert "--timeout" in line


@pytest.mark.parametrize("command", [("health",), ("send", "x"), ("version",)])
def test_a_dripping_server_cannot_outlast_the_timeout(
    dripping: tuple[str, Drip], command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    path, drip = dripping
    started = time.monotonic()
    code, _, err = _run(capsys, "--socket", path, "--timeout", "1", *command)
    elapsed = time.monotonic() - started
    assert code == 3
    assert "(timed out)" in _error_line(err)
    assert drip.sent >= 3
    assert elapsed < 1 * 2 + 1, f"took {elapsed:.2f}s"


# --- send --every / --then-wait: a container's main process ------------------------------------


@contextlib.contextmanager
def _cli_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Run ``uds-client`` in the background, collecting its stdout lines; killed if still alive."""
    with subprocess.Popen(
        [PYTHON, "-m", "client", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    ) as proc:
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


def test_health_imports_no_http_library(server_path: str) -> None:
    code = (
        "import sys\n"
        "from client.cli import main\n"
        f"rc = main(['--socket', {server_path!r}, 'health'])\n"
        "heavy = sorted(m for m in ('httpx2', 'httpcore2', 'h11', 'anyio', 'http.client', 'email', 'orjson') "
        "if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 []"


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
    assert cli._command_in(["--timeout", "3", "--debug", "events", "--x"]) == "events"
    assert cli._command_in(["--socket=/a.sock", "proxy"]) == "proxy"
    assert cli._command_in(["--debug"]) is None


# --- answers a real server rarely gives ----------------------------------------------------------


@contextlib.contextmanager
def _canned(tmp: Path, answer: bytes) -> Iterator[str]:
    """A socket whose every request gets ``answer`` (raw bytes), then the connection closes."""
    with raw_server(str(tmp / "canned.sock"), answering(answer)) as path:
        yield path


def test_health_ready_exits_1_while_draining(tmp_short: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _canned(tmp_short, json_answer(503, b'{"status":"draining"}', "Service Unavailable")) as path:
        code, _, err = _run(capsys, "--socket", path, "health", "--ready")
    assert code == 1
    assert _error_line(err) == (
        f'Error: unix://{path} is not ready: /readyz answered 503 {{"status":"draining"}}'
    )


def test_health_reads_a_chunked_answer(tmp_short: Path, capsys: pytest.CaptureFixture[str]) -> None:
    answer = (
        b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nbroke\r\n3;x=1\r\nn!!\r\n0\r\n\r\n"
    )
    with _canned(tmp_short, answer) as path:
        code, _, err = _run(capsys, "--socket", path, "health")
    assert code == 1
    assert _error_line(err).endswith("/healthz answered 500 broken!!")


def test_health_against_something_that_is_not_http_exits_3(
    tmp_short: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _canned(tmp_short, b"SSH-2.0-OpenSSH_9.2\r\n\r\n") as path:
        code, _, err = _run(capsys, "--socket", path, "health")
    assert code == 3
    assert "did not answer with HTTP/1.x" in _error_line(err)


@pytest.mark.parametrize("body", [b"{}", b"[]", b'{"id":1}'])
def test_a_201_that_is_not_a_message_exits_1_with_one_line(
    tmp_short: Path, body: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    with _canned(tmp_short, json_answer(201, body, "Created")) as path:
        code, out, err = _run(capsys, "--socket", path, "send", "x")
    assert (code, out) == (1, "")
    assert _error_line(err) == f"Error: the server's answer is not a message: {body.decode()}"


_HOSTILE = "bad\r\x1b[2J\x1b]0;owned\x07\x9b31m\u202eevil\nline"
_ESCAPED = "bad\\r\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202eevil\\nline"


def test_server_text_in_error_lines_is_escaped(tmp_short: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = json.dumps({"status": 500, "error": "x", "message": _HOSTILE}).encode()
    with _canned(tmp_short, json_answer(500, body, "Oops")) as path:
        code, _, err = _run(capsys, "--socket", path, "send", "x")
        assert code == 1
        assert _error_line(err) == f"Error: unix://{path} answered 500: {_ESCAPED}"
    with _canned(tmp_short, json_answer(500, _HOSTILE.encode(), "Oops")) as path:
        code, _, err = _run(capsys, "--socket", path, "health")
        assert code == 1
        assert _error_line(err).endswith(f"/healthz answered 500 {_ESCAPED}")
    with _canned(tmp_short, json_answer(200, _HOSTILE.encode(), "OK")) as path:
        code, _, err = _run(capsys, "--socket", path, "version")
        assert code == 1
        assert _error_line(err) == f"Error: the server answered 200 with a body that is not JSON: {_ESCAPED}"


def test_server_text_in_normal_output_is_escaped(tmp_short: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = {
        "id": 1,
        "text": _HOSTILE,
        "reply": _HOSTILE,
        "received_at": "2026-01-01T00:00:00Z",
        "peer": None,
    }
    with _canned(tmp_short, json_answer(201, json.dumps(message).encode(), "Created")) as path:
        code, out, _ = _run(capsys, "--socket", path, "send", "x")
        assert (code, out) == (0, f"📥 Client received: {_ESCAPED}\n")
        code, out, _ = _run(capsys, "--socket", path, "send", "x", "--json")
        assert code == 0
        assert not {"\x1b", "\x9b", "\u202e", "\r"} & set(out)
        assert json.loads(out)["reply"] == _HOSTILE  # still the same JSON
    listing = json.dumps({"messages": [message]}).encode()
    with _canned(tmp_short, json_answer(200, listing, "OK")) as path:
        code, out, _ = _run(capsys, "--socket", path, "messages")
        assert (code, out) == (0, f"#1 2026-01-01T00:00:00Z tcp: {_ESCAPED}\n")
