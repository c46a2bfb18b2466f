"""client.net: the mechanisms the server's protocol and the proxy share, in process."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket

import pytest

from client.net import answers, limits, linger, throttle


def test_error_body_is_the_shared_shape() -> None:
    assert json.loads(answers.error_body(403, "forbidden", "no")) == {
        "error": "forbidden",
        "message": "no",
        "status": 403,
    }
    with_details = json.loads(answers.error_body(422, "invalid_json", "bad", [{"loc": ["body"]}]))
    assert with_details["details"] == [{"loc": ["body"]}]


def test_error_response_frames_the_body_with_the_standard_phrase() -> None:
    raw = answers.error_response(421, "misdirected_request", "wrong host", headers=[("connection", "close")])
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 421 Misdirected Request"
    assert b"content-type: application/json" in lines
    assert f"content-length: {len(body)}".encode() in lines
    assert lines[-1] == b"connection: close"
    assert json.loads(body) == {"error": "misdirected_request", "message": "wrong host", "status": 421}


def test_error_response_head_only_keeps_the_length_without_the_body() -> None:
    full = answers.error_response(503, "unavailable", "full", headers=[("retry-after", "1")])
    head = answers.error_response(503, "unavailable", "full", headers=[("retry-after", "1")], head_only=True)
    assert full.startswith(head)
    assert head.endswith(b"\r\n\r\n")
    assert len(full) > len(head)
    assert b"content-length: 0" not in head


def test_connection_cap_fits_under_the_open_file_limit() -> None:
    assert limits.connection_cap(None, 1024) == 1024 - limits.FD_RESERVE
    assert limits.connection_cap(100, 1024) == 100
    assert limits.connection_cap(5000, 1024) == 1024 - limits.FD_RESERVE
    assert limits.connection_cap(5000, 1024, reserve=96, files_each=2) == (1024 - 96) // 2
    assert limits.connection_cap(5000, 10) == 1  # never zero
    assert limits.connection_cap(5000, resource.RLIM_INFINITY) == 5000
    assert limits.connection_cap(None, resource.RLIM_INFINITY) > 1_000_000


def test_raise_open_file_limit_reaches_the_hard_limit() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, before[1]), before[1]))
        soft, hard = limits.raise_open_file_limit()
        assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
        assert hard == before[1]
        assert soft == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_throttle_writes_one_line_per_period_and_counts_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    lines: list[str] = []
    log = throttle.Throttle(lines.append, period=10.0)
    assert log.log(logging.WARNING, "refused %d", 1)
    assert not log.log(logging.WARNING, "refused %d", 2)
    assert not log.log(logging.WARNING, "refused %d", 3)
    now[0] += 10.0
    assert log.log(logging.WARNING, "refused %d", 4)
    assert lines == ["refused 1", "refused 4 (and 2 more like it in the last 10s)"]


def test_throttle_keys_are_apart_and_flush_sums_up(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: now[0])
    lines: list[str] = []
    log = throttle.Throttle(lines.append, period=10.0, keys=2)
    for uid in (1, 1, 1, 2, 3, 4):
        log.log(logging.INFO, "uid %d", uid, key=uid)
    assert lines == ["uid 1", "uid 2", "uid 3"]  # 3 and 4 share the one key past the first 2
    now[0] = 5.0
    log.flush()
    assert lines[3:] == ["uid 1 (and 1 more like it in the last 5s)", "uid 4"]
    log.flush()
    assert len(lines) == 5  # nothing held any more


def test_throttle_writes_to_a_logger(caplog: pytest.LogCaptureFixture) -> None:
    log = throttle.Throttle(logging.getLogger("tests.net"))
    with caplog.at_level(logging.WARNING, "tests.net"):
        log.log(logging.WARNING, "a %s line", "lazy")
        log.log(logging.WARNING, "a %s line", "held")
    assert [r.getMessage() for r in caplog.records] == ["a lazy line"]


def test_linger_half_closes_discards_then_closes() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        transport.write(b"answer")
        held = linger.Linger(transport, loop, seconds=0.2)
        theirs.setblocking(False)
        got = b""
        while not got.endswith(b"answer") or await loop.sock_recv(theirs, 1) != b"":
            got += await loop.sock_recv(theirs, 100)  # the answer, then EOF: the peer reads it all
        held.discard(linger.LIMIT)
        assert not transport.is_closing()
        held.discard(1)  # over the limit: closed at once
        assert transport.is_closing()
        held.cancel()
        theirs.close()
        return got

    assert asyncio.run(main()) == b"answer"


def test_linger_closes_after_the_deadline_for_a_peer_that_keeps_quiet() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        lost = loop.create_future()

        class Watch(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(True)

        transport, _ = await loop.create_connection(Watch, sock=ours)
        linger.Linger(transport, loop, seconds=0.05)
        await asyncio.wait_for(lost, 5)
        theirs.close()

    asyncio.run(main())


def test_stream_linger_drops_input_until_the_peer_closes() -> None:
    async def main() -> bytes:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        theirs.sendall(b"x" * 1000)
        theirs.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(linger.linger(reader, writer, seconds=5, limit=10_000), 5)
        writer.close()
        theirs.settimeout(5)
        rest = theirs.recv(10)  # our half-close: EOF
        theirs.close()
        return rest

    assert asyncio.run(main()) == b""


def test_stream_linger_stops_at_the_byte_limit() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        theirs.sendall(b"x" * 5000)  # and never closes
        await asyncio.wait_for(linger.linger(reader, writer, seconds=30, limit=4000), 5)
        writer.close()
        theirs.close()

    asyncio.run(main())
