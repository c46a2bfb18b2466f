"""The lean ``POST /messages`` path: validated by its pydantic model, answered in the one error shape,
bounded by a server-wide budget of body bytes; and ``GET /messages`` streamed in bounded chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import orjson
import pytest
from fastapi.routing import APIRoute

from app.api.models import message_in_model
from app.api.routes import messages
from app.api.routes.messages import LIST_CHUNK, LeanRoute
from app.config import Settings
from app.main import create_app
from app.storage.sqlite import build_store
from tests.app.conftest import ASGIClient, _WithPeer, assert_error

JSON = {"content-type": "application/json"}
TEXT = [("body", "text")]

# (body, error code, [(type, loc), ...]): the model's verdicts, located under "body" like FastAPI's.
VERDICTS: list[tuple[bytes, str, list[tuple[str, list[str]]]]] = [
    (b'{"text": 5}', "validation_error", [("string_type", ["body", "text"])]),
    (b"{}", "validation_error", [("missing", ["body", "text"])]),
    (b'{"text": ""}', "validation_error", [("string_too_short", ["body", "text"])]),
    (b'{"text": "123456"}', "validation_error", [("string_too_long", ["body", "text"])]),
    (
        b'{"text": "a", "b": 1, "c": 2}',
        "validation_error",
        [("extra_forbidden", ["body", "b"]), ("extra_forbidden", ["body", "c"])],
    ),
    (b'{"x": 1}', "validation_error", [("missing", ["body", "text"]), ("extra_forbidden", ["body", "x"])]),
    (b"[]", "validation_error", [("model_type", ["body"])]),
    (b'"text"', "validation_error", [("model_type", ["body"])]),
    (b'{"text": NaN}', "validation_error", [("string_type", ["body", "text"])]),
    (b'{"text": "a"', "invalid_json", [("json_invalid", ["body"])]),
    (b'{"text": "\\ud800"}', "invalid_json", [("json_invalid", ["body"])]),
    (b"", "invalid_json", [("json_invalid", ["body"])]),
]


@pytest.mark.parametrize(
    ("raw", "error", "expected"), VERDICTS, ids=[v[0].decode() or "empty" for v in VERDICTS]
)
def test_invalid_bodies_get_the_models_verdict(
    make_client: Callable[..., ASGIClient], raw: bytes, error: str, expected: list[tuple[str, list[str]]]
) -> None:
    client = make_client(Settings(max_text_length=5))
    body = assert_error(client.post("/messages", content=raw, headers=JSON), 422, error)
    assert [(d["type"], d["loc"]) for d in body["details"]] == expected
    assert all(set(d) == {"type", "loc", "msg"} for d in body["details"]), "the input is never echoed"
    assert body["message"].startswith("the request body is empty" if not raw else "invalid request: ")
    assert client.get("/messages").json() == {"messages": []}


def test_the_longest_text_is_accepted(make_client: Callable[..., ASGIClient]) -> None:
    response = make_client(Settings(max_text_length=5)).post("/messages", json={"text": "\U0001f600" * 5})
    assert response.status_code == 201, response.text
    assert response.json()["text"] == "\U0001f600" * 5


def test_the_hot_route_is_a_documented_lean_route() -> None:
    app = create_app(Settings(store="memory"))
    routes = [r for r in app.routes if isinstance(r, APIRoute) and "POST" in r.methods]
    assert [r.path for r in routes] == ["/v1/messages"], "one route answers /v1/messages and /messages"
    route = routes[0]
    assert app.routes.index(route) == 0, "the hot route is the first the router tries"
    assert isinstance(route, LeanRoute)
    assert route.dependant.dependencies == []
    assert route.body_field is None
    assert app.user_middleware == [], "no middleware on the hot path when no allowlist is set"
    body = app.openapi()["paths"]["/v1/messages"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert schema == message_in_model(4096).model_json_schema()


def test_bodies_past_the_server_wide_budget_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow chunked body holds most of the budget: a body that does not fit is refused, unread."""
    monkeypatch.setattr(messages, "BODY_BUDGET", 60)
    monkeypatch.setattr(messages, "REQUEST_COST", 10)
    monkeypatch.setattr(messages, "PEER_SHARE", 1)  # one peer may hold it all: the server-wide bound
    client = ASGIClient(create_app(Settings(store="memory")))
    counted, release = asyncio.Event(), asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b'{"text": "' + b"s" * 30
        counted.set()  # the server asks for more: it has drawn 10 + 40 bytes from the budget
        await release.wait()
        yield b'"}'

    async def both() -> tuple[Any, Any]:
        held = asyncio.ensure_future(client._client.post("/messages", content=slow(), headers=JSON))
        await asyncio.wait_for(counted.wait(), 10)
        refused = await client._client.post("/messages", content=b'{"text": "no room"}', headers=JSON)
        release.set()
        return await held, refused

    try:
        held, refused = client._runner.run(both())
        body = assert_error(refused, 503, "unavailable")
        assert "too many request bodies" in body["message"]
        assert refused.headers["retry-after"] == "1"
        assert held.status_code == 201, held.text
        # Every byte was given back: a chunked body of 50 bytes (10 + 50) fits again.
        fifty = b'{"text": "' + b"a" * 38 + b'"}'
        again = client.post_stream("/messages", lambda: _chunks(fifty), headers=JSON)
        assert again.status_code == 201, again.text
    finally:
        client.close()


