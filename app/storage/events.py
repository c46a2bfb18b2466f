"""The event hub: one per process, it hands every stored message to every open event stream, each
through a bounded buffer; a reader that falls :data:`BUFFER` events behind is cut off with
``overflow``, so a POST never waits for a reader. Why and how: docs/internals.md, "Storage"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import accumulate
from time import perf_counter
from typing import Literal

import orjson
from fastapi.sse import format_sse_event

from app.connection.capacity import Budget
from app.storage.store import Store
from client.net.throttle import Throttle

log = logging.getLogger("app.storage.events")

PEER_SHARE = 4  # one peer uid may hold at most 1/PEER_SHARE of a budget (streams, bodies, lists)
HEARTBEAT_INTERVAL = 5.0  # seconds of silence before a heartbeat: common proxies close after 10 s
POLL_INTERVAL = 0.1  # seconds between two reads of Store.last_id() (other workers' commits)
FAN_OUT_SHARE = 0.05  # under a stream of POSTs, the share of the time writing events may take
MAX_PAUSE = 0.04  # seconds a round may be held back: the delivery latency pacing can add
BUFFER = 256  # events a subscriber may have waiting; one more and it is cut off with `overflow`
BATCH = 100  # messages read from the store at a time, at most
CHUNK = 64 * 1024  # bytes a stream writes at a time, at most (plus one event)
RETRY_MS = 1000  # the `retry:` sent first on every stream (EventSource reconnects after 1 s)

End = Literal["overflow", "shutdown"]

_RESETS = Throttle(log)  # a peer may ask for an id out of the history at will


def stream_capacity(max_streams: int, workers: int) -> int:
    """Streams one worker process may hold: its share of ``--max-streams``, at least one."""
    return max(1, max_streams // max(1, workers))


def _message_event(message_id: int, document: bytes) -> bytes:
    return format_sse_event(data_str=document.decode("utf-8"), event="message", id=str(message_id))


def _reset(requested: int, cursor: int) -> bytes:
    oldest = cursor + 1
    _RESETS.log(
        logging.INFO, "Event stream asked for messages after #%d: continuing from #%d", requested, oldest
    )
    message = (
        f"messages after #{requested} are no longer all in the history; "
        f"list them again (GET /messages), events go on from #{oldest}"
    )
    data = orjson.dumps({"oldest": oldest, "message": message}).decode("utf-8")
    return format_sse_event(data_str=data, event="reset", id=str(cursor))


def _final(subscriber: Subscriber) -> bytes:
    why = "the server is shutting down"
    if subscriber.end == "overflow":
        why = f"this stream was cut off: its reader fell more than {BUFFER} events behind"
    message = f"{why}; reconnect with Last-Event-ID: {subscriber.sent}"
    data = orjson.dumps({"last_id": subscriber.sent, "message": message}).decode("utf-8")
    return format_sse_event(data_str=data, event=subscriber.end or "shutdown")


class StreamsFull(Exception):
    """No stream can be opened now: all slots are taken, or the server is shutting down."""


class Subscriber:
    """One open stream: its cursor, its buffer (lists extended and joined whole), and why it ends."""

    __slots__ = ("beat", "cursor", "end", "events", "ids", "sent", "size", "uid", "wake", "written")

    def __init__(self, uid: int | None = None) -> None:
        self.uid = uid  # the peer uid holding the stream (its share is counted per uid)
        self.cursor = 0  # the last id handed to this stream (sent, or waiting in its buffer)
        self.sent = 0  # the last id written: where its reader resumes after a cut-off
        self.ids: list[int] = []  # the buffer: events waiting to be written, their ids, their size
        self.events: list[bytes] = []  # (the bytes of each event are shared by every stream)
        self.size = 0
        self.wake = asyncio.Event()
        self.end: End | None = None
        self.written = 0.0  # when the hub last gave it something to write (loop time)
        self.beat = False  # a heartbeat is due

    def add(self, ids: list[int], events: list[bytes], size: int) -> None:
        self.ids += ids
        self.events += events
        self.size += size

    def clear(self) -> None:
        self.ids.clear()
        self.events.clear()
        self.size = 0

    def take(self) -> bytes:
        """Up to :data:`CHUNK` bytes of the oldest events (at least one); ``sent`` moves past them."""
        count, size = len(self.ids), self.size
        if size > CHUNK:
            count = size = 0
            while size < CHUNK:
                size += len(self.events[count])
                count += 1
        self.sent, chunk = self.ids[count - 1], b"".join(self.events[:count])
        del self.ids[:count], self.events[:count]
        self.size -= size
        return chunk


class EventHub:
    """Fans this process's store out to at most ``capacity`` open streams, 1/:data:`PEER_SHARE` of
    them (at least one) per peer uid; wakes on commits, and polls other workers' every POLL_INTERVAL."""

    def __init__(self, store: Store, capacity: int) -> None:
        self.store = store
        self.capacity = capacity
        self.slots = Budget(capacity, max(1, capacity // PEER_SHARE))
        self.streams: set[Subscriber] = set()  # open now (catching up or live)
        self.draining = False
        self._live: set[Subscriber] = set()
        self._last = 0  # the highest id handed to the live subscribers (or skipped past)
        self._wake = asyncio.Event()  # the hub's: set on a commit, or to end its streams
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cut_offs = Throttle(log)
        self.spent = 0.0  # seconds the streams spent writing what the current round gave them
        store.on_commit = self._on_commit

    def _on_commit(self, last_id: int) -> None:  # the POST side: one flag, whatever the number of streams
        if self._live:
            self._wake.set()

    def subscribe(self, uid: int | None = None) -> Subscriber:
        """Take a slot for a new stream of peer ``uid``; :class:`StreamsFull` if none, or none for it."""
        if self.draining:
            raise StreamsFull("the server is shutting down")
        if len(self.streams) >= self.capacity:
            raise StreamsFull(f"{self.capacity} event streams are open already")
        if not self.slots.take(1, uid):
            who = "connections without peer credentials" if uid is None else f"uid {uid}"
            raise StreamsFull(
                f"{who} holds {self.slots.held[uid]} event streams already, its share of the "
                f"{self.capacity} this process admits"
            )
        self._loop = asyncio.get_running_loop()
        subscriber = Subscriber(uid)
        self.streams.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Give the slot back (the stream ended, failed, or its client went away)."""
        if subscriber in self.streams:
            self.streams.discard(subscriber)
            self._live.discard(subscriber)
            subscriber.clear()
            self.slots.give(1, subscriber.uid)

    async def stream(
        self, subscriber: Subscriber, since: int | None, gone: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[bytes]:
        """One ``text/event-stream``: what was missed after ``since``, then live events, until a final
        ``overflow`` or ``shutdown``, or ``gone()`` while catching up; the caller unsubscribes."""
        store = self.store
        yield format_sse_event(retry=RETRY_MS)
        subscriber.cursor = subscriber.sent = store.last_id() if since is None else since
        while subscriber.end is None:
            await asyncio.sleep(0)  # a failed write's connection loss runs; other requests too
            if await gone():
                return
            first, requested = store.first_id(), subscriber.cursor
            # Out of the history, or an id this store never gave (e.g. a memory store restarted).
            if requested > store.last_id() or (first is not None and requested < first - 1):
                subscriber.cursor = subscriber.sent = store.last_id() if first is None else first - 1
                yield _reset(requested, subscriber.cursor)
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
        while True:
            if subscriber.ids:
                yield subscriber.take()
                continue
            if subscriber.end is not None:
                yield _final(subscriber)
                return
            if subscriber.beat:
                subscriber.beat = False
                yield b": heartbeat\n\n"
                continue
            subscriber.wake.clear()
            await subscriber.wake.wait()  # the hub wakes it for events, its end, or a heartbeat
            began = perf_counter()
            if subscriber.ids:
                yield subscriber.take()
                self.spent += perf_counter() - began

    def _join(self, subscriber: Subscriber) -> None:
        if subscriber.end is not None:
            return
        self._last = min(self._last, subscriber.cursor) if self._live else subscriber.cursor
        assert self._loop is not None
        subscriber.written = self._loop.time()
        self._live.add(subscriber)
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="event hub")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._live:
                self._wake.clear()
                began = loop.time()
                self.spent = 0.0
                carried = self._fan_out(began)
                if not self._live:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL):
                        await self._wake.wait()
                now = loop.time()
                for subscriber in self._live:  # silent for HEARTBEAT_INTERVAL: a heartbeat is due
                    if now - subscriber.written >= HEARTBEAT_INTERVAL:
                        subscriber.written = now
                        subscriber.beat = True
                        subscriber.wake.set()
                if carried > 1:  # messages come faster than rounds: pace them (FAN_OUT_SHARE)
                    pause = min(MAX_PAUSE, self.spent / FAN_OUT_SHARE) - (now - began)
                    if pause > 0:
                        await asyncio.sleep(pause)
        except Exception:  # never leave streams silent without saying why
            log.exception("Event hub failed; closing its streams")
            self._end_all("shutdown")
        finally:
            self._task = None

    def _fan_out(self, now: float) -> int:
        """Hand every message above ``_last`` to the live subscribers' buffers; return how many."""
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
                if cursor < first_id - 1:
                    reset = _reset(cursor, first_id - 1)
                    subscriber.add([first_id - 1], [reset], len(reset))
                start = bisect_right(ids, cursor)
                subscriber.add(ids[start:], events[start:], ends[-1] - ends[start])
                subscriber.cursor = last_id
                if len(subscriber.ids) > BUFFER:  # too slow: dropped (resent on resume from Last-Event-ID)
                    subscriber.clear()
                    subscriber.end = "overflow"
                    self._live.discard(subscriber)
                    self._cut_offs.log(
                        logging.WARNING,
                        "Cut off an event stream whose reader fell more than %d events behind",
                        BUFFER,
                    )
                else:
                    subscriber.written = now
                subscriber.wake.set()
            self._last = last_id
            carried += len(ids)
        return carried

    def _end_all(self, reason: End) -> None:
        for subscriber in self.streams:
            if subscriber.end is None:
                subscriber.end = reason
            subscriber.wake.set()
        self._live.clear()
        self._wake.set()

    def drain_soon(self) -> None:
        """Tell every stream to send ``shutdown`` and end; safe to call from a signal handler."""
        self.draining = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._end_all, "shutdown")
