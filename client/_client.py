"""``Client`` and ``AsyncClient``: one typed method per endpoint, over httpx on a Unix socket.

Both take an existing ``httpx.Client`` / ``httpx.AsyncClient`` (a FastAPI ``TestClient`` works),
or build a pooled one on the socket. Requests and responses are shaped by the shared helpers below;
the two classes only differ in how they send.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from client._address import DEFAULT_ADDRESS, ENV_VAR, AddressError, parse_address, to_url
from client._errors import APIError, ClientError, UsageError
from client._models import Health, Message, RawResponse, Version
from client._transport import (
    BASE_URL,
    ReuseTracker,
    UnixAsyncTransport,
    UnixTransport,
    is_stale_connection_error,
    map_errors,
)

__all__ = ["AsyncClient", "Client", "resolve_socket"]

log = logging.getLogger("client")

_JSON_HEADERS = {"content-type": "application/json"}


def resolve_socket(socket: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The socket path: ``socket`` if given, else ``$UDS_SOCKET``, else ``unix:///csi/csi.sock``."""
    env = os.environ if environ is None else environ
    value = socket if socket is not None else (env.get(ENV_VAR) or DEFAULT_ADDRESS)
    try:
        return parse_address(value)
    except AddressError as exc:
        raise UsageError(str(exc)) from exc