def test_one_uid_holding_bodies_open_leaves_room_for_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer uid may hold a quarter of the body budget: past it that uid gets 503, others do not."""
    monkeypatch.setattr(messages, "BODY_BUDGET", 400)
    monkeypatch.setattr(messages, "REQUEST_COST", 10)
    app = create_app(Settings(store="memory"))
    hog, other = {"pid": 1, "uid": 2000, "gid": 2000}, {"pid": 2, "uid": 3000, "gid": 3000}

    async def scenario() -> tuple[int, int, int]:
        counted, release = asyncio.Event(), asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield b'{"text": "' + b"s" * 60  # 10 + 70 of the hog's 100
            counted.set()
            await release.wait()
            yield b'"}'

        def client(peer: dict[str, int]) -> httpx2.AsyncClient:
            transport = httpx2.ASGITransport(app=_WithPeer(app, peer))
            return httpx2.AsyncClient(transport=transport, base_url="http://uds")

        async with client(hog) as hogging, client(other) as polite:
            held = asyncio.ensure_future(hogging.post("/messages", content=slow(), headers=JSON))
            await asyncio.wait_for(counted.wait(), 10)
            body = b'{"text": "' + b"x" * 30 + b'"}'  # 10 + 42: past the hog's share, within the other's
            refused = await hogging.post("/messages", content=body, headers=JSON)
            served = await polite.post("/messages", content=body, headers=JSON)
            release.set()
            return refused.status_code, served.status_code, (await held).status_code

    assert asyncio.run(scenario()) == (503, 201, 201)


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 4):
        yield body[i : i + 4]


def test_a_long_list_is_streamed_in_chunks(make_client: Callable[..., ASGIClient]) -> None:
    client = make_client(Settings(max_text_length=4096))
    text = "x" * 4000
    ids = [client.post("/messages", json={"text": f"{i}{text}"}).json()["id"] for i in range(20)]
    response = client.get("/messages", params={"limit": 20})
    assert response.status_code == 200
    assert "content-length" not in response.headers, "streamed (chunked over a socket)"
    assert response.headers["content-type"] == "application/json"
    assert [m["id"] for m in response.json()["messages"]] == ids
    assert [m["text"] for m in response.json()["messages"]] == [f"{i}{text}" for i in range(20)]
    assert len(response.content) > 4 * LIST_CHUNK
    short = client.get("/messages", params={"limit": 2})
    assert int(short.headers["content-length"]) == len(short.content)
    assert short.json()["messages"] == response.json()["messages"][-2:]


def test_a_streamed_list_leaves_out_what_left_the_history_and_pins_nothing() -> None:
    """A client reading slowly while new messages push old ones out: the answer stays valid JSON,
    skips the messages that left, and holds no reference to them."""
    import sys

    store = build_store(Settings(history_size=40, store="memory"))

    def add(text: str) -> None:
        asyncio.run(store.put(text, "r", "t", None, None))

    for i in range(40):
        add(f"{i}" + "x" * 2000)
    chunks = messages._list_chunks(store, store.recent_ids(40))
    first = next(chunks)
    first_ids = [r["id"] for r in orjson.loads(first + b"]}")["messages"]]
    assert first_ids == list(range(1, len(first_ids) + 1))
    assert len(first) >= LIST_CHUNK
    old = store.get(39)
    assert old is not None
    for i in range(39):  # 39 new messages: only message 40 of the first 40 is still in the history
        add(f"new {i}")
    assert sys.getrefcount(old) == 2, "only `old` and getrefcount's argument refer to the message"
    document = orjson.loads(first + b"".join(chunks))
    assert [m["id"] for m in document["messages"]] == [*first_ids, 40]


def test_long_lists_past_the_limit_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "LIST_STREAMS", 0)
    client = ASGIClient(create_app(Settings(store="memory")))
    try:
        for _ in range(5):  # 20 KiB: more than one chunk
            client.post("/messages", json={"text": "x" * 4096})
        assert client.get("/messages?limit=1").status_code == 200, "one chunk is never refused"
        body = assert_error(client.get("/messages"), 503, "unavailable")
        assert "limit" in body["message"]
    finally:
        client.close()


def test_list_slots_are_held_by_readers_that_never_read_and_freed_when_they_go() -> None:
    """Over a real socket: LIST_STREAMS never-reading clients hold every slot (the next long list
    gets 503); once they hang up, their slots come back."""
    import socket

    from app.api.routes.messages import LIST_STREAMS
    from tests.support import read_response, running_server, wait_until

    body = orjson.dumps({"text": "\U0001f600" * 4096})
    post = (
        b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    long_list = b"GET /messages?limit=100 HTTP/1.1\r\nHost: x\r\n\r\n"  # 1.6 MB: more than the kernel holds

    def status_of_a_long_list(path: str) -> int:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(path)
            conn.sendall(long_list)
            status, _, _ = read_response(conn)
            return status

    with running_server() as server:
        path = server.socket_path
        assert path
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            buffer = bytearray()
            for _ in range(20):  # five at a time: their answers fit in the kernel's buffer
                conn.sendall(post * 5)
                assert all(read_response(conn, buffer)[0] == 201 for _ in range(5))
        readers = []
        try:
            for _ in range(LIST_STREAMS):
                reader = socket.socket(socket.AF_UNIX)
                readers.append(reader)
                reader.connect(path)
                reader.sendall(long_list)
            assert status_of_a_long_list(path) == 503
        finally:
            for reader in readers:
                reader.close()
        wait_until(lambda: status_of_a_long_list(path) == 200, what="the slots to come back")
