"""``Client`` and ``AsyncClient``: one typed method per endpoint, on a Unix socket, over httpx2;
requests and answers are shaped once, in ``client._base``, so the two differ only in how they wait."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from functools import partial
from typing import Any, Self

import anyio
import httpx2

from client import _base as shape
from client._base import _T, DEFAULT_MAX_RESPONSE_BYTES, Parser, _Base
from client._events import RECONNECT_FOR, Follow
from client._models import Event, Health, Message, RawResponse, Version, WhoAmI
from client._transport import REQUEST, mapped_error, uds_transport


class Client(_Base):
    """A client of ``$UDS_SOCKET`` (else ``unix:///csi/csi.sock``), shared by threads; ``timeout``
    bounds each whole request, an answer over ``max_response_bytes`` is a :class:`ClientError`;
    ``http_client`` (e.g. FastAPI's ``TestClient``) replaces the pool of ``max_connections``."""

    _http: httpx2.Client

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = 5.0,
        http_client: httpx2.Client | None = None,
        environ: Mapping[str, str] | None = None,
        max_connections: int = 10,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(socket, timeout, environ, max_response_bytes, http_client)
        if http_client is None:
            transport = uds_transport(httpx2.HTTPTransport, self.path, max_connections)
            http_client = httpx2.Client(transport=transport, timeout=timeout, **shape.OWN)
        self._http = http_client
        self._negotiation = threading.Lock()

    def _api(self, path: str) -> str:
        """``path`` under the negotiated API version (pinging the server first, once)."""
        if self._prefix is None:
            with self._negotiation:
                if self._prefix is None:
                    self._prefix = self._call("GET", "/_ping", self._chosen, api=False)
        return self._prefix + path

    def api_version(self) -> int | None:
        """The API version used with the server (asked once); None for one without versions."""
        prefix = self._api("")
        return int(prefix[2:]) if prefix else None

    def _call(
        self, method: str, path: str, parse: Parser[_T], *, api: bool = True, stream: bool = False, **kw: Any
    ) -> _T:
        url = self._api(path) if api else path
        request, budget, token = self._begin(method, url, False, **kw)
        try:
            try:
                response, content = self._read(request, stream)
            except httpx2.TransportError as exc:
                self._retry(exc, budget, request)
                response, content = self._read(request, stream)
        except (httpx2.HTTPError, TimeoutError) as exc:
            raise mapped_error(exc, self.address) from exc
        finally:
            REQUEST.reset(token)
        self._log(request, response.status_code, budget)
        return parse(response, content)

    def _read(self, request: httpx2.Request, stream: bool) -> tuple[httpx2.Response, bytes]:
        response = self._http.send(request, stream=True)
        if stream and response.status_code == 200:
            return response, b""  # the caller reads and closes it
        try:
            count = self._capped(response)
            return response, b"".join([count(chunk) for chunk in response.iter_bytes()])
        finally:
            response.close()

    def send(self, text: str, *, idempotency_key: str | None = None) -> Message:
        """POST /messages; a retry after a dropped connection reuses the same Idempotency-Key."""
        return self._call("POST", "/messages", shape.MESSAGE, **shape.send_body(text, idempotency_key))

    def messages(self, limit: int | None = None) -> list[Message]:
        """GET /messages: the most recent ``limit`` messages, oldest first."""
        return self._call("GET", shape.messages_path(limit), shape.MESSAGES)

    def message(self, id: int) -> Message:
        """GET /messages/{id}."""
        return self._call("GET", f"/messages/{int(id)}", shape.MESSAGE)

    def events(self, since: int | None = None, *, reconnect_for: float = RECONNECT_FOR) -> Iterator[Event]:
        """GET /events: each message as it is stored (those after id ``since`` first), for ever, resumed
        from the last id after a drop or a restart; gives up after ``reconnect_for`` s without one."""
        follow = Follow(self.address, since, self.timeout, self.max_response_bytes, reconnect_for)
        return follow.follow(partial(self._call, "GET", "/events", self._stream, stream=True))

    def health(self) -> Health:
        """GET /healthz."""
        return self._call("GET", "/healthz", shape.HEALTH, api=False)

    def ready(self) -> Health:
        """GET /readyz; ``ok`` is False (no exception) while the server drains."""
        return self._call("GET", "/readyz", shape.ready, api=False)

    def version(self) -> Version:
        """GET /version."""
        return self._call("GET", "/version", shape.VERSION)

    def openapi(self) -> dict[str, Any]:
        """GET /openapi.json, decoded."""
        return self._call("GET", "/openapi.json", shape.OPENAPI, api=False)

    def whoami(self) -> WhoAmI:
        """GET /whoami: who the server sees calling and the scopes it holds (needs no scope)."""
        return self._call("GET", "/whoami", shape.WHOAMI)

    def get(self, path: str) -> RawResponse:
        """A raw GET of ``path``; error statuses are returned, not raised."""
        return self._call("GET", shape.raw_path(path), shape.raw, api=False)

    def close(self) -> None:
        """Close pooled connections (a caller's ``http_client`` stays open: it is theirs)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio (or trio) twin of :class:`Client`, each method as its namesake there; share
    one instance between tasks. Tasks beyond ``max_connections`` queue for a connection."""

    _http: httpx2.AsyncClient

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = 5.0,
        http_client: httpx2.AsyncClient | None = None,
        environ: Mapping[str, str] | None = None,
        max_connections: int = 100,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(socket, timeout, environ, max_response_bytes, http_client)
        if http_client is None:
            transport = uds_transport(httpx2.AsyncHTTPTransport, self.path, max_connections)
            http_client = httpx2.AsyncClient(transport=transport, timeout=timeout, **shape.OWN)
        self._http = http_client
        self._negotiation = anyio.Lock()  # bound to the event loop on first use

    async def _api(self, path: str) -> str:
        if self._prefix is None:
            async with self._negotiation:
                if self._prefix is None:
                    self._prefix = await self._call("GET", "/_ping", self._chosen, api=False)
        return self._prefix + path

    async def api_version(self) -> int | None:
        prefix = await self._api("")
        return int(prefix[2:]) if prefix else None

    async def _call(
        self, method: str, path: str, parse: Parser[_T], *, api: bool = True, stream: bool = False, **kw: Any
    ) -> _T:
        url = await self._api(path) if api else path
        request, budget, token = self._begin(method, url, True, **kw)
        try:
            # Our own backend bounds each step by the budget; another transport gets a cancel scope.
            with contextlib.nullcontext() if self._owns_http else anyio.fail_after(self.timeout):
                try:
                    response, content = await self._read(request, stream)
                except httpx2.TransportError as exc:
                    self._retry(exc, budget, request)
                    response, content = await self._read(request, stream)
        except (httpx2.HTTPError, TimeoutError) as exc:
            raise mapped_error(exc, self.address) from exc
        finally:
            REQUEST.reset(token)
        self._log(request, response.status_code, budget)
        return parse(response, content)

    async def _read(self, request: httpx2.Request, stream: bool) -> tuple[httpx2.Response, bytes]:
        response = await self._http.send(request, stream=True)
        if stream and response.status_code == 200:
            return response, b""  # the caller reads and closes it
        try:
            count = self._capped(response)
            return response, b"".join([count(chunk) async for chunk in response.aiter_bytes()])
        finally:
            await response.aclose()

    async def send(self, text: str, *, idempotency_key: str | None = None) -> Message:
        return await self._call("POST", "/messages", shape.MESSAGE, **shape.send_body(text, idempotency_key))

    async def messages(self, limit: int | None = None) -> list[Message]:
        return await self._call("GET", shape.messages_path(limit), shape.MESSAGES)

    async def message(self, id: int) -> Message:
        return await self._call("GET", f"/messages/{int(id)}", shape.MESSAGE)

    def events(
        self, since: int | None = None, *, reconnect_for: float = RECONNECT_FOR
    ) -> AsyncIterator[Event]:
        follow = Follow(self.address, since, self.timeout, self.max_response_bytes, reconnect_for)
        return follow.follow_async(partial(self._call, "GET", "/events", self._stream, stream=True))

    async def health(self) -> Health:
        return await self._call("GET", "/healthz", shape.HEALTH, api=False)

    async def ready(self) -> Health:
        return await self._call("GET", "/readyz", shape.ready, api=False)

    async def version(self) -> Version:
        return await self._call("GET", "/version", shape.VERSION)

    async def openapi(self) -> dict[str, Any]:
        return await self._call("GET", "/openapi.json", shape.OPENAPI, api=False)

    async def whoami(self) -> WhoAmI:
        return await self._call("GET", "/whoami", shape.WHOAMI)

    async def get(self, path: str) -> RawResponse:
        return await self._call("GET", shape.raw_path(path), shape.raw, api=False)

    async def aclose(self) -> None:
        """Close pooled connections (only those of an httpx2 client this object built)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
