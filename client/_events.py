"""The iterators behind ``Client.events()`` and ``AsyncClient.events()``, on httpx2's EventSource:
resuming from the last id after a drop, backing off, giving up after ``reconnect_for`` seconds
without a stream (docs/internals.md, "Following GET /events")."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx2

from client._errors import APIError, ClientError, ConnectError
from client._models import Event

log = logging.getLogger("client")

READ_IDLE_TIMEOUT = 15.0  # seconds of silence (three missed heartbeats) before the stream counts as dropped
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0  # seconds between attempts to reconnect, doubling
RECONNECT_FOR = 300.0  # seconds to try to get a stream back: Kubernetes' crash-loop back-off tops at 5 min
_WANTED = ("message", "reset")


class Follow:
    """Following the stream after id ``since``: the last id, the back-off and the give-up time."""

    def __init__(
        self, address: str, since: int | None, timeout: float, max_bytes: int, reconnect_for: float
    ) -> None:
        if since is not None and since < 0:
            raise ClientError(f"since must be 0 or more, not {since}")
        self.address, self.last, self.max_bytes, self.reconnect_for = address, since, max_bytes, reconnect_for
        self.timeout = httpx2.Timeout(timeout, read=max(READ_IDLE_TIMEOUT, timeout))
        self.connected = False
        self.received = False  # whether the current connection brought any event
        self.lost_at: float | None = None
        self.delay = BACKOFF_FIRST

    def options(self) -> dict[str, Any]:
        """``GET /events`` after the last id; its reads may idle up to :data:`READ_IDLE_TIMEOUT`."""
        headers = {"accept": "text/event-stream", "cache-control": "no-store"}
        if self.last is not None:
            headers["last-event-id"] = str(self.last)
        return {"headers": headers, "timeout": self.timeout}

    def source(self, response: httpx2.Response) -> httpx2.EventSource:
        """The events of an open stream, once its content type says it is one."""
        kind = response.headers.get("content-type", "").partition(";")[0].strip()
        if kind != "text/event-stream":
            raise ClientError(
                f"{self.address} answered GET /events with {kind or 'no content type'}, not an event stream"
            )
        self.connected = True
        self.received = False
        return httpx2.EventSource(response, max_event_size=self.max_bytes)

    def take(self, sse: httpx2.ServerSentEvent, response: httpx2.Response) -> Event | None:
        """The event for the caller, if it is one; remembers its id either way."""
        # No data: the opening ``retry:``. A closed body: httpx2 flushing the tail of one cut off.
        if not sse.data or response.is_closed:
            return None
        event_id = None
        if sse.id:
            try:
                event_id = int(sse.id)
            except ValueError:
                raise ClientError(
                    f"{self.address} sent an event id that is not a number: {sse.id[:50]!r}"
                ) from None
            self.last = event_id
        self.received = True
        self.lost_at = None
        self.delay = BACKOFF_FIRST
        if sse.event in _WANTED:
            return Event(sse.event, event_id, sse.data)
        log.debug("%s ended the event stream (%s): %s", self.address, sse.event, sse.data[:200])
        return None

    def too_large(self) -> ClientError:
        return ClientError(
            f"{self.address} sent an event larger than {self.max_bytes} bytes on GET /events; "
            "refusing it (max_response_bytes)"
        )

    def retry_after(self, exc: ClientError) -> float:
        """Seconds to wait before connecting again after ``exc``; raises it when it is final."""
        retriable = isinstance(exc, ConnectError) or (isinstance(exc, APIError) and exc.status == 503)
        if not retriable or not (self.connected or isinstance(exc, APIError)):
            raise exc
        now = time.monotonic()
        if self.lost_at is None:
            self.lost_at = now
        if now - self.lost_at > self.reconnect_for:
            raise exc
        delay = self._backoff()
        log.debug("%s: event stream lost (%s); connecting again in %.1fs", self.address, exc, delay)
        return delay

    def dropped(self, exc: Exception | None) -> float:
        """Seconds to wait after an open stream ended or broke: none if it brought events."""
        if exc is not None:
            log.debug("%s: event stream broke: %s", self.address, exc)
        if self.lost_at is None:
            self.lost_at = time.monotonic()
        return 0.0 if self.received else self._backoff()

    def _backoff(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, BACKOFF_MAX)
        return delay

    def follow(self, open_stream: Callable[..., httpx2.Response]) -> Iterator[Event]:
        """The events of the streams ``open_stream(**options())`` opens, for ever (``Client.events``)."""
        while True:
            try:
                response = open_stream(**self.options())
            except ClientError as exc:
                time.sleep(self.retry_after(exc))
                continue
            broke = None
            try:
                for sse in self.source(response):
                    if event := self.take(sse, response):
                        yield event
            except httpx2.SSEError as exc:
                raise self.too_large() from exc
            except (httpx2.TransportError, httpx2.StreamError) as exc:
                broke = exc
            finally:
                response.close()
            time.sleep(self.dropped(broke))

    async def follow_async(
        self, open_stream: Callable[..., Awaitable[httpx2.Response]]
    ) -> AsyncIterator[Event]:
        while True:
            try:
                response = await open_stream(**self.options())
            except ClientError as exc:
                await anyio.sleep(self.retry_after(exc))
                continue
            broke = None
            try:
                async for sse in self.source(response):
                    if event := self.take(sse, response):
                        yield event
            except httpx2.SSEError as exc:
                raise self.too_large() from exc
            except (httpx2.TransportError, httpx2.StreamError) as exc:
                broke = exc
            finally:
                await response.aclose()
            await anyio.sleep(self.dropped(broke))
