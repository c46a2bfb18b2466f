"""``Client`` and ``AsyncClient``: one typed method per endpoint, on a Unix socket, over httpx2.

Both send through httpx2's Unix-socket transports (``client._transport``), or through an
``httpx2.Client`` / ``httpx2.AsyncClient`` the caller passes (FastAPI's ``TestClient`` works).
``timeout`` bounds each whole request, and a response is read only up to ``max_response_bytes``.
Requests and responses are shaped by the shared helpers below; the classes only differ in how
they wait.

API versions, as Docker's client negotiates them: before its first API call a client asks
``GET /_ping`` once (lazily; a lock makes concurrent first calls wait for that one ping) and then
sends every API request under ``/v{N}``, N the highest version both sides support
(:data:`API_VERSIONS` is the client's own range; ``Api-Version`` and ``Min-Api-Version`` the
server's). No common version raises :class:`ClientError` naming both ranges; a server without
``/_ping`` (404) gets the unversioned paths. The probes, ``/openapi.json`` and :meth:`Client.get`
stay unversioned and never ping. A method for a new API route builds its path with
``self._api("/noun")`` (``await self._api(...)`` on :class:`AsyncClient`).
"""

from __future__ import annotations

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

# The largest legitimate answer is a full history: 1,000 messages of 4,096 four-byte characters
# with their replies and peers, about 25 MB of JSON.
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024

# Sent with every request; no compression on a local socket, so what counts against the cap is
# what arrives. Set once on an httpx2 client this module builds (merging them into each request
# costs CPU), per request on a caller's.
_HEADERS = {"user-agent": "uds-client", "accept": "application/json", "accept-encoding": "identity"}
_JSON = {"content-type": "application/json"}
_T = TypeVar("_T")

API_VERSIONS = (1, 1)
"""The oldest and the newest API version this client speaks."""


class _Answer:
    """A response whose body has been read (within the cap): what the helpers below need."""

    __slots__ = ("content", "response")

    def __init__(self, response: httpx2.Response, content: bytes) -> None:
        self.response = response
        self.content = content

    @property
    def status(self) -> int:
        return self.response.status_code


_NOT_JSON: Any = object()


def _decode(answer: _Answer) -> Any:
    try:
        return orjson.loads(answer.content)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _snippet(content: bytes) -> str:
    text = content[:200].decode("utf-8", "replace")
    return text + ("..." if len(content) > 200 else "")


def _check(answer: _Answer, *, ok: tuple[int, ...] = ()) -> Any:
    """Decode the JSON body, or raise :class:`APIError` from the server's error shape."""
    body = _decode(answer)
    status = answer.status
    if status < 400 or status in ok:
        if body is _NOT_JSON:
            if status == 204:
                return None
            raise ClientError(
                f"the server answered {status} with a body that is not JSON: {_snippet(answer.content)}"
            )
        return body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        raise APIError(status, body["message"], error=body.get("error"), body=body)
    reason = answer.response.reason_phrase or "error"
    text = answer.content.decode("utf-8", "replace")
    raise APIError(status, f"{reason} (HTTP {status})", body=text if body is _NOT_JSON else body)


def _shaped(build: Callable[[Any], _T], body: Any, what: str) -> _T:
    """``build(body)``, or one :class:`ClientError` when the JSON does not have the expected shape."""
    try:
        return build(body)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        shown = orjson.dumps(body)
        raise ClientError(f"the server's answer is not {what}: {_snippet(shown)}") from exc


def _message(body: Any) -> Message:
    return _shaped(Message.from_json, body, "a message")


def _message_list(body: Any) -> list[Message]:
    return _shaped(
        lambda data: [Message.from_json(item) for item in data["messages"]], body, "a list of messages"
    )


def _raw(answer: _Answer) -> RawResponse:
    headers = {name.lower(): value for name, value in answer.response.headers.items()}
    return RawResponse(status=answer.status, headers=headers, content=answer.content)


def _send_request(text: str, idempotency_key: str | None) -> tuple[bytes, dict[str, str]]:
    # 128 random bits, as uuid4().hex without importing uuid (a one-shot command's start-up).
    key = idempotency_key if idempotency_key is not None else os.urandom(16).hex()
    return orjson.dumps({"text": text}), {**_JSON, "idempotency-key": key}


def _messages_query(limit: int | None) -> str:
    if limit is None:
        return ""
    if limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")
    return f"?limit={int(limit)}"


def _versions_text(low: int, high: int) -> str:
    return f"API version {low}" if low == high else f"API versions {low} to {high}"


