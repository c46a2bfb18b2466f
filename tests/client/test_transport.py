"""The httpx2 stack under ``Client``: no leaked socket on a failed connect, and the one private
attribute the workaround needs, checked so that a change in httpx2 or httpcore2 fails here loudly."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpcore2
import httpx2
import pytest

from client import AsyncClient, Client, ConnectError
from client._transport import (
    AsyncDeadlineStream,
    AsyncUnixBackend,
    UnixBackend,
    UnixStream,
    uds_transport,
)


def _resource_warnings(action: Callable[[], None]) -> list[str]:
    """The ResourceWarnings (unclosed sockets) that ``action`` leaves behind, collected at once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        action()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_connects_leak_no_socket(tmp_short: Path, refused_socket: str) -> None:
    missing = str(tmp_short / "missing.sock")

    def fail_many() -> None:
        with Client(missing) as gone, Client(refused_socket) as refused:
            for client in (gone, refused) * 25:
                with pytest.raises(ConnectError):
                    client.health()

    before = _open_fds()
    assert _resource_warnings(fail_many) == []
    assert _open_fds() <= before


def test_async_failed_connects_leak_no_socket(tmp_short: Path, refused_socket: str) -> None:
    missing = str(tmp_short / "missing.sock")

    async def fail_many() -> None:
        async with AsyncClient(missing) as gone, AsyncClient(refused_socket) as refused:
            for client in (gone, refused) * 25:
                with pytest.raises(ConnectError):
                    await client.health()

    assert _resource_warnings(lambda: asyncio.run(fail_many())) == []


def test_httpcore2_still_leaks_the_socket_of_a_failed_connect(tmp_short: Path) -> None:
    """Why ``UnixBackend`` exists. When this fails, httpcore2 closes the socket itself: drop the
    backend (and the ``_pool`` swap in ``uds_transport``), keeping the deadline some other way."""
    missing = str(tmp_short / "missing.sock")

    def connect_once() -> None:
        with pytest.raises(httpcore2.ConnectError):
            httpcore2.SyncBackend().connect_unix_socket(missing, timeout=1.0)

    leaked = _resource_warnings(connect_once)
    assert leaked, "httpcore2's SyncBackend no longer leaks the socket; client._transport.UnixBackend can go"


def test_httpx2_keeps_its_pools_where_our_transports_replace_them() -> None:
    """``uds_transport`` swaps ``_pool`` in httpx2's transports: fail if httpx2 renames or retypes it."""
    assert type(httpx2.HTTPTransport(uds="/tmp/none.sock", verify=False)._pool) is httpcore2.ConnectionPool
    stock = httpx2.AsyncHTTPTransport(uds="/tmp/none.sock", verify=False)
    assert type(stock._pool) is httpcore2.AsyncConnectionPool
    ours = uds_transport(httpx2.HTTPTransport, "/tmp/none.sock", 10)
    ours_async = uds_transport(httpx2.AsyncHTTPTransport, "/tmp/none.sock", 100)
    assert type(ours) is httpx2.HTTPTransport  # still HTTPTransport(uds=...), only its pool is ours
    assert type(ours._pool) is httpcore2.ConnectionPool
    assert type(ours_async) is httpx2.AsyncHTTPTransport
    assert type(ours_async._pool) is httpcore2.AsyncConnectionPool


@pytest.mark.parametrize("transport", [httpx2.HTTPTransport, httpx2.AsyncHTTPTransport])
def test_httpx2_transports_still_take_no_network_backend(transport: type) -> None:
    """Why ``uds_transport`` swaps the pool. When this fails, httpx2 takes a backend: pass it there."""
    public = set(inspect.signature(transport).parameters)
    assert not {"network_backend", "pool", "backend"} & public, public


def test_client_requests_go_through_the_closing_backend(
    server_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    streams: list[httpcore2.NetworkStream] = []
    original = UnixBackend.connect_unix_socket

    def counting(self: UnixBackend, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        stream = original(self, *args, **kwargs)
        streams.append(stream)
        return stream

    monkeypatch.setattr(UnixBackend, "connect_unix_socket", counting)
    with Client(server_path) as c:
        assert c.health().ok
        assert c.send("through the backend").text == "through the backend"
    assert len(streams) == 1  # one connection, kept alive for the second request
    assert isinstance(streams[0], UnixStream)


def test_async_client_requests_go_through_the_deadline_backend(
    server_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    streams: list[httpcore2.AsyncNetworkStream] = []
    original = AsyncUnixBackend.connect_unix_socket

    async def counting(self: AsyncUnixBackend, *args: Any, **kwargs: Any) -> httpcore2.AsyncNetworkStream:
        stream = await original(self, *args, **kwargs)
        streams.append(stream)
        return stream

    async def scenario() -> None:
        async with AsyncClient(server_path) as c:
            assert (await c.health()).ok
            assert (await c.send("through the async backend")).text == "through the async backend"

    monkeypatch.setattr(AsyncUnixBackend, "connect_unix_socket", counting)
    asyncio.run(scenario())
    assert len(streams) == 1
    assert isinstance(streams[0], AsyncDeadlineStream)
