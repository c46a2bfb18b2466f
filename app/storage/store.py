"""The ``Store`` interface the routes and the event stream use, and the memory store
(``--store memory``): a bounded in-memory message history and a bounded (LRU) memory of
idempotency keys. The durable store (the default) is ``app.storage.sqlite.SqliteStore``.

A remembered key keeps only what answering a repeat needs: the message's id, time, peer and a
16-byte digest of its text. A repeat carries its text, so the answer is rebuilt from that text
once the digests match; a key never keeps a message alive after it has left the history. Measured
over the socket, 20,000 keyed POSTs of 16 KiB texts took the server from 50 to 382 MiB RSS when
each key kept its whole message, and to 74 MiB now (tests/app/test_memory_budget.py).

Everything runs on the event loop thread with no ``await`` inside a method, so no locks are needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import orjson

__all__ = [
    "KeyConflict",
    "MessageStore",
    "Record",
    "Remembered",
    "Store",
    "StoreError",
    "StoreFull",
    "Stored",
    "text_digest",
]

Record = dict[str, Any]


def text_digest(text: str) -> bytes:
    """A 16-byte BLAKE2b digest of ``text``: what a remembered key compares a repeat's text with."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Stored(NamedTuple):
    """What :meth:`Store.put` answers: the message's id and JSON document, and whether it is new."""

    id: int
    document: bytes
    created: bool
    """False when the Idempotency-Key was already used with the same text (a repeat: 200, not 201)."""


class StoreError(Exception):
    """The store cannot do what was asked; the message says what and what to do."""


class KeyConflict(StoreError):
    """The Idempotency-Key was already used with a different text (409)."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full: nothing was written (507)."""