class _Base:
    """What both clients share: the socket, limits, the response cap, logging, the API version."""

    API_VERSIONS: tuple[int, int] = API_VERSIONS
    """(oldest, newest) API version spoken; a subclass may speak another range."""

    _owns_http: bool
    _prefix: str | None = None
    """``/v{N}`` once negotiated, ``""`` for a server without versions; None before the ping."""

    def __init__(
        self, socket: str | None, timeout: float, environ: Mapping[str, str] | None, max_response_bytes: int
    ) -> None:
        if not timeout > 0:
            raise UsageError(f"timeout must be greater than 0, not {timeout!r}")
        if max_response_bytes < 1:
            raise UsageError(f"max_response_bytes must be at least 1, not {max_response_bytes!r}")
        self.path = resolve_socket(socket, environ)
        self.address = to_url(self.path)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes

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

    @staticmethod
    def _version_of(prefix: str) -> int | None:
        return int(prefix[2:]) if prefix else None

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

    def _events_request(self, last_id: int | None) -> tuple[dict[str, str] | None, httpx2.Timeout]:
        """Headers and timeouts of ``GET /events``: reads may idle up to :data:`READ_IDLE_TIMEOUT`."""
        headers = {"accept": "text/event-stream", "cache-control": "no-store"}
        if last_id is not None:
            headers["last-event-id"] = str(last_id)
        return self._headers(headers), httpx2.Timeout(self.timeout, read=max(READ_IDLE_TIMEOUT, self.timeout))

    def _not_a_stream(self, answer: _Answer) -> ClientError:
        """The error for an answer to ``GET /events`` other than 200: the server's, if it sent one."""
        try:
            _check(answer)
        except ClientError as exc:
            return exc
        return ClientError(f"{self.address} answered GET /events with {answer.status}, not a stream")

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str] | None:
        """Per-request headers: only ``extra`` on our own httpx2 client, everything on a caller's."""
        if self._owns_http:
            return extra
        return _HEADERS if extra is None else {**_HEADERS, **extra}

    def _log_retry(self, method: str, url: str, exc: Exception) -> None:
        log.debug(
            "%s %s %s: reused connection was closed by the server (%s); retrying once",
            self.address,
            method,
            url,
            exc,
        )

    def _log(self, method: str, url: str, status: int, started: float, retried: bool) -> None:
        if log.isEnabledFor(logging.DEBUG):
            elapsed = (time.monotonic() - started) * 1000
            note = " (retried on a fresh connection)" if retried else ""
            log.debug("%s %s %s -> %d in %.1f ms%s", self.address, method, url, status, elapsed, note)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


