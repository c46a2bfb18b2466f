"""Socket address spellings: every accepted form, and an error quoting each bad value."""

from __future__ import annotations

import os
import shutil
import subprocess
from urllib.parse import quote

import pytest

from client.address import DEFAULT_ADDRESS, ENV_VAR, MAX_PATH_BYTES, AddressError, parse_address, to_url
from tests.support import PYTHON, ROOT, ServerProcess, run_cli, short_tmpdir


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/csi/csi.sock", "/csi/csi.sock"),
        ("unix:///csi/csi.sock", "/csi/csi.sock"),
        ("unix:/csi/csi.sock", "/csi/csi.sock"),
        ("UNIX:///csi/csi.sock", "/csi/csi.sock"),
        ("http+unix://%2Fcsi%2Fcsi.sock", "/csi/csi.sock"),
        ("http+unix://%2fcsi%2fcsi.sock", "/csi/csi.sock"),
        ("HTTP+UNIX://%2Fcsi%2Fcsi.sock", "/csi/csi.sock"),
        ("http+unix://%2Fcsi%2Fcsi.sock/messages?limit=1", "/csi/csi.sock"),
        ("http+unix://%2Fcsi%2Fcsi.sock?x=1", "/csi/csi.sock"),
        ("http+unix://%2Ftmp%2Fa%20b.sock", "/tmp/a b.sock"),
        ("  unix:///csi/csi.sock\n", "/csi/csi.sock"),
        ("unix:////csi/csi.sock", "/csi/csi.sock"),
        ("//csi//./csi.sock", "/csi/csi.sock"),
        ("/tmp/a:b.sock", "/tmp/a:b.sock"),
        ("/run/../csi/csi.sock", "/run/../csi/csi.sock"),
        ("/tmp/sökét.sock", "/tmp/sökét.sock"),
        (DEFAULT_ADDRESS, "/csi/csi.sock"),
    ],
)
def test_accepted_spellings(value: str, expected: str) -> None:
    assert parse_address(value) == expected


def test_round_trip_through_to_url() -> None:
    assert to_url("/csi/csi.sock") == DEFAULT_ADDRESS
    assert parse_address(to_url("/tmp/x/s.sock")) == "/tmp/x/s.sock"


def test_longest_path_is_accepted_and_one_more_byte_is_not() -> None:
    longest = "/" + "a" * (MAX_PATH_BYTES - 1)
    assert parse_address(longest) == longest
    assert parse_address("unix://" + longest) == longest
    with pytest.raises(AddressError, match=r"108 bytes, AF_UNIX allows at most 107"):
        parse_address(longest + "a")


def test_length_counts_bytes_not_characters() -> None:
    # 'é' is two bytes in UTF-8: 1 + 2 * 54 = 109 bytes in 55 characters.
    value = "/" + "é" * 54
    with pytest.raises(AddressError, match=r"109 bytes"):
        parse_address(value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "expected unix:///path/to.sock or an absolute path"),
        ("   ", "expected unix:///path/to.sock or an absolute path"),
        ("csi.sock", "must be absolute"),
        ("./csi.sock", "must be absolute"),
        ("unix:csi.sock", "must be absolute"),
        ("unix:", "must be absolute"),
        ("unix://", "names no socket"),
        ("unix://csi/csi.sock", "'csi' would be a host name"),
        ("unix://localhost/csi/csi.sock", "'localhost' would be a host name"),
        ("tcp://127.0.0.1:8080", "scheme 'tcp' is not supported"),
        ("http://127.0.0.1:8080", "run uds-client proxy"),
        ("https://example.com/", "scheme 'https' is not supported"),
        ("ftp://x/y", "scheme 'ftp' is not supported"),
        ("/csi/csi\x00.sock", "NUL byte"),
        ("unix:///csi/\x00", "NUL byte"),
        ("http+unix://%2Fcsi%00.sock", "NUL byte"),
        ("http+unix://csi%2Fcsi.sock", "decoded path 'csi/csi.sock' is not absolute"),
        ("http+unix://.%2Fcsi.sock", "is not absolute"),
        ("http+unix://%ff%fe", "not valid UTF-8"),
        ("http+unix://", "names no socket"),
        ("http+unix:/%2Fcsi.sock", "percent-encoded path as the host"),
        ("/csi/", "names a directory"),
        ("/", "names a directory"),
        ("unix:///", "names a directory"),
        ("/" + "x" * 200, "AF_UNIX allows at most 107"),
        ("/tmp/\ud800.sock", "cannot be encoded"),
    ],
)
def test_bad_values_are_rejected_with_the_value_quoted(value: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(value)
    message = str(info.value)
    assert message.startswith(f"invalid socket address {value!r}: "), message
    assert reason in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# Every spelling through the real uds-server and uds-client, from UDS_SOCKET


def _spellings(path: str) -> dict[str, str]:
    return {
        "bare": path,
        "unix3": "unix://" + path,
        "unix1": "unix:" + path,
        "http+unix": "http+unix://" + quote(path, safe="") + "/ignored",
        "upper": "UNIX://" + path,
    }


@pytest.mark.parametrize("spelling", ["bare", "unix3", "unix1", "http+unix", "upper"])
def test_uds_socket_spelling_works_for_server_and_client(spelling: str) -> None:
    directory = short_tmpdir("addr")
    path = str(directory / "s.sock")
    env = {ENV_VAR: _spellings(path)[spelling]}
    try:
        with ServerProcess([], socket_path=path, env=env) as server:
            server.wait_ready()
            health = run_cli("health", env=env)
            assert (health.returncode, health.stderr) == (0, "")
            sent = run_cli("send", "Hello from client", env=env)
            assert sent.returncode == 0, sent.stderr
            assert sent.stdout == "📥 Client received: Hello from server via UDS\n"
            assert server.stop() == 0
        assert "📩 Server received: Hello from client" in server.output
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    "value",
    ["relative.sock", "unix://host/s.sock", "tcp://127.0.0.1:80", "http+unix://s.sock", "/" + "x" * 120],
)
def test_bad_uds_socket_is_quoted_by_client_and_server(value: str) -> None:
    env = {ENV_VAR: value}
    client = run_cli("health", env=env)
    assert client.returncode == 2
    assert client.stderr.startswith(f"Error: invalid socket address {value!r}: ")
    assert client.stderr.count("\n") == 1
    server = subprocess.run(
        [PYTHON, "-m", "app"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert server.returncode == 2
    assert f"invalid socket address {value!r}: " in server.stderr + server.stdout
    assert "Traceback" not in server.stderr + server.stdout


def test_socket_flag_beats_a_bad_uds_socket() -> None:
    directory = short_tmpdir("addr")
    path = str(directory / "s.sock")
    env = {ENV_VAR: "tcp://nowhere:1"}
    try:
        with ServerProcess(["--socket", "unix://" + path], socket_path=path, env=env) as server:
            server.wait_ready()
            result = run_cli("--socket", "http+unix://" + quote(path, safe=""), "health", env=env)
            assert (result.returncode, result.stderr) == (0, "")
            assert server.stop() == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
