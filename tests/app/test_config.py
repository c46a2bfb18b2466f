"""Settings: flag > environment > default, every bad value named, and the uds-server CLI around it."""

from __future__ import annotations

import grp
import os
import re
import subprocess

import pytest

from app.__main__ import build_parser, main, parse_settings
from app.config import Settings, SettingsError, options
from tests.support import PYTHON, ROOT


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.socket == "/csi/csi.sock"
    assert s.socket_mode == 0o660
    assert s.socket_group is None
    assert s.shutdown_timeout == 20.0
    assert s.access_log is False
    assert s.log_format == "text"
    assert s.debug is False
    assert s.send_timeout == 30.0
    assert s.max_connections == 512
    assert not s.uses_tcp
    assert s.socket == "/csi/csi.sock"


def test_env_overrides_default_and_flag_overrides_env() -> None:
    env = {"UDS_SOCKET": "unix:///env/e.sock", "UDS_SOCKET_MODE": "0600", "UDS_SHUTDOWN_TIMEOUT": "5"}
    from_env = Settings.from_env(env)
    assert from_env.socket == "/env/e.sock"
    assert from_env.socket_mode == 0o600
    assert from_env.shutdown_timeout == 5.0
    flagged = Settings.from_env(env, socket="/flag/f.sock", socket_mode="0640", shutdown_timeout=None)
    assert flagged.socket == "/flag/f.sock"
    assert flagged.socket_mode == 0o640
    assert flagged.shutdown_timeout == 5.0, "a flag that was not given (None) leaves the env value"


def test_empty_env_value_means_unset() -> None:
    assert Settings.from_env({"UDS_SOCKET_MODE": ""}).socket_mode == 0o660


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("unix:///csi/csi.sock", "/csi/csi.sock"),
        ("unix:/csi/csi.sock", "/csi/csi.sock"),
        ("/csi/csi.sock", "/csi/csi.sock"),
        ("http+unix://%2Fcsi%2Fcsi.sock", "/csi/csi.sock"),
    ],
)
def test_address_spellings(value: str, path: str) -> None:
    assert Settings.from_env({"UDS_SOCKET": value}).socket == path
    assert Settings.from_env({}, socket=value).socket == path


ENV = {name: option.env for name, option in options()}


def test_help_shows_each_option_with_env_var_and_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for name, var in ENV.items():
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"{flag}\b[^\[]*\[env {var}; default [^\]]+\]", text), (flag, text)
    assert "default unix:///csi/csi.sock]" in text
    assert "http+unix://%2F..." in text
    assert "default 0660]" in text
    assert "default 20.0]" in text
    assert "[env UDS_SEND_TIMEOUT; default 30.0]" in text
    assert "[env UDS_MAX_CONNECTIONS; default 512]" in text
    assert "[env UDS_DEBUG; default off]" in text


def _parsed(*argv: str, env: dict[str, str] | None = None) -> Settings:
    return parse_settings(argv, env or {})


