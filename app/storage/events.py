"""The event hub: one per process, it sends every stored message to every open event stream.

The hub wakes on this process's commits (``Store.add_listener``) and polls ``Store.last_id()``
every :data:`POLL_INTERVAL` while streams are open (other ``--workers`` commit too); it encodes
each message once and hands the same bytes to every subscriber's bounded buffer. A reader that
falls :data:`BUFFER` events behind is cut off with ``overflow``, so a POST never waits for a
reader. Why and how (pacing, catching up, the switch to live): docs/internals.md, "Storage".
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import accumulate
from time import perf_counter
from typing import Literal

import orjson
from fastapi.sse import format_sse_event

from app.storage.store import Store
from client.net.throttle import Throttle

__all__ = [
    "BATCH",
    "BUFFER",
    "CHUNK",
    "HEARTBEAT",
    "HEARTBEAT_INTERVAL",
    "PEER_SHARE",
    "POLL_INTERVAL",
    "EventHub",
    "StreamsFull",
    "Subscriber",
    "stream_capacity",
]

log = logging.getLogger("app.storage.events")

PEER_SHARE = 4
"""One peer uid may hold at most 1/``PEER_SHARE`` of a budget (streams, bodies, long lists), so a
single uid cannot lock every other uid out."""
HEARTBEAT_INTERVAL = 5.0
"""Seconds a stream may stay silent before a ``: heartbeat`` comment: below the 10 s after which
common proxies close a silent connection."""
HEARTBEAT = b": heartbeat\n\n"
POLL_INTERVAL = 0.1
"""Seconds between two reads of ``Store.last_id()`` while streams are open: how late another
worker's message may reach this process's streams."""
FAN_OUT_SHARE = 0.05
"""Under a stream of POSTs, the share of the process's time that writing events may take (a
round costs about the same for one message or a hundred, so rounds are paced to carry more)."""
MAX_PAUSE = 0.04  # seconds a round may be held back: the delivery latency pacing can add
BUFFER = 256  # events a subscriber may have waiting; one more and it is cut off with `overflow`
BATCH = 100  # messages read from the store at a time, at most
CHUNK = 64 * 1024
"""Bytes a stream writes at a time, at most (plus one event): what a stalled reader holds."""
RETRY_MS = 1000  # the `retry:` sent first on every stream (EventSource reconnects after 1 s)

End = Literal["overflow", "shutdown"]

_RESETS = Throttle(log)  # a peer may ask for an id out of the history at will


def stream_capacity(max_streams: int, workers: int) -> int:
    """Streams one worker process may hold: its share of ``--max-streams``, at least one (a share
    per process bounds the server's total without state shared between processes)."""
    return max(1, max_streams // max(1, workers))


def _message_event(message_id: int, document: bytes) -> bytes:
    """``event: message``, ``data:`` the document, ``id:`` its id (once per message, for every stream)."""
    return format_sse_event(data_str=document.decode("utf-8"), event="message", id=str(message_id))


def _control_event(event: str, data: dict[str, object], event_id: int | None = None) -> bytes:
    return format_sse_event(
        data_str=orjson.dumps(data).decode("utf-8"),
        event=event,
        id=None if event_id is None else str(event_id),
    )


async def _connected() -> bool:
    return False


class Pending:
    """Encoded events waiting to be written, with their ids and their size in bytes (lists
    extended and joined whole: no Python-level step per event and per stream)."""

    __slots__ = ("events", "ids", "size")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.events: list[bytes] = []
        self.size = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: list[int], events: list[bytes], size: int) -> None:
        self.ids += ids
        self.events += events
        self.size += size

    def clear(self) -> None:
        self.ids.clear()
        self.events.clear()
        self.size = 0

    def take(self) -> tuple[int, bytes]:
        """(last id, bytes) of up to :data:`CHUNK` bytes of the oldest events (at least one)."""
        if self.size <= CHUNK:
            last, chunk = self.ids[-1], b"".join(self.events)
            self.clear()
            return last, chunk
        count = size = 0
        while size < CHUNK:
            size += len(self.events[count])
            count += 1
        last, chunk = self.ids[count - 1], b"".join(self.events[:count])
        del self.ids[:count], self.events[:count]
        self.size -= size
        return last, chunk


class StreamsFull(Exception):
    """No stream can be opened now: all slots are taken, or the server is shutting down."""


class Subscriber:
    """One open stream: its cursor (the last id it was given), its buffer, and why it ends."""

    __slots__ = ("beat", "buffer", "cursor", "end", "sent", "uid", "wake", "written")

    def __init__(self, uid: int | None = None) -> None:
        self.uid = uid  # the peer uid holding the stream (its share is counted per uid)
        self.cursor = 0  # the last id handed to this stream (sent, or waiting in its buffer)
        self.sent = 0  # the last id written: where its reader resumes after a cut-off
        self.buffer = Pending()  # events waiting to be written; their bytes are shared by every stream
        self.wake = asyncio.Event()
        self.end: End | None = None
        self.written = 0.0  # when the hub last gave it something to write (loop time)
        self.beat = False  # a heartbeat is due


class EventHub:
    """Fans this process's store out to at most ``capacity`` open streams, 1/:data:`PEER_SHARE` of
    them (at least one) per peer uid."""

    def __init__(self, store: Store, capacity: int) -> None:
        self.store = store
        self.capacity = capacity
        self.per_peer = max(1, capacity // PEER_SHARE)
        self.open = 0  # streams open now (catching up or live)
        self.held: dict[int | None, int] = {}  # the same, by peer uid
        self.draining = False
        self._streams: set[Subscriber] = set()
        self._live: set[Subscriber] = set()
        self._last = 0  # the highest id handed to the live subscribers (or skipped past)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cut_offs = Throttle(log)
        self.spent = 0.0  # seconds the streams spent writing what the current round gave them
        store.add_listener(self._on_commit)

    def _on_commit(self, last_id: int) -> None:  # the POST side: one flag, whatever the number of streams
        if self._live and self._wake is not None:
            self._wake.set()

    def subscribe(self, uid: int | None = None) -> Subscriber:
        """Take a slot for a new stream of peer ``uid``; :class:`StreamsFull` when none is left, the
        uid holds its share already, or the server drains."""
        if self.draining:
            raise StreamsFull("the server is shutting down")
        if self.open >= self.capacity:
            raise StreamsFull(f"{self.capacity} event streams are open already")
        held = self.held.get(uid, 0)
        if held >= self.per_peer:
            who = "connections without peer credentials" if uid is None else f"uid {uid}"
            raise StreamsFull(
                f"{who} holds {held} event streams already, its share of the {self.capacity} this "
                "process admits"
            )
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
        self.open += 1
        self.held[uid] = held + 1
        subscriber = Subscriber(uid)
        self._streams.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Give the slot back (the stream ended, failed, or its client went away)."""
        if subscriber in self._streams:
            self._streams.discard(subscriber)
            self._live.discard(subscriber)
            subscriber.buffer.clear()
            self.open -= 1
            left = self.held[subscriber.uid] - 1
            if left:
                self.held[subscriber.uid] = left
            else:
                del self.held[subscriber.uid]

    async def stream(
        self,
        subscriber: Subscriber,
        since: int | None,
        gone: Callable[[], Awaitable[bool]] = _connected,
    ) -> AsyncIterator[bytes]:
        """The bytes of one ``text/event-stream``: what was missed after ``since``, then live events.

        It ends after a final ``overflow`` or ``shutdown`` event, or, while catching up, as soon as
        ``gone()`` (asked before each read of the store, after a pass of the event loop) says its
        client has left; the caller unsubscribes. Catching up holds one batch of at most
        :data:`CHUNK` bytes (plus one message) that its reader has not taken.
        """
        store = self.store
        yield format_sse_event(retry=RETRY_MS)
        if since is None:
            subscriber.cursor = subscriber.sent = store.last_id()
            self._join(subscriber)
        else:
            subscriber.cursor = subscriber.sent = since
            last = store.last_id()
            if since > last:
                # An id this store never gave (its history was lost, e.g. a memory store restarted).
                first = store.first_id()
                subscriber.cursor = subscriber.sent = last if first is None else first - 1
                yield self._reset(since, subscriber.cursor)
            while subscriber.end is None:
                await asyncio.sleep(0)  # a failed write's connection loss runs; other requests too
                if await gone():
                    return
                first = store.first_id()
                if first is not None and subscriber.cursor < first - 1:
                    requested = subscriber.cursor
                    subscriber.cursor = subscriber.sent = first - 1
                    yield self._reset(requested, subscriber.cursor)
                rows = store.since(subscriber.cursor, BATCH, CHUNK)
                if not rows:
                    self._join(subscriber)  # same loop step as the empty read: nothing falls between
                    break
                subscriber.cursor = subscriber.sent = rows[-1][0]
                chunk = b"".join([_message_event(i, doc) for i, doc in rows])
                del rows
                yield chunk
                del chunk
                yield b""  # writes nothing, but waits while the connection cannot take more
        buffer = subscriber.buffer
        wake = subscriber.wake
        while True:
            if buffer:
                subscriber.sent, chunk = buffer.take()
                yield chunk
                continue
            if subscriber.end is not None:
                yield self._final(subscriber)
                return
            if subscriber.beat:
                subscriber.beat = False
                yield HEARTBEAT
                continue
            wake.clear()
            await wake.wait()  # the hub wakes it for events, its end, or a heartbeat
            began = perf_counter()
            if buffer:
                subscriber.sent, chunk = buffer.take()
                yield chunk
                self.spent += perf_counter() - began

    def _join(self, subscriber: Subscriber) -> None:
        if subscriber.end is not None:
            return
        if not self._live:
            self._last = subscriber.cursor
        else:
            self._last = min(self._last, subscriber.cursor)
        assert self._loop is not None
        subscriber.written = self._loop.time()
        self._live.add(subscriber)
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="event hub")

    @staticmethod
    def _reset(requested: int, cursor: int) -> bytes:
        oldest = cursor + 1
        _RESETS.log(
            logging.INFO, "Event stream asked for messages after #%d: continuing from #%d", requested, oldest
        )
        return _control_event(
            "reset",
            {
                "oldest": oldest,
                "message": f"messages after #{requested} are no longer all in the history; "
                f"list them again (GET /messages), events go on from #{oldest}",
            },
            cursor,
        )

    @staticmethod
    def _final(subscriber: Subscriber) -> bytes:
        sent = subscriber.sent
        if subscriber.end == "overflow":
            text = (
                f"this stream was cut off: its reader fell more than {BUFFER} events behind; "
                f"reconnect with Last-Event-ID: {sent}"
            )
        else:
            text = f"the server is shutting down; reconnect with Last-Event-ID: {sent}"
        return _control_event(subscriber.end or "shutdown", {"last_id": sent, "message": text})

    async def _run(self) -> None:
        wake = self._wake
        loop = self._loop
        assert wake is not None
        assert loop is not None
        try:
            while self._live:
                wake.clear()
                began = loop.time()
                self.spent = 0.0
                carried = self._fan_out(began)
                if not self._live:
                    break
                try:
                    async with asyncio.timeout(POLL_INTERVAL):
                        await wake.wait()
                except TimeoutError:
                    pass
                self._heartbeats(loop.time())
                if carried > 1:  # messages come faster than rounds: pace them (FAN_OUT_SHARE)
                    pause = min(MAX_PAUSE, self.spent / FAN_OUT_SHARE) - (loop.time() - began)
                    if pause > 0:
                        await asyncio.sleep(pause)
        except Exception:  # never leave streams silent without saying why
            log.exception("Event hub failed; closing its streams")
            self._end_all("shutdown")
        finally:
            self._task = None

    def _heartbeats(self, now: float) -> None:
        """Wake the streams that have had nothing to write for :data:`HEARTBEAT_INTERVAL`."""
        for subscriber in self._live:
            if now - subscriber.written >= HEARTBEAT_INTERVAL:
                subscriber.written = now
                subscriber.beat = True
                subscriber.wake.set()

    def _fan_out(self, now: float) -> int:
        """Hand every message above ``_last`` to the live subscribers (their buffers, not sockets);
        return how many messages there were."""
        store = self.store
        carried = 0
        while self._live and store.last_id() > self._last:
            rows = store.since(self._last, BATCH)
            if not rows:  # pruned before the hub read them: the next round gives each a reset
                self._last = store.last_id()
                break
            ids = [i for i, _ in rows]
            events = [_message_event(i, doc) for i, doc in rows]
            ends = list(accumulate(map(len, events), initial=0))
            first_id, last_id = ids[0], ids[-1]
            for subscriber in list(self._live):
                cursor = subscriber.cursor
                if cursor >= last_id:
                    continue
                buffer = subscriber.buffer
                if cursor < first_id - 1:
                    reset = self._reset(cursor, first_id - 1)
                    buffer.add([first_id - 1], [reset], len(reset))
                start = bisect_right(ids, cursor)
                buffer.add(ids[start:], events[start:], ends[-1] - ends[start])
                subscriber.cursor = last_id
                if len(buffer) > BUFFER:
                    self._cut_off(subscriber)
                else:
                    subscriber.written = now
                    subscriber.wake.set()
            self._last = last_id
            carried += len(ids)
        return carried

    def _cut_off(self, subscriber: Subscriber) -> None:
        """The reader is too slow: drop its buffer, stop feeding it, let it send ``overflow``."""
        subscriber.buffer.clear()  # resent on resume, from the reader's Last-Event-ID
        subscriber.end = "overflow"
        self._live.discard(subscriber)
        subscriber.wake.set()
        self._cut_offs.log(
            logging.WARNING, "Cut off an event stream whose reader fell more than %d events behind", BUFFER
        )

    def _end_all(self, reason: End) -> None:
        for subscriber in self._streams:
            if subscriber.end is None:
                subscriber.end = reason
            subscriber.wake.set()
        self._live.clear()
        if self._wake is not None:
            self._wake.set()

    def drain_soon(self) -> None:
        """Tell every stream to send ``shutdown`` and end; safe to call from a signal handler."""
        self.draining = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._end_all, "shutdown")
