"""The connection protocol's HTTP/1.1 framing, in raw bytes, in process (tests/app/protocol_harness.py):
trailers, early answers and the lingering close, transfer codings, Host, and pipelining.

Attacks where memory, open files or a peer that never reads are the point run against a real server
process in test_protocol_attacks.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest

from tests.app.protocol_harness import Harness, Peer, harness
from tests.support import error_body, read_response

POST_CHUNKED = (
    b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
BODY = b'{"text": "hi"}'
ONE_CHUNK = b"%x\r\n%s\r\n" % (len(BODY), BODY)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture(scope="module")
def server() -> Iterator[Harness]:
    with harness() as made:
        yield made


def _closed(conn: Peer) -> bool:
    """True once the server has closed the connection or half-closed it (the peer reads EOF)."""
    conn.settimeout(5.0)
    while conn.recv(65536):
        pass
    return conn.transport.eof or conn.transport.closed


def _count(server: Harness) -> int:
    with server.connect() as conn:
        conn.sendall(b"GET /messages?limit=1000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, body = read_response(conn)
    assert status == 200
    return len(json.loads(body)["messages"])


# --- trailers ---------------------------------------------------------------------------------------


def test_over_100_trailer_fields_in_one_piece_get_431(server: Harness) -> None:
    stored = _count(server)
    fields = b"".join(b"X-T%d: v\r\n" % i for i in range(101))
    with server.connect() as conn:
        conn.sendall(POST_CHUNKED + ONE_CHUNK + b"0\r\n" + fields + b"\r\n")
        status, headers, body = read_response(conn)
        assert status == 431
        assert headers["connection"] == "close"
        message = error_body(body, 431, "headers_too_large")["message"]
        assert message == "the request has more than 100 trailer fields"
        assert _closed(conn)
    assert _count(server) == stored, "the refused request was not stored"


def test_trailers_are_dropped_not_merged_into_the_headers(server: Harness) -> None:
    """A trailer cannot change what the head said (here: the content type and Idempotency-Key)."""
    trailers = b"Content-Type: text/plain\r\nIdempotency-Key: not a valid key\r\n\r\n"
    with server.connect() as conn:
        conn.sendall(POST_CHUNKED + ONE_CHUNK + b"0\r\n" + trailers)
        status, _, body = read_response(conn)
        assert status == 201, body
        assert json.loads(body)["text"] == "hi"
        conn.sendall(HEALTHZ)
        assert read_response(conn)[0] == 200, "the connection stays usable after a request with trailers"


# --- early answers close the connection -------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (
            b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 100000\r\n\r\n",
            415,
            "unsupported_media_type",
        ),
        (
            b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n",
            413,
            "payload_too_large",
        ),
        (
            b"POST /nope HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n",
            404,
            "not_found",
        ),
        (
            b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nffff\r\n",
            415,
            "unsupported_media_type",
        ),
    ],
)
def test_early_answer_then_close(server: Harness, head: bytes, status: int, code: str) -> None:
    """An answer sent before the body was read ends the connection: the body is not read on."""
    stored = _count(server)
    with server.connect() as conn:
        conn.sendall(head + b'{"text": "')
        got, _, body = read_response(conn)
        assert got == status
        error_body(body, status, code)
        assert _closed(conn), "the rest of the body must not be awaited"  # within 5 s, not the 30 s deadline
    assert _count(server) == stored


def test_a_client_still_sending_its_body_reads_the_early_answer(server: Harness) -> None:
    """After an early answer the server half-closes and discards (lingering close, as nginx does):
    a client that sends its body after the head, as http.client does, gets no broken pipe and reads
    the whole answer; a client that keeps sending past the linger budget is closed."""
    head = (
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 1048576\r\n\r\n"
    )
    with server.connect() as conn:
        conn.sendall(head)
        got, _, body = read_response(conn)
        assert got == 415
        error_body(body, 415, "unsupported_media_type")
        conn.sendall(b"x" * 65536)  # the body goes on: discarded, not a broken pipe
        assert conn.recv(100) == b""  # the answer was whole, then EOF (the server's half-close)
        assert conn.transport.eof
        assert not conn.transport.closed
        sent = 65536
        with contextlib.suppress(BrokenPipeError):
            while sent < 1048576:  # past the linger budget the server closes
                conn.sendall(b"x" * 65536)
                sent += 65536
        assert sent < 1048576, "the server read a whole refused body"


def test_complete_bad_request_keeps_the_connection(server: Harness) -> None:
    """A refused request whose body arrived whole leaves the connection usable (no needless close)."""
    with server.connect() as conn:
        body = b'{"text": "hi"}'
        conn.sendall(
            b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        buffer = bytearray()
        assert read_response(conn, buffer)[0] == 415
        conn.sendall(HEALTHZ)
        assert read_response(conn, buffer)[0] == 200


# --- RFC 9112 framing: Transfer-Encoding and Host ---------------------------------------------------


@pytest.mark.parametrize(
    ("coding", "status"),
    [
        (b"gzip, chunked", 501),
        (b"deflate,chunked", 501),
        (b"identity", 501),
        (b"gzip", 501),
        (b"chunked, chunked", 501),
        (b"chunked, gzip", 501),
        (b"chunked\r\nTransfer-Encoding: chunked", 501),
        (b"chunked\r\nContent-Length: 14", 400),
    ],
)
def test_transfer_codings_other_than_chunked_are_refused(server: Harness, coding: bytes, status: int) -> None:
    stored = _count(server)
    with server.connect() as conn:
        conn.sendall(
            b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: " + coding + b"\r\n\r\n" + ONE_CHUNK + b"0\r\n\r\n"
        )
        got, headers, body = read_response(conn)
        assert got == status, body
        assert headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        assert _closed(conn)
    assert _count(server) == stored, "nothing sent with a refused coding is stored"


def test_chunked_any_case_is_accepted(server: Harness) -> None:
    with server.connect() as conn:
        conn.sendall(POST_CHUNKED.replace(b"chunked", b"Chunked") + ONE_CHUNK + b"0\r\n\r\n")
        assert read_response(conn)[0] == 201


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (b"", "no Host header"),
        (b"Host: localhost\r\nHost: localhost\r\n", "more than one Host"),
        (b"Host: a b\r\n", "not a valid host"),
        (b"Host: local/host\r\n", "not a valid host"),
        (b"Host: x@y\r\n", "not a valid host"),
        (b"Host: [::1\r\n", "not a valid host"),
        (b"Host: localhost:80x\r\n", "not a valid host"),
    ],
)
def test_missing_repeated_or_invalid_host_gets_400(server: Harness, fields: bytes, message: str) -> None:
    with server.connect() as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\n" + fields + b"\r\n")
        status, headers, body = read_response(conn)
        assert status == 400
        assert headers["connection"] == "close"
        assert message in str(error_body(body, 400, "bad_request")["message"])
        assert _closed(conn)


@pytest.mark.parametrize(
    "request_head",
    [
        HEALTHZ,
        b"GET /healthz HTTP/1.1\r\nHost: localhost:80\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: uds\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\n\r\n",
    ],
)
def test_valid_hosts_and_http10_without_host_are_served(server: Harness, request_head: bytes) -> None:
    with server.connect() as conn:
        conn.sendall(request_head)
        assert read_response(conn)[0] == 200


# --- pipelining -------------------------------------------------------------------------------------


def _post(text: str) -> bytes:
    body = json.dumps({"text": text}).encode()
    return (
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01 not http\r\n\r\n",
        POST_CHUNKED.replace(b"chunked", b"gzip, chunked") + ONE_CHUNK + b"0\r\n\r\n",
        POST_CHUNKED + ONE_CHUNK + b"0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(101)) + b"\r\n",
    ],
)
def test_pipelined_good_requests_are_answered_before_the_error(server: Harness, bad: bytes) -> None:
    with server.connect() as conn:
        conn.sendall(_post("first") + _post("second") + bad)
        buffer = bytearray()
        texts = []
        for _ in range(2):
            status, _, body = read_response(conn, buffer)
            assert status == 201, body
            texts.append(json.loads(body)["text"])
        assert texts == ["first", "second"]
        status, headers, body = read_response(conn, buffer)
        assert status in (400, 431, 501), body
        assert headers["connection"] == "close"
        assert json.loads(body)["status"] == status
        assert _closed(conn)


def test_fifty_pipelined_requests_are_all_answered_in_order(server: Harness) -> None:
    """RFC 9112 section 9.3.2: pipelining is legal; 50 at once once got 9 answers and a 503."""
    targets = [f"/messages?limit={n}" if n % 2 else "/healthz" for n in range(50)]
    with server.connect() as conn:
        conn.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % t.encode() for t in targets))
        buffer = bytearray()
        for target in targets:
            status, _, body = read_response(conn, buffer)
            assert status == 200, (target, status, body)
            assert ("messages" in json.loads(body)) == target.startswith("/messages"), (target, body)
        conn.sendall(HEALTHZ)  # still open
        assert read_response(conn, buffer)[0] == 200