class Store(Protocol):
    """What the routes and the event stream need of a message store (memory or durable).

    Ids start at 1, increase, and never name two messages, even after pruning or a restart of a
    durable store. Reads never block on the event loop for long; ``put`` answers only once the
    message (and its key) is committed.
    """

    async def put(
        self, text: str, reply: str, received_at: str, peer: dict[str, Any] | None, key: str | None
    ) -> Stored:
        """Store a message under ``key`` (already scoped to the peer), or return the one stored
        under it. Raises :class:`KeyConflict` when ``key`` holds another text, :class:`StoreFull`
        when nothing could be written."""
        ...

    def get(self, message_id: int) -> bytes | None:
        """The JSON document of this message, while it is in the history."""
        ...

    def recent_ids(self, limit: int) -> Sequence[int]:
        """The ids of the most recent ``limit`` messages, oldest first."""
        ...

    def since(self, after_id: int, limit: int, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """Up to ``limit`` messages with an id above ``after_id`` still in the history, oldest
        first, as (id, JSON document); with ``max_bytes``, no more once their documents reach it
        (at least one message): a reader that may stall holds a bounded batch."""
        ...

    def first_id(self) -> int | None:
        """The oldest id still in the history (None when empty)."""
        ...

    def last_id(self) -> int:
        """The highest id ever stored, by any process sharing the store (0 before the first)."""
        ...

    def add_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(last_id)`` on the event loop after each commit made by this process."""
        ...


class Remembered(NamedTuple):
    """The message first stored under a key, without its text."""

    id: int
    digest: bytes
    reply: str
    received_at: str
    peer: dict[str, Any] | None

    def matches(self, text: str) -> bool:
        """True when ``text`` is the text stored under the key (a repeat, not a conflict)."""
        return text_digest(text) == self.digest

    def record(self, text: str) -> Record:
        """The stored message, rebuilt around ``text`` (which :meth:`matches`)."""
        return {
            "id": self.id,
            "text": text,
            "reply": self.reply,
            "received_at": self.received_at,
            "peer": self.peer,
        }


class MessageStore:
    """The last ``history_size`` messages (ids increasing) and the last ``key_capacity`` keys, in
    this process's memory (``--store memory``): lost when the process stops.

    Each message is kept as its JSON document, encoded once: answers send those bytes as they are,
    and no ``str`` is kept (orjson caches a UTF-8 copy inside each ``str`` it encodes, which would
    double, for some texts triple, what a stored text costs).
    """

    __slots__ = ("_history", "_key_capacity", "_keys", "_listeners", "_next_id")

    def __init__(self, history_size: int, key_capacity: int) -> None:
        if history_size < 1 or key_capacity < 1:
            raise ValueError("history_size and key_capacity must be at least 1")
        self._history: deque[bytes] = deque(maxlen=history_size)
        self._keys: OrderedDict[str, Remembered] = OrderedDict()
        self._key_capacity = key_capacity
        self._next_id = 1
        self._listeners: list[Callable[[int], None]] = []

    async def put(
        self, text: str, reply: str, received_at: str, peer: dict[str, Any] | None, key: str | None
    ) -> Stored:
        """Store a new message (and remember ``key`` for it), or answer the one stored under ``key``.

        The oldest message falls off once the history is full; so does the least recently used key.
        Nothing here awaits, so the key check and the add happen in one step of the event loop.
        """
        if key is not None:
            earlier = self._keys.get(key)
            if earlier is not None:
                self._keys.move_to_end(key)
                if not earlier.matches(text):
                    raise KeyConflict("this Idempotency-Key was already used with a different text")
                return Stored(earlier.id, orjson.dumps(earlier.record(text)), False)
        message_id = self._next_id
        self._next_id += 1
        # A copy of exactly its size: orjson's own buffer is over-allocated and shrunk in place, and
        # 1,000 of those kept while others come and go fragmented the heap (measured: RSS grew to
        # 200 MB over 40,000 keyed 16 KiB POSTs; with the copy it stays at 75 MB).
        document = bytes(
            memoryview(
                orjson.dumps(
                    {
                        "id": message_id,
                        "text": text,
                        "reply": reply,
                        "received_at": received_at,
                        "peer": peer,
                    }
                )
            )
        )
        self._history.append(document)
        if key is not None:
            self._keys[key] = Remembered(message_id, text_digest(text), reply, received_at, peer)
            if len(self._keys) > self._key_capacity:
                self._keys.popitem(last=False)
        for listener in self._listeners:
            listener(message_id)
        return Stored(message_id, document, True)

    def get(self, message_id: int) -> bytes | None:
        """The JSON document of the message with this id, if it is still in the history."""
        index = message_id - (self._next_id - len(self._history))
        if 0 <= index < len(self._history):
            return self._history[index]
        return None

    def recent_ids(self, limit: int) -> range:
        """The ids of the most recent ``limit`` messages, oldest first.

        Ids, not documents: a reader that walks them later (a list sent to a slow client) fetches
        the messages then and holds none that has since left the history.
        """
        return range(self._next_id - min(limit, len(self._history)), self._next_id)

    def since(self, after_id: int, limit: int, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """Up to ``limit`` messages with an id above ``after_id``, oldest first (see :class:`Store`)."""
        first = self._next_id - len(self._history)
        start = max(after_id + 1, first)
        stop = min(start + max(limit, 0), self._next_id)
        history = self._history
        if max_bytes is None:
            return [(i, history[i - first]) for i in range(start, stop)]
        rows: list[tuple[int, bytes]] = []
        size = 0
        for i in range(start, stop):
            document = history[i - first]
            rows.append((i, document))
            size += len(document)
            if size >= max_bytes:
                break
        return rows

    def first_id(self) -> int | None:
        """The oldest id still in the history (None when empty)."""
        return self._next_id - len(self._history) if self._history else None

    def last_id(self) -> int:
        """The highest id stored so far (0 before the first)."""
        return self._next_id - 1

    def add_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(last_id)`` right after each message is stored (on the event loop)."""
        self._listeners.append(callback)