class Client(_Base):
    """A synchronous client. ``Client()`` talks to ``$UDS_SOCKET`` or ``unix:///csi/csi.sock``.

    Requests go through an ``httpx2.Client`` over ``httpx2.HTTPTransport(uds=...)`` built for the
    socket (``client._transport``); ``http_client`` (an ``httpx2.Client``, e.g. FastAPI's
    ``TestClient``) replaces it. ``timeout`` bounds each whole request: connect, write and read
    (with a caller's ``http_client``, its own per-step timeouts apply instead).
    A response larger than ``max_response_bytes`` raises :class:`ClientError` without being read.
    Up to ``max_connections`` connections are kept; one instance may be shared by threads.
    """

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
        super().__init__(socket, timeout, environ, max_response_bytes)
        self._owns_http = http_client is None
        if http_client is None:
            http_client = httpx2.Client(
                transport=sync_transport(self.path, max_connections=max_connections),
                base_url=BASE_URL,
                timeout=timeout,
                trust_env=False,
                headers=_HEADERS,
            )
        self._http = http_client
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
        """The API version this client uses with the server (asking it first if not done yet);
        None for a server without API versions, which gets the unversioned paths."""
        return self._version_of(self._api(""))

    def _request(
        self, method: str, url: str, *, content: bytes | None = None, headers: dict[str, str] | None = None
    ) -> _Answer:
        started = time.monotonic()
        budget = Budget(started + self.timeout)
        token = REQUEST.set(budget)
        # Our own backend marks the budget when it connects; another transport needs a trace.
        tracker = None if self._owns_http else ReuseTracker()
        retried = False
        try:
            request = self._http.build_request(
                method,
                url,
                content=content,
                headers=self._headers(headers),
                extensions=None if tracker is None else {"trace": tracker},
            )
            try:
                answer = self._read(request, method, url)
            except httpx2.TransportError as exc:
                if not is_stale_error(exc) or (budget.opened if tracker is None else tracker.opened):
                    raise
                self._log_retry(method, url, exc)
                retried = True
                answer = self._read(request, method, url)
        except (httpx2.HTTPError, TimeoutError) as exc:
            raise mapped_error(exc, self.address) from exc
        finally:
            REQUEST.reset(token)
        self._log(method, url, answer.status, started, retried)
        return answer

    def _read(self, request: httpx2.Request, method: str, url: str) -> _Answer:
        response = self._http.send(request, stream=True)
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
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def send(self, text: str, *, idempotency_key: str | None = None) -> Message:
        """POST /messages; a retry after a dropped connection reuses the same Idempotency-Key."""
        content, headers = _send_request(text, idempotency_key)
        url = self._api("/messages")
        return _message(_check(self._request("POST", url, content=content, headers=headers)))

    def messages(self, limit: int | None = None) -> list[Message]:
        """GET /messages: the most recent ``limit`` messages, oldest first."""
        query = _messages_query(limit)
        return _message_list(_check(self._request("GET", self._api("/messages") + query)))

    def message(self, id: int) -> Message:
        """GET /messages/{id}."""
        return _message(_check(self._request("GET", self._api(f"/messages/{int(id)}"))))

    def events(self, since: int | None = None, *, reconnect_for: float = RECONNECT_FOR) -> Iterator[Event]:
        """GET /events: each message as it is stored (those after id ``since`` first), for ever.

        A dropped stream or a server restart is resumed from the last id (nothing missed or
        repeated); gives up after ``reconnect_for`` seconds without a stream (see client._events).
        """
        return follow(self._open_events, self.address, since, self.max_response_bytes, reconnect_for)

    def _open_events(self, last_id: int | None) -> httpx2.Response:
        """``GET /events`` after ``last_id``, its head read within ``timeout``: a 200 still
        streaming, or the error raised."""
        url = self._api("/events")
        headers, timeout = self._events_request(last_id)
        request = self._http.build_request("GET", url, headers=headers, timeout=timeout)
        token = REQUEST.set(Budget(time.monotonic() + self.timeout))
        try:
            response = self._http.send(request, stream=True)
            if response.status_code == 200:
                return response
            try:
                content = self._body(response.iter_bytes(), "GET", url)
            finally:
                response.close()
        except (httpx2.HTTPError, TimeoutError) as exc:
            raise mapped_error(exc, self.address) from exc
        finally:
            REQUEST.reset(token)
        raise self._not_a_stream(_Answer(response, content))

    def health(self) -> Health:
        """GET /healthz."""
        return _shaped(
            lambda body: Health.from_json(body, 200),
            _check(self._request("GET", "/healthz")),
            "a health status",
        )

    def ready(self) -> Health:
        """GET /readyz; ``ok`` is False (no exception) while the server drains."""
        answer = self._request("GET", "/readyz")
        return _shaped(
            lambda body: Health.from_json(body, answer.status), _check(answer, ok=(503,)), "a health status"
        )

    def version(self) -> Version:
        """GET /version."""
        answer = self._request("GET", self._api("/version"))
        return _shaped(Version.from_json, _check(answer), "a list of versions")

    def openapi(self) -> dict[str, Any]:
        """GET /openapi.json, decoded."""
        return _shaped(_spec, _check(self._request("GET", "/openapi.json")), "an OpenAPI document")

    def whoami(self) -> WhoAmI:
        """GET /whoami: who the server sees calling and the scopes it holds (needs no scope)."""
        answer = self._request("GET", self._api("/whoami"))
        return _shaped(WhoAmI.from_json, _check(answer), "an identity")

    def get(self, path: str) -> RawResponse:
        """A raw GET of ``path``; error statuses are returned, not raised."""
        if not path.startswith("/"):
            raise UsageError(f"path must start with '/', not {path!r}")
        return _raw(self._request("GET", path))

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


