"""API versions: every API route under ``/v1`` with its unversioned alias, documented once;
``GET|HEAD /_ping``; ``/version`` names the API versions; an unsupported version gets 400."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from fastapi.routing import APIRoute

from app import __version__
from app.api.versions import API_VERSIONS
from app.config import Settings
from app.main import create_app
from tests.app.conftest import ASGIClient, assert_error
from tests.support import http_over_uds, read_head, read_response, response_status, running_server

MEMORY = Settings(store="memory")
UNVERSIONED = {"/_ping", "/healthz", "/readyz", "/metrics"}
"""Paths that are not API routes: the probes, the ping and the metrics scrape."""
STRANGER = {"pid": 12, "uid": 5000, "gid": 5000}


def test_the_versions_this_server_serves() -> None:
    assert API_VERSIONS == (1,)
    assert (API_VERSIONS[0], API_VERSIONS[-1]) == (1, 1)


@pytest.mark.parametrize("prefix", ["/v1", ""])
def test_messages_and_version_answer_under_v1_and_unversioned(client: ASGIClient, prefix: str) -> None:
    sent = client.post(f"{prefix}/messages", json={"text": "hi"})
    assert sent.status_code == 201, sent.text
    message_id = sent.json()["id"]
    for other in ("/v1", ""):  # one store behind both paths
        assert client.get(f"{other}/messages/{message_id}").json()["text"] == "hi"
        assert [m["id"] for m in client.get(f"{other}/messages").json()["messages"]] == [message_id]
    version = client.get(f"{prefix}/version").json()
    assert (version["app"], version["api_version"], version["min_api_version"]) == (__version__, "1", "1")


def test_openapi_lists_each_operation_once_under_v1(client: ASGIClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = [
        (path, method, op["operationId"])
        for path, item in spec["paths"].items()
        for method, op in item.items()
    ]
    ids = [operation_id for _, _, operation_id in operations]
    assert len(ids) == len(set(ids)), ids
    for path, _, operation_id in operations:
        assert path.startswith("/v1/") or path in UNVERSIONED, (path, operation_id)
    documented = {path for path, _, _ in operations}
    assert {"/v1/messages", "/v1/messages/{message_id}", "/v1/version", "/_ping"} <= documented
    for path in documented:
        assert path.removeprefix("/v1") not in documented or path in UNVERSIONED, f"{path} twice"
    assert {"messages", "version"}.isdisjoint(documented)
    assert (
        spec["paths"]["/v1/version"]["get"]["responses"]["200"]["content"]["application/json"]["example"][
            "api_version"
        ]
        == "1"
    )


def test_the_current_version_route_also_answers_the_alias() -> None:
    """One route per operation answers both paths (no extra route to miss); POST comes first."""
    app = create_app(MEMORY)
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    versioned = [r for r in routes if r.path.startswith("/v1/")]
    assert {r.path for r in versioned} >= {"/v1/messages", "/v1/messages/{message_id}", "/v1/version"}
    for route in versioned:
        bare = route.path[3:].replace("{message_id}", "7")
        assert route.path_regex.match(bare), route.path
        assert route.path_regex.match("/v1" + bare), route.path
        assert not route.path_regex.match("/v2" + bare), route.path
        assert [r for r in routes if r.path == route.path[3:]] == [], "no separate alias route"
    assert (routes[0].path, routes[0].methods) == ("/v1/messages", {"POST"})


def test_an_alias_for_the_current_version_only() -> None:
    app = create_app(MEMORY, api_versions=(1, 2))
    older = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == "/v1/messages")
    assert older.path_regex.match("/v1/messages")
    assert not older.path_regex.match("/messages"), "the alias means the current version, 2"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_ping_answers_ok_with_the_versions(client: ASGIClient, method: str) -> None:
    response = client.request(method, "/_ping")
    assert response.status_code == 200
    assert response.headers["api-version"] == "1"
    assert response.headers["min-api-version"] == "1"
    assert response.headers["server"] == f"uds-example/{__version__}"
    assert response.headers["content-type"].startswith("text/plain")
    assert response.content == (b"OK" if method == "GET" else b"")


@pytest.mark.parametrize(
    ("method", "path", "asked"),
    [
        ("GET", "/v9/messages", "9"),
        ("POST", "/v0/messages", "0"),
        ("GET", "/v1.5/messages", "1.5"),
        ("GET", "/v10/version", "10"),
        ("DELETE", "/v2", "2"),
    ],
)
def test_an_unsupported_version_is_a_400_naming_the_range(
    client: ASGIClient, method: str, path: str, asked: str
) -> None:
    body = assert_error(client.request(method, path), 400, "unsupported_api_version")
    assert body["message"].startswith(
        f"API version '{asked}' is not supported; this server supports API version 1"
    )


def test_a_served_version_keeps_its_404_and_405(client: ASGIClient) -> None:
    assert_error(client.get("/v1/nowhere"), 404, "not_found")
    assert_error(client.get("/v1"), 404, "not_found")
    response = client.request("PUT", "/v1/messages")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"
    assert_error(client.get("/vnext/messages"), 404, "not_found")  # not a version number


def test_an_app_serving_versions_1_to_3(make_client: Callable[..., ASGIClient]) -> None:
    """What tests of older and newer servers rely on: create_app(api_versions=...)."""
    app = create_app(MEMORY, api_versions=(3, 1, 2))
    client = make_client(app=app)
    ping = client.get("/_ping")
    assert (ping.headers["api-version"], ping.headers["min-api-version"]) == ("3", "1")
    for prefix in ("/v1", "/v2", "/v3", ""):
        assert client.post(f"{prefix}/messages", json={"text": f"to {prefix}"}).status_code == 201
    texts = [m["text"] for m in client.get("/v2/messages").json()["messages"]]
    assert texts == ["to /v1", "to /v2", "to /v3", "to "]
    assert client.get("/version").json()["api_version"] == "3"
    body = assert_error(client.get("/v4/messages"), 400, "unsupported_api_version")
    assert "this server supports API versions 1 to 3: use /v3/..." in body["message"]
    paths = set(app.openapi()["paths"])
    assert "/v3/messages" in paths
    assert not any(p.startswith(("/v1/", "/v2/")) for p in paths), "only the current version is documented"


def test_the_allowlist_leaves_ping_open(make_client: Callable[..., ASGIClient]) -> None:
    client = make_client(Settings(allow_uid=(1000,), store="memory"), peer=STRANGER)
    assert client.get("/_ping").status_code == 200
    assert client.request("HEAD", "/_ping").status_code == 200
    assert_error(client.get("/v1/version"), 403, "forbidden")
    assert_error(client.get("/version"), 403, "forbidden")


def test_over_the_socket_ping_is_open_and_versions_route() -> None:
    """A real server with an allowlist that leaves this process out: /_ping and HEAD still answer."""
    with running_server("--allow-uid", "54321", "--store", "memory") as server:
        path = server.socket_path
        assert path is not None
        assert http_over_uds(path, "GET", "/_ping") == (200, b"OK")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(path)
            conn.sendall(b"HEAD /_ping HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            buffer = bytearray()
            answer = read_head(conn, buffer)
            assert answer is not None
            head, headers = answer
            assert response_status(head) == 200
            assert (headers["api-version"], headers["min-api-version"]) == ("1", "1")
            assert headers["server"] == f"uds-example/{__version__}"
            status, _, body = read_response(conn, buffer)  # HEAD sent no body: the next answer follows
            assert (status, body) == (200, b'{"status":"ok"}')
        status, _ = http_over_uds(path, "GET", "/v1/messages")
        assert status == 403
    with running_server("--store", "memory") as server:
        path = server.socket_path
        assert path is not None
        status, body = http_over_uds(
            path, "POST", "/v1/messages", b'{"text":"v1"}', {"content-type": "application/json"}
        )
        assert status == 201, body
        assert http_over_uds(path, "GET", "/v9/messages")[0] == 400
        assert http_over_uds(path, "GET", "/messages/1")[0] == 200
