"""In-process fixtures for the HTTP layer: the app driven through HTTPX2's ASGI transport.

``ASGIClient`` is synchronous (tests stay plain functions) and can pretend the request came over
the Unix socket by putting peer credentials into the scope, as the socket layer does.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.main import create_app
from app.storage.schema import prepare_store
from app.storage.sqlite import build_store
from app.storage.store import Store
from tests.support import short_tmpdir

PEER = {"pid": 4242, "uid": 1000, "gid": 1000}
DEFAULT_DATA_DIR = Settings().data_dir


class _WithPeer:
    """ASGI wrapper adding ``scope["extensions"]["uds.peer"]`` like the socket layer does."""

    def __init__(self, app: ASGIApp, peer: dict[str, int] | None) -> None:
        self.app = app
        self.peer = peer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.peer is not None and scope["type"] == "http":
            scope = dict(scope)
            scope["extensions"] = {**scope.get("extensions", {}), "uds.peer": dict(self.peer)}
        await self.app(scope, receive, send)


class ASGIClient:
    """A synchronous facade over ``httpx2.AsyncClient(transport=ASGITransport(app))``."""

    def __init__(
        self,
        app: FastAPI,
        peer: dict[str, int] | None = None,
        *,
        raise_app_exceptions: bool = True,
        lifespan: bool = False,
    ) -> None:
        """``lifespan``: run the app's startup (which opens a durable store) now, its shutdown on
        :meth:`close`, as the server does; only one client of an app may do so."""
        self.app = app
        self.store: Store | None = None
        self._runner = asyncio.Runner()
        transport = httpx2.ASGITransport(app=_WithPeer(app, peer), raise_app_exceptions=raise_app_exceptions)
        self._client = httpx2.AsyncClient(transport=transport, base_url="http://uds")
        self._lifespan = app.router.lifespan_context(app) if lifespan else None
        if self._lifespan is not None:
            self._runner.run(self._lifespan.__aenter__())

    def request(self, method: str, url: str, **kwargs: Any) -> httpx2.Response:
        return self._runner.run(self._client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx2.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx2.Response:
        return self.request("POST", url, **kwargs)

    def post_stream(
        self, url: str, chunks: Callable[[], AsyncIterator[bytes]], headers: dict[str, str] | None = None
    ) -> httpx2.Response:
        """POST a body produced chunk by chunk (no Content-Length: chunked transfer)."""
        return self._runner.run(self._client.post(url, content=chunks(), headers=headers))

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        if self._lifespan is not None:
            self._runner.run(self._lifespan.__aexit__(None, None, None))
        self._runner.close()


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short directory for this test's sockets (AF_UNIX paths stop at 107 bytes), removed after."""
    directory = short_tmpdir("ua")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def settings() -> Settings:
    return Settings(store="memory")


@pytest.fixture
def make_client() -> Iterator[Callable[..., ASGIClient]]:
    """Build clients for apps with custom settings or peers; all are closed after the test.

    Without settings the app keeps messages in memory. Given settings that leave the store at its
    default (SQLite in /var/lib/uds-example), the app keeps them in SQLite in a temporary data
    directory instead, opened and closed like the server does (the app's lifespan): the API tests
    that pass settings run on the durable store, the others on the memory store.
    """
    made: list[ASGIClient] = []
    directories: list[Path] = []

    def make(
        settings: Settings | None = None,
        peer: dict[str, int] | None = PEER,
        app: FastAPI | None = None,
        raise_app_exceptions: bool = True,
    ) -> ASGIClient:
        lifespan, store = False, None
        if app is None:
            settings = settings or Settings(store="memory")
            if settings.store == "sqlite" and settings.data_dir == DEFAULT_DATA_DIR:
                directories.append(short_tmpdir("ud"))
                settings = replace(settings, data_dir=str(directories[-1]))
                prepare_store(settings)
            store = build_store(settings)
            app = create_app(settings, store=store)
            lifespan = True
        client = ASGIClient(app, peer, raise_app_exceptions=raise_app_exceptions, lifespan=lifespan)
        client.store = store  # the store the fixture built, for tests that look inside it
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def client(make_client: Callable[..., ASGIClient]) -> ASGIClient:
    """A client of a default app, whose requests carry ``PEER`` as their peer credentials."""
    return make_client()


def assert_error(response: httpx2.Response, status: int, error: str | None = None) -> dict[str, Any]:
    """The response is the one JSON error shape with this status (and code); returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) <= {"error", "message", "status", "details"}, body
    assert body["status"] == status
    assert isinstance(body["error"], str)
    assert body["error"]
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "\n" not in body["message"]
    if error is not None:
        assert body["error"] == error, body
    return body
