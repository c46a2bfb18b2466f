"""What ``Client`` and ``AsyncClient`` share, doing no I/O: building requests, the API version, the
response cap, and turning an answer into a typed result or one :class:`ClientError`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from contextvars import Token
from typing import Any, TypeVar

import httpx2
import orjson

from client._errors import APIError, ClientError, UsageError
from client._models import Health, Message, RawResponse, Version, WhoAmI, _object
from client._transport import REQUEST, Budget
from client.address import resolve_socket, to_url

log = logging.getLogger("client")

DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
"""Room for the largest legitimate answer, a full history of long messages (docs/internals.md)."""

# Set once on an httpx2 client built here, per request on a caller's (docs/internals.md).
_HEADERS = {"user-agent": "uds-client", "accept": "application/json", "accept-encoding": "identity"}
OWN: dict[str, Any] = {"base_url": "http://localhost", "trust_env": False, "headers": _HEADERS}
_T = TypeVar("_T")
_NOT_JSON: Any = object()


Parser = Callable[[httpx2.Response, bytes], _T]
"""Turns an answer and its body (read within the cap) into a result."""


def _snippet(content: bytes) -> str:
    return content[:200].decode("utf-8", "replace") + ("..." if len(content) > 200 else "")


def _what(request: httpx2.Request) -> str:
    return f"{request.method} {request.url.raw_path.decode('ascii')}"


def _check(response: httpx2.Response, content: bytes, *, ok: tuple[int, ...] = ()) -> Any:
    """Decode the JSON body, or raise :class:`APIError` from the server's error shape."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = _NOT_JSON
    status = response.status_code
    if status < 400 or status in ok:
        if body is not _NOT_JSON:
            return body
        raise ClientError(f"the server answered {status} with a body that is not JSON: {_snippet(content)}")
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        raise APIError(status, body["message"], error=body.get("error"), body=body)
    reason = response.reason_phrase or "error"
    text = content.decode("utf-8", "replace")
    raise APIError(status, f"{reason} (HTTP {status})", body=text if body is _NOT_JSON else body)


def _parser(build: Callable[[Any], _T], what: str, ok: tuple[int, ...] = ()) -> Parser[_T]:
    """An answer's parser: :func:`_check`, then ``build``; a wrong shape is one :class:`ClientError`."""

    def parse(response: httpx2.Response, content: bytes) -> _T:
        body = _check(response, content, ok=ok)
        try:
            return build(body)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ClientError(f"the server's answer is not {what}: {_snippet(orjson.dumps(body))}") from exc

    return parse


MESSAGE = _parser(Message.from_json, "a message")
MESSAGES = _parser(lambda data: [Message.from_json(item) for item in data["messages"]], "a list of messages")
HEALTH = _parser(lambda data: Health.from_json(data, 200), "a health status")
VERSION = _parser(Version.from_json, "a list of versions")
OPENAPI = _parser(lambda data: _object(data, "an OpenAPI document"), "an OpenAPI document")
WHOAMI = _parser(WhoAmI.from_json, "an identity")


def ready(response: httpx2.Response, content: bytes) -> Health:
    # 503 is a draining server: ok is False, no exception.
    status = response.status_code
    return _parser(lambda data: Health.from_json(data, status), "a health status", (503,))(response, content)


def raw(response: httpx2.Response, content: bytes) -> RawResponse:
    # httpx2's headers come with lower-case names, repeated fields joined by ", ".
    return RawResponse(status=response.status_code, headers=dict(response.headers), content=content)


def send_body(text: str, idempotency_key: str | None) -> dict[str, Any]:
    # 128 random bits, as uuid4().hex without importing uuid (a one-shot command's start-up).
    key = idempotency_key if idempotency_key is not None else os.urandom(16).hex()
    headers = {"content-type": "application/json", "idempotency-key": key}
    return {"content": orjson.dumps({"text": text}), "headers": headers}


def messages_path(limit: int | None) -> str:
    if limit is None:
        return "/messages"
    if limit < 1:
        raise UsageError(f"limit must be at least 1, not {limit}")
    return f"/messages?limit={int(limit)}"


def raw_path(path: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"path must start with '/', not {path!r}")
    return path


def _versions_text(low: int, high: int) -> str:
    return f"API version {low}" if low == high else f"API versions {low} to {high}"


class _Base:
    API_VERSIONS: tuple[int, int] = (1, 1)
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
        http_client: object,
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

    def _chosen(self, response: httpx2.Response, content: bytes) -> str:
        """The path prefix for the server's ``/_ping`` answer (or an error when none will do)."""
        if response.status_code == 404:  # a server from before API versions
            return ""
        if response.status_code >= 400:
            _check(response, content)  # raises APIError with the server's message
        headers = response.headers
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

    def _begin(
        self, method: str, url: str, is_async: bool, headers: Any = None, **options: Any
    ) -> tuple[httpx2.Request, Budget, Token[Budget | None]]:
        """The request and its :class:`Budget`, set for this thread or task until the token resets it."""
        budget = Budget(time.monotonic() + self.timeout)
        if not self._owns_http:  # a caller's client lacks our headers, and our backends' marks
            headers = _HEADERS if headers is None else {**_HEADERS, **headers}
            options["extensions"] = {"trace": budget.atrace if is_async else budget}
        request = self._http.build_request(method, url, headers=headers, **options)
        return request, budget, REQUEST.set(budget)

    def _retry(self, exc: httpx2.TransportError, budget: Budget, request: httpx2.Request) -> None:
        """Raise ``exc`` unless it is a reused connection the server had closed (send once more)."""
        stale = isinstance(exc, httpx2.RemoteProtocolError | httpx2.ReadError | httpx2.WriteError)
        if budget.opened or not stale:
            raise exc
        why = "reused connection was closed by the server"
        log.debug("%s %s: %s (%s); retrying once", self.address, _what(request), why, exc)

    def _over(self, size: int, request: httpx2.Request) -> None:
        if size > self.max_response_bytes:
            raise ClientError(
                f"{self.address} answered {_what(request)} with more than "
                f"{self.max_response_bytes} bytes; refusing to read it (max_response_bytes)"
            )

    def _capped(self, response: httpx2.Response) -> Callable[[bytes], bytes]:
        """Pass each chunk on; :class:`ClientError` once Content-Length or the chunks exceed the cap."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit():
            self._over(int(declared), response.request)

        total = 0

        def count(chunk: bytes) -> bytes:  # decoded bytes: a compressed answer counts what it becomes
            nonlocal total
            total += len(chunk)
            self._over(total, response.request)
            return chunk

        return count

    def _stream(self, response: httpx2.Response, content: bytes) -> httpx2.Response:
        """The open stream of a 200 to ``GET /events``, else the error (the server's, if it sent one)."""
        if response.status_code == 200:
            return response
        _check(response, content)
        raise ClientError(f"{self.address} answered GET /events with {response.status_code}, not a stream")

    def _log(self, request: httpx2.Request, status: int, budget: Budget) -> None:
        if log.isEnabledFor(logging.DEBUG):
            elapsed = (time.monotonic() + self.timeout - budget.deadline) * 1000
            log.debug("%s %s -> %d in %.1f ms", self.address, _what(request), status, elapsed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"
