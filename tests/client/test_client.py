"""``Client``: endpoint methods and error mapping in-process, transport behaviour on a real socket."""

from __future__ import annotations

import logging
import os
import ssl
from datetime import UTC

import httpx2
import pytest

import client
from client import (
    APIError,
    Client,
    ClientError,
    ConnectError,
    Health,
    Message,
    UsageError,
    Version,
    resolve_socket,
)

# --- in-process: the app behind FastAPI's TestClient ---------------------------------------------


def test_send_returns_a_typed_message(app_client: Client) -> None:
    message = app_client.send("Hello from client")
    assert isinstance(message, Message)
    assert message.text == "Hello from client"
    assert message.reply == "Hello from server via UDS"
    assert message.id >= 1
    assert message.received_at.tzinfo is not None
    assert message.received_at.utcoffset() == UTC.utcoffset(None)
    assert message.peer is None  # no socket, so no peer credentials


def test_same_idempotency_key_returns_the_original_and_stores_once(app_client: Client) -> None:
    first = app_client.send("once", idempotency_key="key-1")
    again = app_client.send("once", idempotency_key="key-1")
    assert again.id == first.id
    assert [m.text for m in app_client.messages()] == ["once"]


def test_each_send_gets_a_fresh_key(app_client: Client) -> None:
    ids = {app_client.send("same text").id for _ in range(3)}
    assert len(ids) == 3


def test_messages_most_recent_oldest_first(app_client: Client) -> None:
    for text in ("a", "b", "c", "d"):
        app_client.send(text)
    assert [m.text for m in app_client.messages(limit=2)] == ["c", "d"]
    assert [m.text for m in app_client.messages()] == ["a", "b", "c", "d"]


def test_message_by_id_and_json_round_trip(app_client: Client) -> None:
    sent = app_client.send("find me")
    found = app_client.message(sent.id)
    assert found == sent
    assert Message.from_json(found.to_json()) == found
    assert found.to_json()["received_at"].endswith("Z")


def test_unknown_message_raises_api_error_with_server_message(app_client: Client) -> None:
    with pytest.raises(APIError) as info:
        app_client.message(424242)
    assert info.value.status == 404
    assert info.value.error == "not_found"
    assert "424242" in info.value.message
    assert info.value.exit_code == 1


@pytest.mark.parametrize("text", ["", "x" * 5000])
def test_invalid_text_is_a_422(app_client: Client, text: str) -> None:
    with pytest.raises(APIError) as info:
        app_client.send(text)
    assert info.value.status == 422
    assert isinstance(info.value.body, dict)
    assert info.value.body["details"]


def test_probes_version_and_openapi(app_client: Client) -> None:
    assert app_client.health() == Health(status="ok", ok=True)
    assert app_client.ready() == Health(status="ready", ok=True)
    version = app_client.version()
    assert isinstance(version, Version)
    assert version.app == "1.0.0"
    assert version.python.startswith("3.")
    assert version.fastapi
    assert version.uvicorn
    spec = app_client.openapi()
    assert spec["openapi"].startswith("3.")
    assert "/v1/messages" in spec["paths"]


def test_raw_get_returns_error_statuses_without_raising(app_client: Client) -> None:
    raw = app_client.get("/no/such/route")
    assert raw.status == 404
    assert not raw.ok
    assert raw.json()["status"] == 404
    assert raw.headers["content-type"].startswith("application/json")
    ok = app_client.get("/healthz")
    assert ok.ok
    assert ok.json() == {"status": "ok"}


def test_bad_arguments_are_usage_errors(app_client: Client) -> None:
    with pytest.raises(UsageError):
        app_client.messages(limit=0)
    with pytest.raises(UsageError):
        app_client.get("healthz")


def test_one_debug_line_per_request_and_no_logging_setup(
    app_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="client"):
        app_client.health()
        app_client.send("logged")
    lines = [r.getMessage() for r in caplog.records if r.name == "client"]
    assert len(lines) == 3, lines  # the probe is unversioned; the first API call pings once
    assert "GET /healthz -> 200" in lines[0]
    assert "GET /_ping -> 200" in lines[1]
    assert "POST /v1/messages -> 201" in lines[2]
    assert "logged" not in lines[2]  # never the body
    assert logging.getLogger("client").handlers == []


# --- the socket address ---------------------------------------------------------------------------


def test_socket_precedence_argument_then_env_then_default() -> None:
    env = {"UDS_SOCKET": "unix:///env/s.sock"}
    assert resolve_socket("/flag/s.sock", env) == "/flag/s.sock"
    assert resolve_socket(None, env) == "/env/s.sock"
    assert resolve_socket(None, {}) == "/csi/csi.sock"
    assert resolve_socket(None, {"UDS_SOCKET": ""}) == "/csi/csi.sock"
    assert Client(environ=env).address == "unix:///env/s.sock"


