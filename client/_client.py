"""``Client`` and ``AsyncClient``: one typed method per endpoint, on a Unix socket, over httpx2.

Both send through httpx2's Unix-socket transports (``client._transport``), or through an
``httpx2.Client`` / ``httpx2.AsyncClient`` the caller passes (FastAPI's ``TestClient`` works).
Requests and answers are shaped once, in ``_Base`` and the helpers below; the two classes differ
only in how they wait. API requests go under ``/v{N}``, N negotiated with one ``GET /_ping``
before the first of them (docs/internals.md, "Client"); a new route's method builds its path
with ``self._call(..., "/noun", ...)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import httpx2
import orjson

from client._errors import APIError, ClientError, UsageError
from client._events import READ_IDLE_TIMEOUT, RECONNECT_FOR, Event, follow, follow_async
from client._models import Health, Message, RawResponse, Version, WhoAmI
from client._transport import (
    BASE_URL,
    REQUEST,
    Budget,
    ReuseTracker,
    async_transport,
    is_stale_error,
    mapped_error,
    sync_transport,
)
from client.address import resolve_socket, to_url

__all__ = ["API_VERSIONS", "DEFAULT_MAX_RESPONSE_BYTES", "AsyncClient", "Client"]

log = logging.getLogger("client")

# The largest legitimate answer, a full history of long messages, is about 25 MB of JSON.
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024

# No compression on a local socket, so what counts against the cap is what arrives. Set once on
# an httpx2 client this module builds, per request on a caller's.
_HEADERS = {"user-agent": "uds-client", "accept": "application/json", "accept-encoding": "identity"}
_T = TypeVar("_T")

API_VERSIONS = (1, 1)
"""The oldest and the newest API version this client speaks."""


class _Answer:
    """A response whose body has been read (within the cap)."""

    __slots__ = ("content", "response", "status")

    def __init__(self, response: httpx2.Response, content: bytes) -> None:
        self.response = response
        self.content = content
        self.status = response.status_code


_NOT_JSON: Any = object()


def _snippet(content: bytes) -> str:
    text = content[:200].decode("utf-8", "replace")
    return text + ("..." if len(content) > 200 else "")


def _check(answer: _Answer, *, ok: tuple[int, ...] = ()) -> Any:
    """Decode the JSON body, or raise :class:`APIError` from the server's error shape."""
    try:
        body = orjson.loads(answer.content)
    except orjson.JSONDecodeError:
        body = _NOT_JSON
    status = answer.status
    if status < 400 or status in ok:
        if body is not _NOT_JSON:
            return body
        if status == 204:
            return None
        raise ClientError(
            f"the server answered {status} with a body that is not JSON: {_snippet(answer.content)}"
        )
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        raise APIError(status, body["message"], error=body.get("error"), body=body)
    reason = answer.response.reason_phrase or "error"
    text = answer.content.decode("utf-8", "replace")
    raise APIError(status, f"{reason} (HTTP {status})", body=text if body is _NOT_JSON else body)


def _parser(build: Callable[[Any], _T], what: str, ok: tuple[int, ...] = ()) -> Callable[[_Answer], _T]:
    """An answer's parser: :func:`_check`, then ``build``; a wrong shape is one :class:`ClientError`."""

    def parse(answer: _Answer) -> _T:
        body = _check(answer, ok=ok)
        try:
            return build(body)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ClientError(f"the server's answer is not {what}: {_snippet(orjson.dumps(body))}") from exc

    return parse


