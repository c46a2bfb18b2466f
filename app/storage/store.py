"""The ``Store`` interface the routes and the event hub use, and the memory store (``--store
memory``): a bounded message history and a bounded (LRU) memory of idempotency keys.

A key keeps only what answering a repeat needs (id, time, peer, a digest of the text), never the
message: a repeat carries its text. Everything runs on the event loop thread without ``await``
inside a method, so no locks are needed.
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
    "Remembered",
    "Store",
    "StoreError",
    "StoreFull",
    "Stored",
    "text_digest",
]


def text_digest(text: str) -> bytes:
    """A 16-byte BLAKE2b digest of ``text``: what a remembered key compares a repeat's text with."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Stored(NamedTuple):
    """What :meth:`Store.put` answers: the id, the JSON document, and False for a repeated key."""

    id: int
    document: bytes
    created: bool


class StoreError(Exception):
    """The store cannot do what was asked; the message says what and what to do."""


class KeyConflict(StoreError):
    """The Idempotency-Key was already used with a different text (409)."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full: nothing was written (507)."""


class Store(Protocol):
    """A message store (memory or durable). Ids start at 1, increase, and never name two messages,
    even after pruning or a restart; ``put`` answers once the message and its key are committed."""

    async def put(
        self, text: str, reply: str, received_at: str, peer: dict[str, Any] | None, key: str | None
    ) -> Stored:
        """Store a message under ``key`` (scoped to the peer), or return the one stored under it;
        :class:`KeyConflict` if ``key`` holds another text, :class:`StoreFull` if nothing was written."""
        ...

    def get(self, message_id: int) -> bytes | None:
        """The JSON document of this message, while it is in the history."""
        ...

    def recent_ids(self, limit: int) -> Sequence[int]:
        """The ids of the most recent ``limit`` messages, oldest first."""
        ...

    def since(self, after_id: int, limit: int, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (id, document) above ``after_id`` still in the history, oldest first;
        with ``max_bytes``, none past that size (at least one): a stalled reader holds a bounded batch."""
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

    def answer(self, text: str) -> Stored:
        """The repeat's answer, rebuilt around ``text``; :class:`KeyConflict` if the texts differ."""
        if text_digest(text) != self.digest:
            raise KeyConflict("this Idempotency-Key was already used with a different text")
        return Stored(self.id, document(self.id, text, self.reply, self.received_at, self.peer), False)


def document(message_id: int, text: str, reply: str, received_at: str, peer: dict[str, Any] | None) -> bytes:
    """A message's JSON document, as stored and answered."""
    return orjson.dumps(
        {"id": message_id, "text": text, "reply": reply, "received_at": received_at, "peer": peer}
    )


class MessageStore:
    """The last ``history_size`` messages and ``key_capacity`` keys, in this process's memory.

    Messages are kept as their encoded JSON documents, no ``str``: orjson caches a UTF-8 copy
    inside each ``str`` it encodes, which would double what a stored text costs.
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
        """Store a new message (the oldest message and key fall off past the bounds), or answer the
        one stored under ``key``; nothing awaits, so the check and the add are one step of the loop."""
        if key is not None:
            earlier = self._keys.get(key)
            if earlier is not None:
                self._keys.move_to_end(key)
                return earlier.answer(text)
        message_id = self._next_id
        self._next_id += 1
        # A copy of exactly its size: orjson's over-allocated buffers, kept, fragment the heap.
        encoded = bytes(memoryview(document(message_id, text, reply, received_at, peer)))
        self._history.append(encoded)
        if key is not None:
            self._keys[key] = Remembered(message_id, text_digest(text), reply, received_at, peer)
            if len(self._keys) > self._key_capacity:
                self._keys.popitem(last=False)
        for listener in self._listeners:
            listener(message_id)
        return Stored(message_id, encoded, True)

    def get(self, message_id: int) -> bytes | None:
        """The JSON document of the message with this id, if it is still in the history."""
        index = message_id - (self._next_id - len(self._history))
        if 0 <= index < len(self._history):
            return self._history[index]
        return None

    def recent_ids(self, limit: int) -> range:
        """The ids of the most recent ``limit`` messages, oldest first (ids, not documents: a slow
        reader fetches each later and holds none that has left the history)."""
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
