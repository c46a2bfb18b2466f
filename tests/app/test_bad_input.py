"""Bad input gets a 4xx JSON answer, never a 500, in-process and over a real server's socket.

Over the socket the requests are written by hand (raw bytes), and the server must keep serving.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import psutil
import pytest

from app.config import Settings
from tests.app.conftest import ASGIClient, assert_error
from tests.support import ServerProcess, http_over_uds, read_response, running_server, wait_until

JSON = {"content-type": "application/json"}
LIMIT = 64 * 1024

# (name, raw body, content type, expected status, expected error code)
BAD_BODIES: list[tuple[str, bytes, str | None, int, str]] = [
    ("malformed json", b'{"text": "hi"', "application/json", 422, "invalid_json"),
    ("not json at all", b"hello", "application/json", 422, "invalid_json"),
    ("invalid utf-8", b'{"text": "\xff\xfe"}', "application/json", 422, "invalid_json"),
    ("lone surrogate", b'{"text": "\\ud800"}', "application/json", 422, "invalid_json"),
    ("utf-8 bom", b'\xef\xbb\xbf{"text": "hi"}', "application/json", 422, "invalid_json"),
    ("trailing garbage", b'{"text": "hi"} {}', "application/json", 422, "invalid_json"),
    ("empty body", b"", "application/json", 422, "invalid_json"),
    ("whitespace body", b"   ", "application/json", 422, "invalid_json"),
    ("text is a number", b'{"text": 42}', "application/json", 422, "validation_error"),
    ("text is null", b'{"text": null}', "application/json", 422, "validation_error"),
    ("text is a list", b'{"text": ["hi"]}', "application/json", 422, "validation_error"),
    ("text missing", b"{}", "application/json", 422, "validation_error"),
    ("extra field", b'{"text": "hi", "admin": true}', "application/json", 422, "validation_error"),
    ("body is a list", b'["hi"]', "application/json", 422, "validation_error"),
    ("body is a string", b'"hi"', "application/json", 422, "validation_error"),
    ("text empty", b'{"text": ""}', "application/json", 422, "validation_error"),
    ("text too long", json.dumps({"text": "x" * 4097}).encode(), "application/json", 422, "validation_error"),
    ("deeply nested", b"[" * 5000 + b"]" * 5000, "application/json", 422, "invalid_json"),
    ("form content type", b"text=hi", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("plain text", b'{"text": "hi"}', "text/plain", 415, "unsupported_media_type"),
    ("json-ish but not json", b'{"text": "hi"}', "application/jsonx", 415, "unsupported_media_type"),
    ("no content type", b'{"text": "hi"}', None, 415, "unsupported_media_type"),
    ("too large", b'{"text": "' + b"x" * LIMIT + b'"}', "application/json", 413, "payload_too_large"),
]


@pytest.mark.parametrize(
    ("name", "raw", "content_type", "status", "error"), BAD_BODIES, ids=[case[0] for case in BAD_BODIES]
)
def test_bad_body_in_process(
    client: ASGIClient, name: str, raw: bytes, content_type: str | None, status: int, error: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    assert_error(client.post("/messages", content=raw, headers=headers), status, error)
    assert client.get("/messages").json() == {"messages": []}, "nothing bad may be stored"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/merge-patch+json",
        "application/vnd.uds.v1+json; charset=utf-8",
    ],
)
def test_json_content_types_are_accepted(client: ASGIClient, content_type: str) -> None:
    response = client.post("/messages", content=b'{"text": "hi"}', headers={"content-type": content_type})
    assert response.status_code == 201, response.text


def test_non_ascii_text_round_trips(client: ASGIClient) -> None:
    text = "héllo wörld 👋 \u0000 end"
    response = client.post("/messages", content=json.dumps({"text": text}).encode(), headers=JSON)
    assert response.status_code == 201
    assert response.json()["text"] == text
    assert client.get(f"/messages/{response.json()['id']}").json()["text"] == text


def test_text_limit_counts_characters_not_bytes(make_client: Callable[..., ASGIClient]) -> None:
    client = make_client(Settings(max_text_length=3))
    assert client.post("/messages", json={"text": "👋👋👋"}).status_code == 201
    assert_error(client.post("/messages", json={"text": "👋👋👋👋"}), 422, "validation_error")


def _counting_chunks(size: int, count: int, sent: list[int]) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(count):
            sent.append(size)
            yield b"x" * size
        yield b'"}'

    return chunks


def test_huge_streamed_body_is_refused_without_reading_it(client: ASGIClient) -> None:
    """A 1 GiB chunked body: 413 after the limit, having pulled only a few 16 KiB chunks."""
    sent: list[int] = []
    response = client.post_stream("/messages", _counting_chunks(16 * 1024, 64 * 1024, sent), headers=JSON)
    body = assert_error(response, 413, "payload_too_large")
    assert str(LIMIT) in body["message"]
    assert response.headers["connection"] == "close"
    assert sum(sent) <= LIMIT + 16 * 1024, f"read {sum(sent)} bytes of a 1 GiB body"


def test_declared_huge_body_is_refused_before_reading(client: ASGIClient) -> None:
    sent: list[int] = []
    response = client.post_stream(
        "/messages",
        _counting_chunks(1024 * 1024, 1024, sent),
        headers={**JSON, "content-length": str(1024**3)},
    )
    assert_error(response, 413, "payload_too_large")
    assert sent == [], "the body was read although Content-Length already said it is too large"


def test_body_limit_follows_settings(make_client: Callable[..., ASGIClient]) -> None:
    client = make_client(Settings(max_body_bytes=20))
    assert client.post("/messages", content=b'{"text": "12345678"}', headers=JSON).status_code == 201
    assert_error(client.post("/messages", content=b'{"text": "123456789"}', headers=JSON), 413)
    sent: list[int] = []
    assert_error(client.post_stream("/messages", _counting_chunks(8, 100, sent), headers=JSON), 413)
    assert sum(sent) <= 24


def test_bad_content_length_is_400(client: ASGIClient) -> None:
    response = client.post("/messages", content=b'{"text":"hi"}', headers={**JSON, "content-length": "1x"})
    assert_error(response, 400, "bad_request")


# --- over a real server's socket, raw bytes ---------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as proc:
        yield proc


def _raw_exchange(path: str, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; read one whole response (Content-Length framed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(request)
        return read_response(conn)


def _request(
    method: str,
    target: str,
    body: bytes = b"",
    content_type: str | None = "application/json",
    extra: str = "",
) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return (head + extra + "Connection: close\r\n\r\n").encode("latin-1") + body


def _check_error(status: int, headers: dict[str, str], body: bytes, expected: int, error: str | None) -> None:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["status"] == expected
    assert isinstance(doc["message"], str)
    if error:
        assert doc["error"] == error, doc


@pytest.mark.parametrize(
    ("name", "raw", "content_type", "status", "error"), BAD_BODIES, ids=[case[0] for case in BAD_BODIES]
)
def test_bad_body_over_the_socket(
    server: ServerProcess, name: str, raw: bytes, content_type: str | None, status: int, error: str
) -> None:
    assert server.socket_path
    _check_error(
        *_raw_exchange(server.socket_path, _request("POST", "/messages", raw, content_type)), status, error
    )
    assert http_over_uds(server.socket_path)[0] == 200, "the server must keep serving"


@pytest.mark.parametrize(
    ("method", "target", "status", "error"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("DELETE", "/messages", 405, "method_not_allowed"),
        ("PUT", "/healthz", 405, "method_not_allowed"),
        ("GET", "/messages/xyz", 422, "validation_error"),
        ("GET", "/messages?limit=0", 422, "validation_error"),
        ("GET", "/messages/999999999999999999999999", 404, "not_found"),
    ],
)
def test_bad_route_or_method_over_the_socket(
    server: ServerProcess, method: str, target: str, status: int, error: str
) -> None:
    assert server.socket_path
    answer = _raw_exchange(server.socket_path, _request(method, target, content_type=None))
    _check_error(*answer, status, error)


def test_huge_declared_body_over_the_socket(server: ServerProcess) -> None:
    """Content-Length: 1 GiB with only a few bytes sent: 413 at once, the rest is never awaited."""
    assert server.socket_path
    head = (
        "POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {1024**3}\r\n\r\n"
    ).encode()
    status, headers, body = _raw_exchange(server.socket_path, head + b'{"text": "', timeout=10)
    _check_error(status, headers, body, 413, "payload_too_large")
    assert http_over_uds(server.socket_path)[0] == 200


def test_huge_chunked_body_over_the_socket_is_cut_off(server: ServerProcess) -> None:
    """A chunked body streamed without end: the server answers 413 early and memory stays flat."""
    assert server.socket_path
    process = psutil.Process(server.proc.pid)
    before = process.memory_info().rss
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(server.socket_path)
        conn.sendall(
            b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b'7\r\n{"text"\r\n'
        )
        conn.setblocking(False)
        answered = b""
        while sent < 256 * 1024 * 1024:
            with contextlib.suppress(BlockingIOError):
                answered += conn.recv(65536)
            if b"\r\n\r\n" in answered:
                break
            try:
                sent += conn.send(frame)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        conn.settimeout(10)
        conn.setblocking(True)
        while b"\r\n\r\n" not in answered:
            more = conn.recv(65536)
            if not more:
                break
            answered += more
    assert answered.startswith(b"HTTP/1.1 413"), answered[:200]
    assert sent < 64 * 1024 * 1024, f"the server let {sent} bytes in before answering"
    grown = process.memory_info().rss - before
    assert grown < 32 * 1024 * 1024, f"server memory grew by {grown} bytes"
    assert http_over_uds(server.socket_path)[0] == 200


def test_server_still_stores_good_messages_after_bad_ones(server: ServerProcess) -> None:
    assert server.socket_path
    status, body = http_over_uds(server.socket_path, "POST", "/messages", b'{"text": "still here"}', JSON)
    assert status == 201
    assert json.loads(body)["text"] == "still here"
    # The log line is written after the answer, on the next turn of the server's event loop.
    wait_until(lambda: "📩 Server received: still here" in server.output.splitlines(), what="the log line")