def _spec(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TypeError("not a JSON object")
    return body


class AsyncClient(_Base):
    """The asyncio (or trio) twin of :class:`Client`; share one instance between tasks.

    Tasks beyond ``max_connections`` (httpx2's default, 100) queue for a connection (a smaller pool
    serves fewer requests: docs/performance.md). ``timeout`` bounds each whole request.
    """

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
        super().__init__(socket, timeout, environ, max_response_bytes)
        self._owns_http = http_client is None
        if http_client is None:
            http_client = httpx2.AsyncClient(
                transport=async_transport(self.path, max_connections=max_connections),
                base_url=BASE_URL,
                timeout=timeout,
                trust_env=False,
                headers=_HEADERS,
            )
        self._http = http_client
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
        """The API version this client uses with the server (asking it first if not done yet);
        None for a server without API versions, which gets the unversioned paths."""
        return self._version_of(await self._api(""))

    async def _request(
        self, method: str, url: str, *, content: bytes | None = None, headers: dict[str, str] | None = None
    ) -> _Answer:
        started = time.monotonic()
        budget = Budget(started + self.timeout)
        token = REQUEST.set(budget)
        retried = False
        try:
            if self._owns_http:
                # Our own backend bounds each step by the budget and marks it when it connects.
                request = self._http.build_request(method, url, content=content, headers=headers)
                answer, retried = await self._send(request, method, url, lambda: budget.opened)
            else:
                # Another transport: a cancel scope around the request, and a trace for the retry.
                tracker = ReuseTracker()
                request = self._http.build_request(
                    method,
                    url,
                    content=content,
                    headers=self._headers(headers),
                    extensions={"trace": tracker.atrace},
                )
                with anyio.fail_after(self.timeout):
                    answer, retried = await self._send(request, method, url, lambda: tracker.opened)
        except (httpx2.HTTPError, TimeoutError) as exc:
            raise mapped_error(exc, self.address) from exc
        finally:
            REQUEST.reset(token)
        self._log(method, url, answer.status, started, retried)
        return answer

    async def _send(
        self, request: httpx2.Request, method: str, url: str, opened: Callable[[], bool]
    ) -> tuple[_Answer, bool]:
        """Send, and once more if a reused connection turned out closed; (answer, retried)."""
        try:
            return await self._read(request, method, url), False
        except httpx2.TransportError as exc:
            if not is_stale_error(exc) or opened():
                raise
            self._log_retry(method, url, exc)
            return await self._read(request, method, url), True

    async def _read(self, request: httpx2.Request, method: str, url: str) -> _Answer:
        response = await self._http.send(request, stream=True)
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
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def send(self, text: str, *, idempotency_key: str | None = None) -> Message:
        """POST /messages; a retry after a dropped connection reuses the same Idempotency-Key."""
        content, headers = _send_request(text, idempotency_key)
        url = await self._api("/messages")
        return _message(_check(await self._request("POST", url, content=content, headers=headers)))

    async def messages(self, limit: int | None = None) -> list[Message]:
        """GET /messages: the most recent ``limit`` messages, oldest first."""
        query = _messages_query(limit)
        return _message_list(_check(await self._request("GET", await self._api("/messages") + query)))

    async def message(self, id: int) -> Message:
        """GET /messages/{id}."""
        return _message(_check(await self._request("GET", await self._api(f"/messages/{int(id)}"))))

    def events(
        self, since: int | None = None, *, reconnect_for: float = RECONNECT_FOR
    ) -> AsyncIterator[Event]:
        """GET /events: each message as it is stored (those after id ``since`` first), for ever.

        A dropped stream or a server restart is resumed from the last id (nothing missed or
        repeated); gives up after ``reconnect_for`` seconds without a stream (see client._events).
        """
        return follow_async(self._open_events, self.address, since, self.max_response_bytes, reconnect_for)

    async def _open_events(self, last_id: int | None) -> httpx2.Response:
        """As :meth:`Client._open_events`."""
        url = await self._api("/events")
        headers, timeout = self._events_request(last_id)
        request = self._http.build_request("GET", url, headers=headers, timeout=timeout)
        token = REQUEST.set(Budget(time.monotonic() + self.timeout))
        try:
            with anyio.fail_after(self.timeout):
                response = await self._http.send(request, stream=True)
                if response.status_code == 200:
                    return response
                try:
                    content = await self._body(response.aiter_bytes(), "GET", url)
                finally:
                    await response.aclose()
        except (httpx2.HTTPError, TimeoutError) as exc:
            raise mapped_error(exc, self.address) from exc
        finally:
            REQUEST.reset(token)
        raise self._not_a_stream(_Answer(response, content))

    async def health(self) -> Health:
        """GET /healthz."""
        body = _check(await self._request("GET", "/healthz"))
        return _shaped(lambda data: Health.from_json(data, 200), body, "a health status")

    async def ready(self) -> Health:
        """GET /readyz; ``ok`` is False (no exception) while the server drains."""
        answer = await self._request("GET", "/readyz")
        return _shaped(
            lambda body: Health.from_json(body, answer.status), _check(answer, ok=(503,)), "a health status"
        )

    async def version(self) -> Version:
        """GET /version."""
        answer = await self._request("GET", await self._api("/version"))
        return _shaped(Version.from_json, _check(answer), "a list of versions")

    async def openapi(self) -> dict[str, Any]:
        """GET /openapi.json, decoded."""
        return _shaped(_spec, _check(await self._request("GET", "/openapi.json")), "an OpenAPI document")

    async def whoami(self) -> WhoAmI:
        """GET /whoami: who the server sees calling and the scopes it holds (needs no scope)."""
        answer = await self._request("GET", await self._api("/whoami"))
        return _shaped(WhoAmI.from_json, _check(answer), "an identity")

    async def get(self, path: str) -> RawResponse:
        """A raw GET of ``path``; error statuses are returned, not raised."""
        if not path.startswith("/"):
            raise UsageError(f"path must start with '/', not {path!r}")
        return _raw(await self._request("GET", path))

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
