"""The HTTP API in-process: messages, idempotency, history bounds, probes, versions, docs, OpenAPI."""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from app.config import Settings
from app.main import create_app
from app.storage.events import EventHub
from app.storage.sqlite import build_store
from tests.app.conftest import PEER, ASGIClient, assert_error

JSON = {"content-type": "application/json"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def test_post_message_answers_201_with_reply_peer_and_location(client: ASGIClient) -> None:
    response = client.post("/messages", json={"text": "Hello from client"})
    assert response.status_code == 201
    body = response.json()
    assert body["text"] == "Hello from client"
    assert body["reply"] == "Hello from server via UDS"
    assert body["peer"] == PEER
    assert isinstance(body["id"], int)
    assert response.headers["location"] == f"/messages/{body['id']}"
    assert RFC3339_UTC.match(body["received_at"]), body["received_at"]
    stamp = datetime.fromisoformat(body["received_at"])
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_peer_is_null_without_socket_credentials(make_client: Callable[..., ASGIClient]) -> None:
    response = make_client(peer=None).post("/messages", json={"text": "over tcp"})
    assert response.status_code == 201
    assert response.json()["peer"] is None


def test_post_logs_the_demo_line_and_the_peer(client: ASGIClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.messages"):
        client.post("/messages", json={"text": "Hello from client"})
    records = [r for r in caplog.records if r.name == "app.messages"]
    assert [r.getMessage() for r in records] == ["📩 Server received: Hello from client"]
    assert records[0].levelno == logging.INFO
    assert records[0].peer == PEER  # type: ignore[attr-defined]


def test_log_line_stays_one_line_and_short(client: ASGIClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.messages"):
        client.post("/messages", json={"text": "evil\nFAKE LOG LINE\r\x1b[31m"})
        client.post("/messages", json={"text": "x" * 4096})
    lines = [r.getMessage() for r in caplog.records if r.name == "app.messages"]
    assert lines[0] == "📩 Server received: evil\\nFAKE LOG LINE\\r\\x1b[31m"
    assert "\n" not in lines[1]
    assert len(lines[1]) < 300
    assert lines[1].endswith("(4096 characters)")


def test_reply_comes_from_settings(make_client: Callable[..., ASGIClient]) -> None:
    response = make_client(Settings(reply="pong")).post("/messages", json={"text": "ping"})
    assert response.json()["reply"] == "pong"


def test_ids_increase_and_get_by_id(client: ASGIClient) -> None:
    ids = [client.post("/messages", json={"text": f"m{i}"}).json()["id"] for i in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    for i, message_id in enumerate(ids):
        response = client.get(f"/messages/{message_id}")
        assert response.status_code == 200
        assert response.json()["text"] == f"m{i}"
        assert response.json()["id"] == message_id


def test_get_unknown_id_is_404_json(client: ASGIClient) -> None:
    body = assert_error(client.get("/messages/12345"), 404, "not_found")
    assert "12345" in body["message"]
    assert_error(client.get("/messages/-1"), 404, "not_found")
    assert_error(client.get("/messages/0"), 404, "not_found")


def test_get_non_integer_id_is_422(client: ASGIClient) -> None:
    body = assert_error(client.get("/messages/abc"), 422, "validation_error")
    assert body["details"][0]["loc"] == ["path", "message_id"]


def test_list_is_oldest_first_and_limited(client: ASGIClient) -> None:
    assert client.get("/messages").json() == {"messages": []}
    for i in range(7):
        client.post("/messages", json={"text": f"m{i}"})
    texts = [m["text"] for m in client.get("/messages").json()["messages"]]
    assert texts == [f"m{i}" for i in range(7)]
    texts = [m["text"] for m in client.get("/messages", params={"limit": 3}).json()["messages"]]
    assert texts == ["m4", "m5", "m6"]


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "abc", "1.5", ""])
def test_list_limit_out_of_range_is_422(client: ASGIClient, limit: str) -> None:
    body = assert_error(client.get(f"/messages?limit={limit}"), 422, "validation_error")
    assert body["details"][0]["loc"] == ["query", "limit"]


def test_list_default_limit_is_100(make_client: Callable[..., ASGIClient]) -> None:
    client = make_client(Settings(history_size=150))
    for i in range(120):
        client.post("/messages", json={"text": f"m{i}"})
    messages = client.get("/messages").json()["messages"]
    assert len(messages) == 100
    assert messages[0]["text"] == "m20"
    assert messages[-1]["text"] == "m119"
    assert len(client.get("/messages?limit=150").json()["messages"]) == 120


def test_history_is_bounded_and_old_ids_disappear(make_client: Callable[..., ASGIClient]) -> None:
    client = make_client(Settings(history_size=3))
    ids = [client.post("/messages", json={"text": f"m{i}"}).json()["id"] for i in range(5)]
    texts = [m["text"] for m in client.get("/messages?limit=3").json()["messages"]]
    assert texts == ["m2", "m3", "m4"]
    assert_error(client.get(f"/messages/{ids[0]}"), 404)
    assert client.get(f"/messages/{ids[2]}").json()["text"] == "m2"
    assert_error(client.get("/messages?limit=4"), 422)
    assert client.store is not None
    assert [i for i, _ in client.store.since(0, 10)] == ids[2:]


def test_idempotency_key_returns_the_original_and_stores_once(client: ASGIClient) -> None:
    headers = {"Idempotency-Key": "order-7f3a"}
    first = client.post("/messages", json={"text": "once"}, headers=headers)
    second = client.post("/messages", json={"text": "once"}, headers=headers)
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json() == first.json()
    assert [m["text"] for m in client.get("/messages").json()["messages"]] == ["once"]
    other = client.post("/messages", json={"text": "once"}, headers={"Idempotency-Key": "order-8000"})
    assert other.status_code == 201
    assert other.json()["id"] != first.json()["id"]


def test_idempotency_key_reused_with_other_text_is_409(client: ASGIClient) -> None:
    headers = {"Idempotency-Key": "k1"}
    client.post("/messages", json={"text": "first"}, headers=headers)
    body = assert_error(
        client.post("/messages", json={"text": "second"}, headers=headers), 409, "idempotency_key_reused"
    )
    assert "Idempotency-Key" in body["message"]
    assert len(client.get("/messages").json()["messages"]) == 1


def test_idempotency_key_outlives_the_history(make_client: Callable[..., ASGIClient]) -> None:
    client = make_client(Settings(history_size=1, idempotency_keys=10))
    first = client.post("/messages", json={"text": "a"}, headers={"Idempotency-Key": "k"}).json()
    client.post("/messages", json={"text": "b"})
    again = client.post("/messages", json={"text": "a"}, headers={"Idempotency-Key": "k"})
    assert again.status_code == 200
    assert again.json() == first
    assert [m["text"] for m in client.get("/messages").json()["messages"]] == ["b"]


def test_idempotency_keys_are_bounded_lru(make_client: Callable[..., ASGIClient]) -> None:
    client = make_client(Settings(idempotency_keys=2))
    for key in ("a", "b"):
        client.post("/messages", json={"text": key}, headers={"Idempotency-Key": key})
    # Touch "a" so "b" is the least recently used, then add "c": "b" is forgotten.
    assert client.post("/messages", json={"text": "a"}, headers={"Idempotency-Key": "a"}).status_code == 200
    client.post("/messages", json={"text": "c"}, headers={"Idempotency-Key": "c"})
    assert client.post("/messages", json={"text": "a"}, headers={"Idempotency-Key": "a"}).status_code == 200
    assert client.post("/messages", json={"text": "b"}, headers={"Idempotency-Key": "b"}).status_code == 201


@pytest.mark.parametrize("key", ["", " ", "a b", "é", "x" * 256, "tab\there"])
def test_invalid_idempotency_key_is_400(client: ASGIClient, key: str) -> None:
    response = client.post(
        "/messages", content=b'{"text":"hi"}', headers={**JSON, "Idempotency-Key": key.encode("latin-1")}
    )  # type: ignore[dict-item]
    body = assert_error(response, 400, "bad_request")
    assert "Idempotency-Key" in body["message"]
    assert client.get("/messages").json() == {"messages": []}


def test_healthz_and_readyz(make_client: Callable[..., ASGIClient]) -> None:
    settings = Settings(store="memory")
    store = build_store(settings)
    hub = EventHub(store, 1)
    client = make_client(app=create_app(settings, store=store, hub=hub))
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    hub.drain_soon()  # what the server's signal handler does on SIGTERM
    draining = client.get("/readyz")
    assert draining.status_code == 503
    assert draining.json() == {"status": "draining"}
    assert client.get("/healthz").status_code == 200


def test_version_lists_the_stack(client: ASGIClient) -> None:
    import fastapi
    import pydantic
    import starlette
    import uvicorn

    import app as app_package

    body = client.get("/version").json()
    assert body["app"] == app_package.__version__
    assert body["python"] == ".".join(map(str, sys.version_info[:3]))
    assert body["uvicorn"] == uvicorn.__version__
    assert body["fastapi"] == fastapi.__version__
    assert body["starlette"] == starlette.__version__
    assert body["pydantic"] == pydantic.VERSION


def test_create_app_uses_the_dependencies_given(make_client: Callable[..., ASGIClient]) -> None:
    settings = Settings(store="memory", reply="given")
    store = build_store(settings)
    client = make_client(app=create_app(settings, store=store))
    assert client.post("/messages", json={"text": "hi"}).json()["reply"] == "given"
    assert [i for i, _ in store.since(0, 10)] == [1]


def test_module_level_app_is_built_lazily_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UDS_HISTORY_SIZE", "7")
    monkeypatch.setenv("UDS_REPLY", "from env")
    monkeypatch.setenv("UDS_LOG_FORMAT", "json")
    monkeypatch.setenv("UDS_STORE", "memory")  # building the app may not touch /var/lib
    calls: list[tuple[object, ...]] = []
    # The plain-uvicorn path sets up logging; record that instead of rewiring pytest's handlers.
    monkeypatch.setattr("app.logs.configure", lambda *args, **kwargs: calls.append(args))
    sys.modules.pop("app.main", None)
    module = importlib.import_module("app.main")
    try:
        assert calls == [], "importing app.main must not build the app (nor set up logging)"
        built = module.app
        assert built is module.app
        client = ASGIClient(built)
        assert client.post("/messages", json={"text": "hi"}).json()["reply"] == "from env"
        assert_error(client.get("/messages?limit=8"), 422)  # the history holds 7
        client.close()
        assert calls == [("info", "json")]
        with pytest.raises(AttributeError):
            _ = module.no_such_name
    finally:
        sys.modules.pop("app.main", None)  # the next import builds afresh


def test_every_operation_is_documented(client: ASGIClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = {(path, method): op for path, item in spec["paths"].items() for method, op in item.items()}
    assert set(operations) == {
        ("/v1/messages", "post"),
        ("/v1/messages", "get"),
        ("/v1/messages/{message_id}", "get"),
        ("/v1/version", "get"),
        ("/v1/events", "get"),
        ("/v1/whoami", "get"),
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/_ping", "get"),
        ("/_ping", "head"),
    }
    for (path, method), op in operations.items():
        where = f"{method.upper()} {path}"
        assert op.get("summary"), where
        assert op.get("description"), where
        assert op.get("tags"), where
        if path in {"/_ping", "/metrics", "/v1/events"}:  # not JSON: test_versions, test_metrics, test_events
            continue
        for status, response in op["responses"].items():
            content = response.get("content", {}).get("application/json")
            assert content, f"{where} {status}"
            assert "schema" in content, f"{where} {status}"
            schema_ref = content["schema"].get("$ref", "")
            if status.startswith("4"):
                assert schema_ref == "#/components/schemas/ErrorBody", f"{where} {status}"
        assert any(
            s.startswith("2") and "example" in r["content"]["application/json"]
            for s, r in op["responses"].items()
        ) or (path == "/v1/messages" and method == "get"), where
    post = operations[("/v1/messages", "post")]
    body_schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["required"] == ["text"]
    assert body_schema["additionalProperties"] is False
    assert body_schema["properties"]["text"]["maxLength"] == 4096
    assert {"201", "200", "409", "413", "415", "422"} <= set(post["responses"])
    assert post["parameters"][0]["name"] == "Idempotency-Key"
    link = post["responses"]["201"]["links"]["GetMessage"]
    assert link == {**link, "operationId": "get_message", "parameters": {"message_id": "$response.body#/id"}}


def test_openapi_text_limit_follows_settings(make_client: Callable[..., ASGIClient]) -> None:
    spec = make_client(Settings(max_text_length=10)).get("/openapi.json").json()
    schema = spec["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["text"]["maxLength"] == 10


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_are_offline(client: ASGIClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert "https://" not in html
    assert "http://" not in html
    assert "//fonts." not in html
    # Nothing loads by attribute (a src cannot carry the proxy's token header): the page fetches
    # its assets from this server and runs them.
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == []
    names = re.findall(r'"/?([\w.-]+\.(?:js|css|png))"', html)
    assert {"favicon.png", "swagger-ui-bundle.js" if page == "/docs" else "redoc.standalone.js"} <= set(names)
    assert '"/docs-assets"' in html
    for name in names:
        fetched = client.get(f"/docs-assets/{name}")
        assert fetched.status_code == 200, name
        assert len(fetched.content) > 1000, name
    assert '"/openapi.json"' in html
    assert '"Uds-Proxy-Token"' in html
    assert response.headers["referrer-policy"] == "no-referrer"
    # ReDoc's bundle names one image on its CDN: the policy keeps the browser from fetching it.
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "img-src 'self' data:" in policy


def test_docs_assets_come_from_fastapi_offline(client: ASGIClient) -> None:
    import fastapi_offline

    from app.api.routes.docs import ASSETS_URL, assets_directory

    assert str(assets_directory()).startswith(str(fastapi_offline.__path__[0]))
    js = client.get(f"{ASSETS_URL}/swagger-ui-bundle.js")
    assert js.content == (assets_directory() / "swagger-ui-bundle.js").read_bytes()
    assert "javascript" in js.headers["content-type"]
    assert client.get(f"{ASSETS_URL}/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert client.get(f"{ASSETS_URL}/favicon.png").headers["content-type"] == "image/png"
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_json_logs_of_a_real_server_carry_the_peer() -> None:
    import json
    import os

    from tests.support import http_over_uds, running_server, wait_until

    def received() -> list[dict[str, Any]]:
        events = [json.loads(line) for line in server.output.splitlines() if line.startswith("{")]
        return [e for e in events if e.get("message") == "📩 Server received: Hello from client"]

    with running_server("--log-format", "json") as server:
        assert server.socket_path
        body = b'{"text": "Hello from client"}'
        status, _ = http_over_uds(server.socket_path, "POST", "/messages", body, JSON)
        assert status == 201
        # The log line is written at the end of the event-loop turn, maybe after the answer.
        lines = wait_until(lambda: received() or None, what="the log line of the POST")
    assert len(lines) == 1, lines
    event: dict[str, Any] = lines[0]
    assert event["logger"] == "app.messages"
    assert event["peer"]["uid"] == os.getuid()
    assert event["message_id"] == 1


def test_idempotency_keys_belong_to_the_uid_that_sent_them(make_client: Callable[..., ASGIClient]) -> None:
    """Another uid reusing a key stores its own message and learns nothing of the first."""
    app = create_app(Settings(store="memory"))
    first = make_client(app=app, peer={"pid": 1, "uid": 1000, "gid": 1000})
    other = make_client(app=app, peer={"pid": 2, "uid": 2000, "gid": 2000})
    headers = {"Idempotency-Key": "shared-key"}
    mine = first.post("/messages", json={"text": "secret"}, headers=headers)
    assert mine.status_code == 201
    theirs = other.post("/messages", json={"text": "guess"}, headers=headers)
    assert theirs.status_code == 201, "a guessed text must not come back as 409"
    assert theirs.json()["id"] != mine.json()["id"]
    again = first.post("/messages", json={"text": "secret"}, headers=headers)
    assert (again.status_code, again.json()["id"]) == (200, mine.json()["id"])