@pytest.mark.parametrize("value", ["relative.sock", "tcp://localhost:80", "unix://host/x.sock"])
def test_bad_address_is_a_usage_error_quoting_it(value: str) -> None:
    with pytest.raises(UsageError) as info:
        Client(value)
    assert repr(value) in str(info.value)
    assert info.value.exit_code == 2


def test_public_names_resolve() -> None:
    for name in client.__all__:
        assert getattr(client, name) is not None
    with pytest.raises(AttributeError):
        _ = client.NoSuchName  # type: ignore[attr-defined]


def test_creating_clients_loads_no_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a CA bundle was loaded for a Unix socket client")

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", refuse)
    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", refuse)
    monkeypatch.setattr(ssl.SSLContext, "set_default_verify_paths", refuse)
    with Client("/tmp/none.sock") as one, Client("/tmp/none.sock") as two:
        assert one.path == two.path == "/tmp/none.sock"
    client.AsyncClient("/tmp/none.sock")
    # The check above would catch httpx2's default: it loads the system CA file per transport.
    with pytest.raises(AssertionError, match="CA bundle"):
        httpx2.HTTPTransport(uds="/tmp/none.sock")


@pytest.mark.parametrize("options", [{"timeout": 0}, {"timeout": -1.0}, {"max_response_bytes": 0}])
def test_bad_limits_are_usage_errors(options: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        Client("/tmp/none.sock", **options)  # type: ignore[arg-type]


# --- a real server on a socket ---------------------------------------------------------------------


def root_cause(exc: BaseException) -> BaseException:
    """The first error in the chain (httpcore wraps the OSError as its argument, not its cause)."""
    while True:
        if exc.__cause__ is not None:
            exc = exc.__cause__
        elif exc.args and isinstance(exc.args[0], BaseException):
            exc = exc.args[0]
        else:
            return exc


def test_round_trip_over_the_socket_carries_peer_credentials(server_path: str) -> None:
    with Client(server_path) as c:
        assert isinstance(c._http, httpx2.Client)
        message = c.send("Hello from client")
        assert message.reply == "Hello from server via UDS"
        assert message.peer is not None
        peer = message.peer
        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert c.message(message.id) == message
        assert c.health().ok


def test_env_var_names_the_socket(server_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UDS_SOCKET", "unix://" + server_path)
    with Client() as c:
        assert c.path == server_path
        assert c.health().ok


def test_missing_socket_is_a_connect_error(tmp_short: object) -> None:
    path = f"{tmp_short}/missing.sock"
    with Client(path) as c, pytest.raises(ConnectError) as info:
        c.health()
    error = info.value
    assert error.reason == "no such file"
    assert error.address == "unix://" + path
    assert str(error) == f"cannot connect to unix://{path} (no such file). Is the server running?"
    assert isinstance(root_cause(error), FileNotFoundError)
    assert error.exit_code == 3


def test_errors_of_a_callers_httpx2_client_are_mapped_the_same(silent_socket: str) -> None:
    transport = httpx2.HTTPTransport(uds=silent_socket, verify=False)
    with (
        httpx2.Client(transport=transport, base_url="http://localhost", timeout=0.3) as http,
        Client(silent_socket, http_client=http) as c,
        pytest.raises(ConnectError) as info,
    ):
        c.health()
    assert info.value.reason == "timed out"
    assert isinstance(info.value.__cause__, httpx2.ReadTimeout)


def test_refused_socket_is_a_connect_error(refused_socket: str) -> None:
    with Client(refused_socket) as c, pytest.raises(ConnectError) as info:
        c.send("x")
    assert info.value.reason == "connection refused"
    assert isinstance(root_cause(info.value), ConnectionRefusedError)


def test_silent_server_times_out(silent_socket: str) -> None:
    with Client(silent_socket, timeout=0.3) as c, pytest.raises(ConnectError) as info:
        c.health()
    assert info.value.reason == "timed out"
    assert isinstance(info.value.__cause__, httpx2.TimeoutException)


def test_non_json_success_is_a_client_error(server_path: str) -> None:
    with Client(server_path) as c:
        page = c.get("/docs")
        assert page.ok
        assert page.headers["content-type"].startswith("text/html")
    html = httpx2.MockTransport(lambda request: httpx2.Response(200, content=page.content))
    with (
        httpx2.Client(transport=html, base_url="http://localhost") as http,
        Client(http_client=http) as c,
        pytest.raises(ClientError, match="not JSON"),
    ):
        c.health()


def test_one_client_shared_by_threads(server_path: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with Client(server_path, max_connections=4) as c, ThreadPoolExecutor(8) as pool:
        messages = list(pool.map(lambda i: c.send(f"thread {i}"), range(80)))
    assert len({m.id for m in messages}) == 80
    assert sorted(m.text for m in messages) == sorted(f"thread {i}" for i in range(80))