def _spec(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TypeError("not a JSON object")
    return body


_MESSAGE = _parser(Message.from_json, "a message")
_MESSAGES = _parser(lambda data: [Message.from_json(item) for item in data["messages"]], "a list of messages")
_HEALTH = _parser(lambda data: Health.from_json(data, 200), "a health status")
_READY_OK = (503,)  # a draining server: ok is False, no exception
_VERSION = _parser(Version.from_json, "a list of versions")
_OPENAPI = _parser(_spec, "an OpenAPI document")
_WHOAMI = _parser(WhoAmI.from_json, "an identity")


def _ready(answer: _Answer) -> Health:
    return _parser(lambda data: Health.from_json(data, answer.status), "a health status", _READY_OK)(answer)


def _raw(answer: _Answer) -> RawResponse:
    headers = {name.lower(): value for name, value in answer.response.headers.items()}
    return RawResponse(status=answer.status, headers=headers, content=answer.content)


def _send_body(text: str, idempotency_key: str | None) -> dict[str, Any]:
    # 128 random bits, as uuid4().hex without importing uuid (a one-shot command's start-up).
    key = idempotency_key if idempotency_key is not None else os.urandom(16).hex()
    headers = {"content-type": "application/json", "idempotency-key": key}
    return {"content": orjson.dumps({"text": text}), "headers": headers}


def _messages_path(limit: int | None) -> str:
    if limit is None:
        return "/messages"
    if limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")
    return f"/messages?limit={int(limit)}"


def _raw_path(path: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"path must start with '/', not {path!r}")
    return path


def _versions_text(low: int, high: int) -> str:
    return f"API version {low}" if low == high else f"API versions {low} to {high}"


class _Base:
    """What both clients share: the socket, limits, the response cap, logging, the API version."""

    API_VERSIONS: tuple[int, int] = API_VERSIONS
    """(oldest, newest) API version spoken; a subclass may speak another range."""

    _http: httpx2.Client | httpx2.AsyncClient
    _prefix: str | None = None
    """``/v{N}`` once negotiated, ``""`` for a server without versions; None before the ping."""

    def __init__(
        self,
        socket: str | None,
        timeout: float,
        environ: Mapping[str, str] | None,
        max_response_bytes: int,
        http_client: Any,
        own: Callable[..., Any],
    ) -> None:
        if not timeout > 0:
            raise UsageError(f"timeout must be greater than 0, not {timeout!r}")
        if max_response_bytes < 1:
            raise UsageError(f"max_response_bytes must be at least 1, not {max_response_bytes!r}")
        self.path = resolve_socket(socket, environ)
        self.address = to_url(self.path)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._owns_http = http_client is None
        if http_client is None:
            http_client = own(base_url=BASE_URL, timeout=timeout, trust_env=False, headers=_HEADERS)
        self._http = http_client

    def _chosen(self, answer: _Answer) -> str:
        """The path prefix for the server's ``/_ping`` answer (or an error when none will do)."""
        if answer.status == 404:  # a server from before API versions
            return ""
        if answer.status >= 400:
            _check(answer)  # raises APIError with the server's message
        headers = answer.response.headers
        current, oldest = headers.get("api-version"), headers.get("min-api-version")
        if current is None:
            return ""
        try:
            high = int(current)
            low = int(oldest) if oldest is not None else high
        except ValueError:
            shown = _snippet(f"{current!r}, Min-Api-Version {oldest!r}".encode())
            raise ClientError(
                f"{self.address} answered /_ping with Api-Version {shown}, not whole numbers; "
                "is it a uds-example server?"
            ) from None
        mine_low, mine_high = self.API_VERSIONS
        version = min(high, mine_high)
        if version < max(low, mine_low):
            fix = "upgrade the server" if high < mine_low else "upgrade the client"
            raise ClientError(
                f"{self.address} serves {_versions_text(low, high)}; this client speaks "
                f"{_versions_text(mine_low, mine_high)}: no version in common, {fix}"
            )
        return f"/v{version}"

    def _build(
        self,
        method: str,
        url: str,
        content: bytes | None,
        headers: dict[str, str] | None,
        timeout: httpx2.Timeout | None,
        tracker: Callable[..., Any] | None,
    ) -> httpx2.Request:
        if not self._owns_http:  # a caller's client lacks our default headers
            headers = _HEADERS if headers is None else {**_HEADERS, **headers}
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if tracker is not None:
            options["extensions"] = {"trace": tracker}
        return self._http.build_request(method, url, content=content, headers=headers, **options)

    def _retrying(self, exc: httpx2.TransportError, opened: bool, method: str, url: str) -> bool:
        """Whether to send once more: a reused connection the server had closed."""
        if not is_stale_error(exc) or opened:
            return False
        log.debug(
            "%s %s %s: reused connection was closed by the server (%s); retrying once",
            self.address,
            method,
            url,
            exc,
        )
        return True

    def _too_large(self, method: str, url: str) -> ClientError:
        return ClientError(
            f"{self.address} answered {method} {url} with more than "
            f"{self.max_response_bytes} bytes; refusing to read it (max_response_bytes)"
        )

    def _declared_fits(self, response: httpx2.Response, method: str, url: str) -> bool:
        """True when the answer's Content-Length is within the cap (h11 then reads no more than it)."""
        declared = response.headers.get("content-length")
        if declared is None or not declared.isdigit():
            return False
        if int(declared) > self.max_response_bytes:
            raise self._too_large(method, url)
        return True

    def _events_options(self, last_id: int | None) -> dict[str, Any]:
        """``GET /events`` after ``last_id``: its reads may idle up to :data:`READ_IDLE_TIMEOUT`."""
        headers = {"accept": "text/event-stream", "cache-control": "no-store"}
        if last_id is not None:
            headers["last-event-id"] = str(last_id)
        timeout = httpx2.Timeout(self.timeout, read=max(READ_IDLE_TIMEOUT, self.timeout))
        return {"headers": headers, "timeouts": timeout, "stream": True}

    def _stream(self, answer: _Answer) -> httpx2.Response:
        """The open stream of a 200 to ``GET /events``, else the error (the server's, if it sent one)."""
        if answer.status == 200:
            return answer.response
        _check(answer)
        raise ClientError(f"{self.address} answered GET /events with {answer.status}, not a stream")

    def _log(self, method: str, url: str, status: int, started: float, retried: bool) -> None:
        if log.isEnabledFor(logging.DEBUG):
            elapsed = (time.monotonic() - started) * 1000
            note = " (retried on a fresh connection)" if retried else ""
            log.debug("%s %s %s -> %d in %.1f ms%s", self.address, method, url, status, elapsed, note)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


class Client(_Base):
    """A synchronous client. ``Client()`` talks to ``$UDS_SOCKET`` or ``unix:///csi/csi.sock``.

    ``http_client`` (an ``httpx2.Client``, e.g. FastAPI's ``TestClient``) replaces the one built
    for the socket. ``timeout`` bounds each whole request: connect, write and read (with a
    caller's ``http_client``, its own per-step timeouts apply instead). A response larger than
    ``max_response_bytes`` raises :class:`ClientError` without being read. Up to
    ``max_connections`` connections are kept; one instance may be shared by threads.
    """

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
        def own(**options: Any) -> httpx2.Client:
            return httpx2.Client(
                transport=sync_transport(self.path, max_connections=max_connections), **options
            )

        super().__init__(socket, timeout, environ, max_response_bytes, http_client, own)
        self._negotiation = threading.Lock()

    def _api(self, path: str) -> str:
        """``path`` under the negotiated API version (pinging the server first, once)."""
        prefix = self._prefix
        if prefix is None:
            with self._negotiation:
                prefix = self._prefix
                if prefix is None:
                    prefix = self._prefix = self._chosen(self._request("GET", "/_ping"))
        return prefix + path

    def api_version(self) -> int | None:
        """The API version used with the server (asking it first if not done yet); None for a
        server without API versions, which gets the unversioned paths."""
        prefix = self._api("")
        return int(prefix[2:]) if prefix else None

    def _request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeouts: httpx2.Timeout | None = None,
        stream: bool = False,
    ) -> _Answer:
        started = time.monotonic()
        budget = Budget(started + self.timeout)
        token = REQUEST.set(budget)
        # Our own backend marks the budget when it connects; another transport needs a trace.
        tracker = None if self._owns_http else ReuseTracker()
        retried = False
        try:
            request = self._build(method, url, content, headers, timeouts, tracker)
            try:
                answer = self._read(request, method, url, stream)
            except httpx2.TransportError as exc:
                opened = budget.opened if tracker is None else tracker.opened
                if not self._retrying(exc, opened, method, url):
                    raise
                retried = True
                answer = self._read(request, method, url, stream)
        except (httpx2.HTTPError, TimeoutError) as exc:
            raise mapped_error(exc, self.address) from exc
        finally:
            REQUEST.reset(token)
        self._log(method, url, answer.status, started, retried)
        return answer

    def _read(self, request: httpx2.Request, method: str, url: str, stream: bool) -> _Answer:
        response = self._http.send(request, stream=True)
        if stream and response.status_code == 200:
            return _Answer(response, b"")  # the caller reads and closes it
        try:
            if self._declared_fits(response, method, url):
                return _Answer(response, response.read())
            return _Answer(response, self._body(response.iter_bytes(), method, url))
        finally:
            response.close()

    def _body(self, chunks: Iterator[bytes], method: str, url: str) -> bytes:
        parts: list[bytes] = []
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > self.max_response_bytes:
                raise self._too_large(method, url)
            parts.append(chunk)
        return b"".join(parts)

    def _call(
        self, method: str, path: str, parse: Callable[[_Answer], _T], *, api: bool = True, **body: Any
    ) -> _T:
        return parse(self._request(method, self._api(path) if api else path, **body))

    def send(self, text: str, *, idempotency_key: str | None = None) -> Message:
        """POST /messages; a retry after a dropped connection reuses the same Idempotency-Key."""
        return self._call("POST", "/messages", _MESSAGE, **_send_body(text, idempotency_key))

    def messages(self, limit: int | None = None) -> list[Message]:
        """GET /messages: the most recent ``limit`` messages, oldest first."""
        return self._call("GET", _messages_path(limit), _MESSAGES)

    def message(self, id: int) -> Message:
        """GET /messages/{id}."""
        return self._call("GET", f"/messages/{int(id)}", _MESSAGE)

    def events(self, since: int | None = None, *, reconnect_for: float = RECONNECT_FOR) -> Iterator[Event]:
        """GET /events: each message as it is stored (those after id ``since`` first), for ever.

        A dropped stream or a server restart is resumed from the last id (nothing missed or
        repeated); gives up after ``reconnect_for`` seconds without a stream.
        """
        return follow(self._open_events, self.address, since, self.max_response_bytes, reconnect_for)

    def _open_events(self, last_id: int | None) -> httpx2.Response:
        """``GET /events`` after ``last_id``, its head read within ``timeout``."""
        return self._stream(self._request("GET", self._api("/events"), **self._events_options(last_id)))

    def health(self) -> Health:
        """GET /healthz."""
        return self._call("GET", "/healthz", _HEALTH, api=False)

    def ready(self) -> Health:
        """GET /readyz; ``ok`` is False (no exception) while the server drains."""
        return self._call("GET", "/readyz", _ready, api=False)

    def version(self) -> Version:
        """GET /version."""
        return self._call("GET", "/version", _VERSION)

    def openapi(self) -> dict[str, Any]:
        """GET /openapi.json, decoded."""
        return self._call("GET", "/openapi.json", _OPENAPI, api=False)

    def whoami(self) -> WhoAmI:
        """GET /whoami: who the server sees calling and the scopes it holds (needs no scope)."""
        return self._call("GET", "/whoami", _WHOAMI)

    def get(self, path: str) -> RawResponse:
        """A raw GET of ``path``; error statuses are returned, not raised."""
        return self._call("GET", _raw_path(path), _raw, api=False)

    def close(self) -> None:
        """Close pooled connections (a caller's ``http_client`` stays open: it is theirs)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio (or trio) twin of :class:`Client`; share one instance between tasks.

    Tasks beyond ``max_connections`` queue for a connection. ``timeout`` bounds each whole request.
    """

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
        def own(**options: Any) -> httpx2.AsyncClient:
            transport = async_transport(self.path, max_connections=max_connections)
            return httpx2.AsyncClient(transport=transport, **options)

        super().__init__(socket, timeout, environ, max_response_bytes, http_client, own)
        self._negotiation: anyio.Lock | None = None

    async def _api(self, path: str) -> str:
        """``path`` under the negotiated API version (pinging the server first, once: concurrent
        first calls wait for that one ping)."""
        prefix = self._prefix
        if prefix is None:
            if self._negotiation is None:
                self._negotiation = anyio.Lock()
            async with self._negotiation:
                prefix = self._prefix
                if prefix is None:
                    prefix = self._prefix = self._chosen(await self._request("GET", "/_ping"))
        return prefix + path

    async def api_version(self) -> int | None:
        """As :meth:`Client.api_version`."""
        prefix = await self._api("")
        return int(prefix[2:]) if prefix else None

    async def _request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeouts: httpx2.Timeout | None = None,
        stream: bool = False,
    ) -> _Answer:
        started = time.monotonic()
        budget = Budget(started + self.timeout)
        token = REQUEST.set(budget)
        # Our own backend bounds each step by the budget and marks it when it connects; another
        # transport gets a cancel scope around the request, and a trace for the retry.
        tracker = None if self._owns_http else ReuseTracker()
        retried = False
        try:
            atrace = None if tracker is None else tracker.atrace
            request = self._build(method, url, content, headers, timeouts, atrace)
            with contextlib.nullcontext() if tracker is None else anyio.fail_after(self.timeout):
                try:
                    answer = await self._read(request, method, url, stream)
                except httpx2.TransportError as exc:
                    opened = budget.opened if tracker is None else tracker.opened
                    if not self._retrying(exc, opened, method, url):
                        raise
                    retried = True
                    answer = await self._read(request, method, url, stream)
        except (httpx2.HTTPError, TimeoutError) as exc:
            raise mapped_error(exc, self.address) from exc
        finally:
            REQUEST.reset(token)
        self._log(method, url, answer.status, started, retried)
        return answer

    async def _read(self, request: httpx2.Request, method: str, url: str, stream: bool) -> _Answer:
        response = await self._http.send(request, stream=True)
        if stream and response.status_code == 200:
            return _Answer(response, b"")  # the caller reads and closes it
        try:
            if self._declared_fits(response, method, url):
                return _Answer(response, await response.aread())
            return _Answer(response, await self._body(response.aiter_bytes(), method, url))
        finally:
            await response.aclose()

    async def _body(self, chunks: AsyncIterator[bytes], method: str, url: str) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > self.max_response_bytes:
                raise self._too_large(method, url)
            parts.append(chunk)
        return b"".join(parts)

    async def _call(
        self, method: str, path: str, parse: Callable[[_Answer], _T], *, api: bool = True, **body: Any
    ) -> _T:
        return parse(await self._request(method, await self._api(path) if api else path, **body))

    async def send(self, text: str, *, idempotency_key: str | None = None) -> Message:
        """POST /messages; a retry after a dropped connection reuses the same Idempotency-Key."""
        return await self._call("POST", "/messages", _MESSAGE, **_send_body(text, idempotency_key))

    async def messages(self, limit: int | None = None) -> list[Message]:
        """GET /messages: the most recent ``limit`` messages, oldest first."""
        return await self._call("GET", _messages_path(limit), _MESSAGES)

    async def message(self, id: int) -> Message:
        """GET /messages/{id}."""
        return await self._call("GET", f"/messages/{int(id)}", _MESSAGE)

    def events(
        self, since: int | None = None, *, reconnect_for: float = RECONNECT_FOR
    ) -> AsyncIterator[Event]:
        """As :meth:`Client.events`."""
        return follow_async(self._open_events, self.address, since, self.max_response_bytes, reconnect_for)

    async def _open_events(self, last_id: int | None) -> httpx2.Response:
        url = await self._api("/events")
        return self._stream(await self._request("GET", url, **self._events_options(last_id)))

    async def health(self) -> Health:
        """GET /healthz."""
        return await self._call("GET", "/healthz", _HEALTH, api=False)

    async def ready(self) -> Health:
        """GET /readyz; ``ok`` is False (no exception) while the server drains."""
        return await self._call("GET", "/readyz", _ready, api=False)

    async def version(self) -> Version:
        """GET /version."""
        return await self._call("GET", "/version", _VERSION)

    async def openapi(self) -> dict[str, Any]:
        """GET /openapi.json, decoded."""
        return await self._call("GET", "/openapi.json", _OPENAPI, api=False)

    async def whoami(self) -> WhoAmI:
        """GET /whoami: who the server sees calling and the scopes it holds (needs no scope)."""
        return await self._call("GET", "/whoami", _WHOAMI)

    async def get(self, path: str) -> RawResponse:
        """A raw GET of ``path``; error statuses are returned, not raised."""
        return await self._call("GET", _raw_path(path), _raw, api=False)

    async def aclose(self) -> None:
        """Close pooled connections (only those of an httpx2 client this object built)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
