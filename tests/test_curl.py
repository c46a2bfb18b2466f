"""The real ``curl --unix-socket`` against a real server: every endpoint, errors, Idempotency-Key."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ServerProcess, require_tool, running_server, wait_until


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as proc:
        yield proc


def curl(server: ServerProcess, *args: str) -> tuple[int, dict[str, str], bytes]:
    """Run curl on the server's socket; return (status, headers, body)."""
    exe = require_tool("curl")
    assert server.socket_path
    result = subprocess.run(
        [
            exe,
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--unix-socket",
            server.socket_path,
            "--include",
            *args,
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def as_json(headers: dict[str, str], body: bytes) -> Any:
    assert headers["content-type"].startswith("application/json"), headers
    return json.loads(body)


def error(status: int, headers: dict[str, str], body: bytes, expected: int, code: str) -> dict[str, Any]:
    assert status == expected, body
    doc = as_json(headers, body)
    assert doc["status"] == expected
    assert doc["error"] == code
    assert doc["message"]
    return doc


POST = ("-X", "POST", "-H", "Content-Type: application/json")


def test_post_get_and_list(server: ServerProcess) -> None:
    status, headers, body = curl(
        server, *POST, "-d", '{"text": "Hello from client"}', "http://localhost/messages"
    )
    assert status == 201
    message = as_json(headers, body)
    assert message["reply"] == "Hello from server via UDS"
    assert message["peer"]["pid"] > 0
    assert headers["location"] == f"/messages/{message['id']}"
    status, headers, body = curl(server, f"http://localhost/messages/{message['id']}")
    assert status == 200
    assert as_json(headers, body) == message
    status, headers, body = curl(server, "http://localhost/messages?limit=1")
    assert status == 200
    assert as_json(headers, body) == {"messages": [message]}
    # The log line is written after the answer, on the next turn of the server's event loop.
    wait_until(
        lambda: "📩 Server received: Hello from client" in server.output.splitlines(), what="the log line"
    )


def test_versioned_paths_and_their_aliases(server: ServerProcess) -> None:
    status, headers, body = curl(server, *POST, "-d", '{"text": "to v1"}', "http://localhost/v1/messages")
    assert status == 201
    message = as_json(headers, body)
    assert headers["location"] == f"/v1/messages/{message['id']}"
    for path in (f"/v1/messages/{message['id']}", f"/messages/{message['id']}"):
        status, headers, body = curl(server, f"http://localhost{path}")
        assert (status, as_json(headers, body)) == (200, message)
    status, headers, body = curl(server, "http://localhost/v1/version")
    assert (status, as_json(headers, body)["api_version"]) == (200, "1")
    doc = error(*curl(server, "http://localhost/v9/messages"), 400, "unsupported_api_version")
    assert "this server supports API version 1" in doc["message"]


@pytest.mark.parametrize("method", [(), ("--head",)])
def test_ping(server: ServerProcess, method: tuple[str, ...]) -> None:
    status, headers, body = curl(server, *method, "http://localhost/_ping")
    assert status == 200
    assert (headers["api-version"], headers["min-api-version"]) == ("1", "1")
    assert headers["server"].startswith("uds-example/")
    assert body == (b"" if method else b"OK")


def test_idempotency_key(server: ServerProcess) -> None:
    key = ("-H", "Idempotency-Key: curl-test-1")
    first = curl(server, *POST, *key, "-d", '{"text": "once"}', "http://localhost/messages")
    again = curl(server, *POST, *key, "-d", '{"text": "once"}', "http://localhost/messages")
    assert first[0] == 201
    assert again[0] == 200
    assert as_json(first[1], first[2]) == as_json(again[1], again[2])
    error(
        *curl(server, *POST, *key, "-d", '{"text": "other"}', "http://localhost/messages"),
        409,
        "idempotency_key_reused",
    )
    error(
        *curl(
            server, *POST, "-H", "Idempotency-Key: a b", "-d", '{"text": "x"}', "http://localhost/messages"
        ),
        400,
        "bad_request",
    )


def test_probes_and_version(server: ServerProcess) -> None:
    status, headers, body = curl(server, "http://localhost/healthz")
    assert (status, as_json(headers, body)) == (200, {"status": "ok"})
    status, headers, body = curl(server, "http://localhost/readyz")
    assert (status, as_json(headers, body)) == (200, {"status": "ready"})
    status, headers, body = curl(server, "http://localhost/version")
    assert status == 200
    assert {"app", "python", "uvicorn", "fastapi", "starlette", "pydantic"} <= set(as_json(headers, body))


def test_openapi_and_offline_docs(server: ServerProcess) -> None:
    status, headers, body = curl(server, "http://localhost/openapi.json")
    assert status == 200
    paths = as_json(headers, body)["paths"]
    assert "/v1/messages" in paths
    assert "/messages" not in paths, "the unversioned aliases are not documented"
    for page in ("/docs", "/redoc"):
        status, headers, body = curl(server, f"http://localhost{page}")
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        assert b"https://" not in body
    status, headers, body = curl(server, "http://localhost/docs-assets/swagger-ui-bundle.js")
    assert status == 200
    assert len(body) > 100_000


def test_errors(server: ServerProcess, tmp_path: Path) -> None:
    error(*curl(server, "http://localhost/nope"), 404, "not_found")
    error(*curl(server, "http://localhost/messages/999999"), 404, "not_found")
    status, headers, body = curl(server, "-X", "DELETE", "http://localhost/messages")
    error(status, headers, body, 405, "method_not_allowed")
    assert set(headers["allow"].split(", ")) == {"GET", "POST"}
    form = curl(server, "-X", "POST", "-d", "text=hi", "http://localhost/messages")
    error(*form, 415, "unsupported_media_type")
    error(*curl(server, *POST, "-d", '{"text": ', "http://localhost/messages"), 422, "invalid_json")
    error(*curl(server, *POST, "-d", '{"text": 5}', "http://localhost/messages"), 422, "validation_error")
    invalid_utf8 = tmp_path / "body.json"
    invalid_utf8.write_bytes(b'{"text": "\xff\xfe"}')
    error(
        *curl(server, *POST, "--data-binary", f"@{invalid_utf8}", "http://localhost/messages"),
        422,
        "invalid_json",
    )
    error(*curl(server, "http://localhost/messages?limit=0"), 422, "validation_error")


def test_body_too_large(server: ServerProcess) -> None:
    big = '{"text": "' + "x" * (70 * 1024) + '"}'
    error(*curl(server, *POST, "--data-binary", big, "http://localhost/messages"), 413, "payload_too_large")
    status, _, _ = curl(server, "http://localhost/healthz")
    assert status == 200
