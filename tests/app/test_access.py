"""Peer allowlist: uid/gid from SO_PEERCRED decide; probes stay open; no peer (TCP) is refused."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import pytest

from app.api.access import Access, PeerAllowlist
from app.api.policy import OPEN_PATHS
from app.config import Settings
from app.main import create_app
from app.storage.sqlite import build_store
from tests.app.conftest import ASGIClient, assert_error
from tests.support import http_over_uds, running_server

ALLOWED = {"pid": 10, "uid": 1000, "gid": 2000}
BY_GID = {"pid": 11, "uid": 4000, "gid": 3000}
STRANGER = {"pid": 12, "uid": 5000, "gid": 5000}
LIST = Settings(allow_uid=(1000,), allow_gid=(3000,), store="memory")


def test_no_allowlist_means_no_middleware() -> None:
    assert create_app(Settings(store="memory")).user_middleware == []
    assert [m.cls for m in create_app(LIST).user_middleware] == [PeerAllowlist]


@pytest.mark.parametrize("peer", [ALLOWED, BY_GID])
def test_allowed_peers_use_the_api(make_client: Callable[..., ASGIClient], peer: dict[str, int]) -> None:
    client = make_client(LIST, peer=peer)
    response = client.post("/messages", json={"text": "hi"})
    assert response.status_code == 201
    assert response.json()["peer"] == peer
    assert client.get("/messages").status_code == 200


@pytest.mark.parametrize("path", ["/messages", "/messages/1", "/version", "/openapi.json", "/docs", "/nope"])
def test_stranger_is_refused_everywhere_but_the_probes(
    make_client: Callable[..., ASGIClient], path: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(LIST, peer=STRANGER)
    with caplog.at_level(logging.WARNING, logger="app.api.access"):
        body = assert_error(client.get(path), 403, "forbidden")
    assert "5000" in body["message"]
    warnings = [r for r in caplog.records if r.name == "app.api.access"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "pid=12 uid=5000 gid=5000" in warnings[0].getMessage()


def test_refused_post_stores_nothing(make_client: Callable[..., ASGIClient]) -> None:
    store = build_store(LIST)
    app = create_app(LIST, store=store)
    assert_error(make_client(app=app, peer=STRANGER).post("/messages", json={"text": "x"}), 403)
    assert store.last_id() == 0


@pytest.mark.parametrize("path", sorted(OPEN_PATHS))
def test_probes_stay_open(make_client: Callable[..., ASGIClient], path: str) -> None:
    assert make_client(LIST, peer=STRANGER).get(path).status_code == 200
    assert make_client(LIST, peer=None).get(path).status_code == 200


def test_no_peer_credentials_fail_closed(
    make_client: Callable[..., ASGIClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.api.access"):
        body = assert_error(make_client(LIST, peer=None).post("/messages", json={"text": "x"}), 403)
    assert "Unix socket" in body["message"]
    assert any("no peer credentials" in r.getMessage() for r in caplog.records)


def test_the_allowlist_admits_a_listed_uid_or_gid_and_no_one_else() -> None:
    held = Access(Settings(allow_uid=(1,), allow_gid=(2,), store="memory"), (1,)).held
    assert held({"pid": 1, "uid": 1, "gid": 9}, None) == {"read", "write", "events", "metrics"}
    assert held({"pid": 1, "uid": 9, "gid": 2}, None) == {"read", "write", "events", "metrics"}
    assert held({"pid": 1, "uid": 9, "gid": 9}, None) == set()
    assert held(None, None) == set()
    assert (
        Access(Settings(allow_gid=(2,), store="memory"), (1,)).held({"pid": 1, "uid": 9, "gid": 9}, None)
        == set()
    )


def test_allowlist_over_a_real_socket() -> None:
    """The real SO_PEERCRED of this test process decides, end to end."""
    me = os.getuid()
    others = {"UDS_ALLOW_UID": str(me + 12345), "UDS_ALLOW_GID": str(os.getgid() + 12345)}
    with running_server(env=others) as server:
        assert server.socket_path
        status, body = http_over_uds(
            server.socket_path, "POST", "/messages", b'{"text":"hi"}', {"content-type": "application/json"}
        )
        assert status == 403
        assert json.loads(body)["error"] == "forbidden"
        assert http_over_uds(server.socket_path, "GET", "/readyz")[0] == 200
        assert f"uid={me}" in server.output
    with running_server(env={"UDS_ALLOW_UID": str(me)}) as server:
        assert server.socket_path
        status, body = http_over_uds(
            server.socket_path, "POST", "/messages", b'{"text":"hi"}', {"content-type": "application/json"}
        )
        assert status == 201
        assert json.loads(body)["peer"]["uid"] == me


def test_refused_line_escapes_control_characters(
    make_client: Callable[..., ASGIClient], caplog: pytest.LogCaptureFixture
) -> None:
    """ESC, CR and LF from the path cannot forge log lines or drive a terminal."""
    client = make_client(LIST, peer=STRANGER)
    with caplog.at_level(logging.WARNING, logger="app.api.access"):
        assert_error(client.get("/x%1b[31mred%0d%0aINFO forged"), 403, "forbidden")
    line = next(r.getMessage() for r in caplog.records if r.name == "app.api.access")
    assert not any(c in line for c in "\x1b\r\n"), line
    assert "Refused GET /x\\x1b[31mred\\r\\nINFO forged from pid=12" in line


@pytest.mark.parametrize(
    ("behind", "status"),
    [
        ("uid=1000 gid=9 pid=7", 201),  # the user behind the proxy is on the list by uid
        ("uid=9 gid=3000 pid=7", 201),  # ... or by gid
        ("uid=5000 gid=5000 pid=7", 403),  # an allowed proxy cannot speak for a stranger
        ("uid=root", 403),  # malformed: refused, never taken as absent
    ],
)
def test_a_proxy_speaks_only_for_allowed_users(
    make_client: Callable[..., ASGIClient], behind: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    store = build_store(LIST)
    app = create_app(LIST, store=store)
    client = make_client(app=app, peer=ALLOWED)
    with caplog.at_level(logging.WARNING, logger="app.api.access"):
        response = client.post("/messages", json={"text": "hi"}, headers={"Uds-Forwarded-Peer": behind})
    assert response.status_code == status, response.text
    if status == 403:
        assert store.last_id() == 0
        assert [r.name for r in caplog.records if r.levelno >= logging.WARNING] == ["app.api.access"]
    else:
        assert response.json()["peer"]["forwarded_for"]["pid"] == 7


def test_a_repeated_forwarded_header_is_refused(make_client: Callable[..., ASGIClient]) -> None:
    """The check and the record must read the same header: two of them are refused, not one picked."""
    store = build_store(LIST)
    app = create_app(LIST, store=store)
    client = make_client(app=app, peer=ALLOWED)
    headers = [
        ("Uds-Forwarded-Peer", "uid=1000 gid=9 pid=7"),
        ("Uds-Forwarded-Peer", "uid=5000 gid=5000 pid=8"),
    ]
    response = client.post("/messages", json={"text": "hi"}, headers=headers)
    assert_error(response, 403, "forbidden")
    assert store.last_id() == 0


def test_refusals_are_logged_once_per_period(
    make_client: Callable[..., ASGIClient], caplog: pytest.LogCaptureFixture
) -> None:
    """A refused peer repeating itself must not flood the log: the rest are counted into a later line."""
    client = make_client(LIST, peer=STRANGER)
    with caplog.at_level(logging.WARNING, logger="app.api.access"):
        for _ in range(50):
            assert_error(client.get("/messages"), 403, "forbidden")
    assert len([r for r in caplog.records if r.name == "app.api.access"]) == 1