def test_flags_through_the_parser() -> None:
    s = _parsed(
        "--allow-uid",
        "1000",
        "--allow-uid",
        "1001",
        "--send-timeout",
        "2.5",
        "--max-connections",
        "64",
        "--access-log",
        env={"UDS_MAX_CONNECTIONS": "8"},
    )
    assert s.allow_uid == (1000, 1001)
    assert s.send_timeout == 2.5
    assert s.max_connections == 64, "the flag beats the environment"
    assert s.access_log is True
    assert _parsed(env={"UDS_MAX_CONNECTIONS": "8"}).max_connections == 8
    assert _parsed("--no-debug", env={"UDS_DEBUG": "1"}).debug is False
    assert _parsed(env={"UDS_DEBUG": "1"}).debug is True


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("socket_mode", "999", "invalid value '999' for --socket-mode (UDS_SOCKET_MODE): invalid literal"),
        ("socket_mode", "0400", "--socket-mode (UDS_SOCKET_MODE): the owner needs read and write (0600)"),
        ("socket_mode", "1777", "--socket-mode (UDS_SOCKET_MODE): must be an octal mode like 660"),
        ("socket_group", "no-such-group-x", "(UDS_SOCKET_GROUP): no group named 'no-such-group-x'"),
        ("allow_uid", "abc", "invalid value 'abc' for --allow-uid (UDS_ALLOW_UID)"),
        ("allow_gid", "-1", "--allow-gid (UDS_ALLOW_GID)"),
        ("port", "70000", "invalid value '70000' for --port (UDS_PORT): must be 0..65535"),
        ("log_level", "loud", "(UDS_LOG_LEVEL): choose one of critical, error, warning, info, debug"),
        ("log_format", "xml", "--log-format (UDS_LOG_FORMAT): choose one of text, json"),
        ("access_log", "maybe", "--access-log (UDS_ACCESS_LOG): use true or false"),
        ("debug", "2", "--debug (UDS_DEBUG): use true or false"),
        ("max_text_length", "0", "--max-text-length (UDS_MAX_TEXT_LENGTH): must be at least 1"),
        ("max_body_bytes", "lots", "--max-body-bytes (UDS_MAX_BODY_BYTES)"),
        ("history_size", "-5", "--history-size (UDS_HISTORY_SIZE): must be at least 1"),
        ("idempotency_keys", "0", "--idempotency-keys (UDS_IDEMPOTENCY_KEYS): must be at least 1"),
        ("shutdown_timeout", "0", "--shutdown-timeout (UDS_SHUTDOWN_TIMEOUT): must be greater than 0"),
        ("keepalive_timeout", "soon", "--keepalive-timeout (UDS_KEEPALIVE_TIMEOUT)"),
        ("request_timeout", "-1", "--request-timeout (UDS_REQUEST_TIMEOUT): must be greater than 0"),
        ("send_timeout", "0", "--send-timeout (UDS_SEND_TIMEOUT): must be greater than 0"),
        ("max_connections", "0", "--max-connections (UDS_MAX_CONNECTIONS): must be at least 1"),
        ("socket", "tcp://x:1", "--socket (UDS_SOCKET): invalid socket address 'tcp://x:1'"),
        ("socket", "relative.sock", "--socket (UDS_SOCKET): invalid socket address 'relative.sock'"),
    ],
)
def test_bad_values_name_the_setting(field: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as from_flag:
        Settings.from_env({}, **{field: value})
    assert expected in str(from_flag.value)
    with pytest.raises(SettingsError) as from_env:
        Settings.from_env({ENV[field]: value})
    assert str(from_env.value) == str(from_flag.value)


def test_socket_path_too_long_is_a_usage_error() -> None:
    with pytest.raises(SettingsError, match=r"the path is 120 bytes, AF_UNIX allows at most 107"):
        Settings.from_env({}, socket="/tmp/" + "x" * 115)


def test_host_needs_port() -> None:
    with pytest.raises(SettingsError, match=r"--host needs --port \(UDS_PORT\)"):
        Settings.from_env({"UDS_HOST": "127.0.0.1"})
    tcp = Settings.from_env({"UDS_HOST": "127.0.0.1", "UDS_PORT": "0"})
    assert tcp.uses_tcp
    assert (tcp.host, tcp.port) == ("127.0.0.1", 0)


def test_conversions() -> None:
    root = grp.getgrgid(0).gr_name
    s = Settings.from_env(
        {"UDS_ALLOW_UID": "1000, 1001", "UDS_ACCESS_LOG": "yes", "UDS_LOG_LEVEL": "DEBUG"},
        allow_gid=["5", "6"],
        socket_group=root,
        socket_mode="640",
    )
    assert s.allow_uid == (1000, 1001)
    assert s.allow_gid == (5, 6)
    assert s.access_log is True
    assert s.log_level == "debug"
    assert s.socket_group == 0
    assert s.socket_mode == 0o640


def test_unknown_override_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="unknown setting 'sockets'"):
        Settings.from_env({}, sockets="/x")


def _server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run(
        [PYTHON, "-m", "app", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (
            ["--socket-mode", "999"],
            {},
            "Error: invalid value '999' for --socket-mode (UDS_SOCKET_MODE): "
            "invalid literal for int() with base 8: '999'",
        ),
        (
            [],
            {"UDS_SOCKET_MODE": "0400"},
            "Error: invalid value '0400' for --socket-mode (UDS_SOCKET_MODE): "
            "the owner needs read and write (0600) to serve the socket",
        ),
        (
            ["--log-format", "xml"],
            {},
            "Error: invalid value 'xml' for --log-format (UDS_LOG_FORMAT): choose one of text, json",
        ),
    ],
)
def test_cli_bad_value_is_one_line_exit_2(
    args: list[str],
    env: dict[str, str],
    line: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in [n for n in os.environ if n.startswith("UDS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line]
    assert captured.out == ""


def test_cli_unknown_flag_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--no-such-flag"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_cli_help_and_version_exit_0() -> None:
    """The real command: ``python -m app``, as the images run it."""
    result = _server("--help")
    assert result.returncode == 0
    assert "UDS_SOCKET_GROUP" in result.stdout
    version = _server("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == "uds-server 1.0.0"