def _decode(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


def _check(response: httpx.Response, *, ok: tuple[int, ...] = ()) -> Any:
    """Decode the JSON body, or raise :class:`APIError` from the server's error shape."""
    body = _decode(response)
    status = response.status_code
    if status < 400 or status in ok:
        if body is None and status != 204:
            raise ClientError(f"the server answered {status} with a body that is not JSON")
        return body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        raise APIError(status, body["message"], error=body.get("error"), body=body)
    reason = response.reason_phrase or "error"
    raise APIError(status, f"{reason} (HTTP {status})", body=body if body is not None else response.text)


def _raw(response: httpx.Response) -> RawResponse:
    return RawResponse(status=response.status_code, headers=dict(response.headers), content=response.content)


def _message_list(body: Any) -> list[Message]:
    return [Message.from_json(item) for item in body["messages"]]


def _send_request(text: str, idempotency_key: str | None) -> tuple[bytes, dict[str, str]]:
    key = idempotency_key if idempotency_key is not None else uuid.uuid4().hex
    return orjson.dumps({"text": text}), {**_JSON_HEADERS, "idempotency-key": key}


def _limit_params(limit: int | None) -> dict[str, int] | None:
    if limit is None:
        return None
    if limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")
    return {"limit": limit}


class _Base:
    """What both clients share: the socket, request building, logging."""

    _http: httpx.Client | httpx.AsyncClient

    def __init__(self, socket: str | None, timeout: float, environ: Mapping[str, str] | None) -> None:
        self.path = resolve_socket(socket, environ)
        self.address = to_url(self.path)
        self.timeout = timeout

    def _build(self, method: str, url: str, content: bytes | None, headers: dict[str, str] | None,
               params: dict[str, int] | None, tracker: ReuseTracker) -> httpx.Request:
        return self._http.build_request(
            method, url, content=content, headers=headers, params=params, extensions={"trace": tracker}
        )

    def _log(self, method: str, url: str, response: httpx.Response, started: float, retried: bool) -> None:
        if log.isEnabledFor(logging.DEBUG):
            elapsed = (time.perf_counter() - started) * 1000
            note = " (retried on a fresh connection)" if retried else ""
            log.debug("%s %s %s -> %d in %.1f ms%s", self.address, method, url,
                      response.status_code, elapsed, note)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


class Client(_Base):
    """A synchronous client. ``Client()`` talks to ``$UDS_SOCKET`` or ``unix:///csi/csi.sock``."""

    _http: httpx.Client

    def __init__(self, socket: str | None = None, *, timeout: float = 5.0,
                 http_client: httpx.Client | None = None, environ: Mapping[str, str] | None = None,
                 max_connections: int = 10) -> None:
        super().__init__(socket, timeout, environ)
        self._owns_http = http_client is None
        if http_client is None:
            http_client = httpx.Client(
                transport=UnixTransport(self.path, max_connections=max_connections),
                base_url=BASE_URL, timeout=timeout, trust_env=False,
            )
        self._http = http_client

    def _request(self, method: str, url: str, *, content: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 params: dict[str, int] | None = None) -> httpx.Response:
        started = time.perf_counter()
        tracker = ReuseTracker()
        retried = False
        with map_errors(self.path):
            try:
                response = self._http.send(self._build(method, url, content, headers, params, tracker))
            except Exception as exc:
                if not (is_stale_connection_error(exc) and tracker.reused):
                    raise
                log.debug("%s %s %s: reused connection was closed by the server (%s); retrying once",
                          self.address, method, url, exc)
                retried = True
                tracker = ReuseTracker()
                response = self._http.send(self._build(method, url, content, headers, params, tracker))
        self._log(method, url, response, started, retried)
        return response

    def send(self, text: str, *, idempotency_key: str | None = None) -> Message:
        """POST /messages; a retry after a dropped connection reuses the same Idempotency-Key."""
        content, headers = _send_request(text, idempotency_key)
        return Message.from_json(_check(self._request("POST", "/messages", content=content, headers=headers)))

    def messages(self, limit: int | None = None) -> list[Message]:
        """GET /messages: the most recent ``limit`` messages, oldest first."""
        return _message_list(_check(self._request("GET", "/messages", params=_limit_params(limit))))

    def message(self, id: int) -> Message:
        """GET /messages/{id}."""
        return Message.from_json(_check(self._request("GET", f"/messages/{int(id)}")))

    def health(self) -> Health:
        """GET /healthz."""
        return Health.from_json(_check(self._request("GET", "/healthz")), 200)

    def ready(self) -> Health:
        """GET /readyz; ``ok`` is False (no exception) while the server drains."""
        response = self._request("GET", "/readyz")
        return Health.from_json(_check(response, ok=(503,)), response.status_code)

    def version(self) -> Version:
        """GET /version."""
        return Version.from_json(_check(self._request("GET", "/version")))

    def openapi(self) -> dict[str, Any]:
        """GET /openapi.json, decoded."""
        spec: dict[str, Any] = _check(self._request("GET", "/openapi.json"))
        return spec

    def get(self, path: str) -> RawResponse:
        """A raw GET of ``path``; error statuses are returned, not raised."""
        if not path.startswith("/"):
            raise UsageError(f"path must start with '/', not {path!r}")
        return _raw(self._request("GET", path))

    def close(self) -> None:
        """Close pooled connections (only those of an httpx client this object built)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`; share one instance between tasks."""

    _http: httpx.AsyncClient

    def __init__(self, socket: str | None = None, *, timeout: float = 5.0,
                 http_client: httpx.AsyncClient | None = None, environ: Mapping[str, str] | None = None,
                 max_connections: int = 100) -> None:
        super().__init__(socket, timeout, environ)
        self._owns_http = http_client is None
        if http_client is None:
            http_client = httpx.AsyncClient(
                transport=UnixAsyncTransport(self.path, max_connections=max_connections),
                base_url=BASE_URL, timeout=timeout, trust_env=False,
            )
        self._http = http_client

    async def _request(self, method: str, url: str, *, content: bytes | None = None,
                       headers: dict[str, str] | None = None,
                       params: dict[str, int] | None = None) -> httpx.Response:
        started = time.perf_counter()
        tracker = ReuseTracker()
        retried = False
        with map_errors(self.path):
            try:
                response = await self._http.send(self._build(method, url, content, headers, params, tracker))
            except Exception as exc:
                if not (is_stale_connection_error(exc) and tracker.reused):
                    raise
                log.debug("%s %s %s: reused connection was closed by the server (%s); retrying once",
                          self.address, method, url, exc)
                retried = True
                tracker = ReuseTracker()
                response = await self._http.send(self._build(method, url, content, headers, params, tracker))
        self._log(method, url, response, started, retried)
        return response

    async def send(self, text: str, *, idempotency_key: str | None = None) -> Message:
        """POST /messages; a retry after a dropped connection reuses the same Idempotency-Key."""
        content, headers = _send_request(text, idempotency_key)
        response = await self._request("POST", "/messages", content=content, headers=headers)
        return Message.from_json(_check(response))

    async def messages(self, limit: int | None = None) -> list[Message]:
        """GET /messages: the most recent ``limit`` messages, oldest first."""
        return _message_list(_check(await self._request("GET", "/messages", params=_limit_params(limit))))

    async def message(self, id: int) -> Message:
        """GET /messages/{id}."""
        return Message.from_json(_check(await self._request("GET", f"/messages/{int(id)}")))

    async def health(self) -> Health:
        """GET /healthz."""
        return Health.from_json(_check(await self._request("GET", "/healthz")), 200)

    async def ready(self) -> Health:
        """GET /readyz; ``ok`` is False (no exception) while the server drains."""
        response = await self._request("GET", "/readyz")
        return Health.from_json(_check(response, ok=(503,)), response.status_code)

    async def version(self) -> Version:
        """GET /version."""
        return Version.from_json(_check(await self._request("GET", "/version")))

    async def openapi(self) -> dict[str, Any]:
        """GET /openapi.json, decoded."""
        spec: dict[str, Any] = _check(await self._request("GET", "/openapi.json"))
        return spec

    async def get(self, path: str) -> RawResponse:
        """A raw GET of ``path``; error statuses are returned, not raised."""
        if not path.startswith("/"):
            raise UsageError(f"path must start with '/', not {path!r}")
        return _raw(await self._request("GET", path))

    async def aclose(self) -> None:
        """Close pooled connections (only those of an httpx client this object built)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
