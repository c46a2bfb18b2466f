"""``Uds-Forwarded-Peer``: the caller a proxy on the socket names, recorded beside the proxy's own peer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from app.api.forwarded import key_owner, parse_forwarded_peer
from app.config import Settings
from app.main import create_app
from app.storage.sqlite import build_store
from tests.app.conftest import ASGIClient, assert_error
from tests.support import http_over_uds, running_server

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (b"uid=65534 gid=65534 pid=123", {"uid": 65534, "gid": 65534, "pid": 123}),
        (b"uid=0 gid=-1 pid=0", {"uid": 0, "gid": -1, "pid": 0}),
        (b" uid=1 gid=2 pid=3 ", {"uid": 1, "gid": 2, "pid": 3}),
        (b"uid=1 gid=2", None),
        (b"gid=2 uid=1 pid=3", None),
        (b"uid=-1 gid=2 pid=3", None),
        (b"uid=1 gid=2 pid=3 x=4", None),
        (b"uid=12345678901 gid=2 pid=3", None),
        (b"uid=1\tgid=2 pid=3", None),
        (b"", None),
    ],
)
def test_parse_forwarded_peer(value: bytes, parsed: dict[str, int] | None) -> None:
    assert parse_forwarded_peer(value) == parsed


def test_keys_belong_to_the_peer_and_to_the_caller_it_names() -> None:
    proxy = {"pid": 7, "uid": 0, "gid": 0}
    assert key_owner(proxy) == "0"
    named = [key_owner({**proxy, "forwarded_for": {"uid": u, "gid": 1, "pid": 2}}) for u in (4242, 4343)]
    assert named == ["0>4242", "0>4343"]
    # Another peer naming the same caller has its own scope: a forged header reaches no one else's.
    assert key_owner(
        {"pid": 8, "uid": 4343, "gid": 0, "forwarded_for": {"uid": 4242, "gid": 1, "pid": 2}}
    ) == ("4343>4242")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_record_and_the_log_line_name_the_forwarded_caller(log_format: str) -> None:
    with running_server("--log-format", log_format) as server:
        assert server.socket_path is not None
        headers = {**JSON, "Uds-Forwarded-Peer": "uid=4242 gid=4243 pid=99"}
        status, body = http_over_uds(server.socket_path, "POST", "/messages", b'{"text": "hi"}', headers)
        assert status == 201
        peer = json.loads(body)["peer"]
        # The peer's own credentials stay the real SO_PEERCRED: the claim is attributable.
        assert (peer["pid"], peer["uid"], peer["gid"]) == (os.getpid(), os.geteuid(), os.getegid())
        assert peer["forwarded_for"] == {"uid": 4242, "gid": 4243, "pid": 99}
        status, body = http_over_uds(server.socket_path, "GET", "/messages/1")
        assert json.loads(body)["peer"]["forwarded_for"] == {"uid": 4242, "gid": 4243, "pid": 99}
        # Without the header nothing is claimed.
        status, body = http_over_uds(server.socket_path, "POST", "/messages", b'{"text": "direct"}', JSON)
        assert "forwarded_for" not in json.loads(body)["peer"]
        server.stop()
    if log_format == "text":
        assert (
            f"📩 Server received: hi\n  from peer pid={os.getpid()} uid={os.geteuid()} "
            f"gid={os.getegid()} via proxy for uid=4242 gid=4243 pid=99 (message 1)\n"
        ) in server.output
        assert (
            f"📩 Server received: direct\n  from peer pid={os.getpid()} uid={os.geteuid()} "
            f"gid={os.getegid()} (message 2)\n"
        ) in server.output
    else:
        lines = [json.loads(line) for line in server.output.splitlines() if line.startswith("{")]
        received = [line for line in lines if line.get("message_id") == 1]
        assert received[0]["peer"]["forwarded_for"] == {"uid": 4242, "gid": 4243, "pid": 99}


def test_a_malformed_forwarded_peer_header_is_refused() -> None:
    with running_server() as server:
        assert server.socket_path is not None
        headers = {**JSON, "Uds-Forwarded-Peer": "uid=root"}
        status, body = http_over_uds(server.socket_path, "POST", "/messages", b'{"text": "hi"}', headers)
        assert (status, json.loads(body)) == (
            400,
            {
                "error": "bad_request",
                "status": 400,
                "message": "invalid Uds-Forwarded-Peer header; send uid=U gid=G pid=P",
            },
        )
        status, body = http_over_uds(server.socket_path, "GET", "/messages")
        assert json.loads(body) == {"messages": []}


def test_a_repeated_forwarded_peer_header_is_refused(make_client: Callable[..., ASGIClient]) -> None:
    """Without an allowlist too: the record would have to pick one claim of two."""
    store = build_store(Settings(store="memory"))
    client = make_client(app=create_app(Settings(store="memory"), store=store))
    headers = [("Uds-Forwarded-Peer", "uid=1 gid=1 pid=1"), ("Uds-Forwarded-Peer", "uid=2 gid=2 pid=2")]
    body = assert_error(client.post("/messages", json={"text": "hi"}, headers=headers), 400, "bad_request")
    assert body["message"] == "more than one Uds-Forwarded-Peer header; send one"
    assert store.last_id() == 0
