"""``AsyncClient``: the same API over asyncio, in-process (ASGI) and on a real socket."""

from __future__ import annotations

import asyncio
import os

import httpx2
import pytest

from app.config import Settings
from app.main import create_app
from client import APIError, AsyncClient, ConnectError, Health


def _in_process() -> AsyncClient:
    http = httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(Settings(store="memory"))), base_url="http://testserver"
    )
    return AsyncClient(http_client=http)


def test_endpoints_in_process() -> None:
    async def scenario() -> None:
        async with _in_process() as client:
            sent = await client.send("Hello from client")
            assert sent.reply == "Hello from server via UDS"
            assert sent.peer is None
            again = await client.send("Hello from client", idempotency_key="k")
            same = await client.send("Hello from client", idempotency_key="k")
            assert same.id == again.id
            assert [m.id for m in await client.messages()] == [sent.id, again.id]
            assert [m.id for m in await client.messages(limit=1)] == [again.id]
            assert await client.message(sent.id) == sent
            assert await client.health() == Health("ok", True)
            assert (await client.ready()).ok
            assert (await client.version()).app == "1.0.0"
            assert "/v1/messages" in (await client.openapi())["paths"]
            assert await client.api_version() == 1
            assert (await client.get("/nope")).status == 404
            with pytest.raises(APIError) as info:
                await client.message(999_999)
            assert info.value.status == 404
            await client._http.aclose()

    asyncio.run(scenario())


def test_fifty_concurrent_tasks_on_a_real_socket(server_path: str) -> None:
    async def scenario() -> list[int]:
        async with AsyncClient(server_path) as client:
            results = await asyncio.gather(*(client.send(f"task {i}") for i in range(50)))
            assert all(m.peer is not None and m.peer.pid == os.getpid() for m in results)
            assert sorted(m.text for m in results) == sorted(f"task {i}" for i in range(50))
            stored = await client.messages(limit=50)
            assert {m.id for m in stored} == {m.id for m in results}
            return [m.id for m in results]

    ids = asyncio.run(scenario())
    assert len(set(ids)) == 50


def test_missing_socket_is_a_connect_error(tmp_short: object) -> None:
    path = f"{tmp_short}/missing.sock"

    async def scenario() -> None:
        async with AsyncClient(path) as client:
            await client.health()

    with pytest.raises(ConnectError) as info:
        asyncio.run(scenario())
    assert info.value.reason == "no such file"
    assert isinstance(info.value.__cause__, httpx2.ConnectError)


def test_silent_server_times_out(silent_socket: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(silent_socket, timeout=0.3) as client:
            await client.health()

    with pytest.raises(ConnectError) as info:
        asyncio.run(scenario())
    assert info.value.reason == "timed out"


def test_a_client_made_outside_any_loop_negotiates_inside_one(server_path: str) -> None:
    client = AsyncClient(server_path)  # its negotiation lock binds to the loop of its first use

    async def scenario() -> None:
        async with client:
            first, second = await asyncio.gather(client.api_version(), client.api_version())
            assert first == second == 1
            assert (await client.send("from a task")).text == "from a task"

    asyncio.run(scenario())
