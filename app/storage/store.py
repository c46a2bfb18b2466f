"""The ``Store`` interface the routes and the event hub use, and the memory store (``--store
memory``): a bounded history and a bounded (LRU) memory of idempotency keys; docs/internals.md."""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import orjson


def text_digest(text: str) -> bytes:
    """A 16-byte BLAKE2b digest of ``text``: what a remembered key compares a repeat's text with."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def document(message_id: int, text: str, reply: str, received_at: str, peer: dict[str, Any] | None) -> bytes:
    return orjson.dumps(
        {"id": message_id, "text": text, "reply": reply, "received_at": received_at, "peer": peer}
    )


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


class Remembered(NamedTuple):
    """The message first stored under a key, without its text (a repeat carries it)."""

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


def bounded(rows: Iterable[tuple[int, bytes]], max_bytes: int | None) -> list[tuple[int, bytes]]:
    """``rows`` up to the first whose documents reach ``max_bytes`` (None: all): a bounded batch."""
    if max_bytes is None:
        return list(rows)
    taken: list[tuple[int, bytes]] = []
    for row in rows:
        taken.append(row)
        max_bytes -= len(row[1])
        if max_bytes <= 0:
            break
    return taken


class Store:
    """A message store: ids start at 1, increase and are never reused; ``put`` answers once committed."""

    def __init__(self, history_size: int, key_capacity: int) -> None:
        self.history_size = history_size
        self.key_capacity = key_capacity
        # Called with the last id on the event loop after each commit made by this process (the hub's).
        self.on_commit: Callable[[int], None] = lambda last_id: None

    async def put(
        self, text: str, reply: str, received_at: str, peer: dict[str, Any] | None, key: str | None
    ) -> Stored:
        """Store under ``key`` (per peer), or answer the one stored under it; KeyConflict, StoreFull."""
        raise NotImplementedError

    def get(self, message_id: int) -> bytes | None:
        """The JSON document of this message, while it is in the history."""
        raise NotImplementedError

    def recent_ids(self, limit: int) -> Sequence[int]:
        """The ids of the most recent ``limit`` messages, oldest first."""
        raise NotImplementedError

    def since(self, after_id: int, limit: int, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (id, document) above ``after_id``, oldest first, within :func:`bounded`."""
        raise NotImplementedError

    def first_id(self) -> int | None:
        """The oldest id still in the history (None when empty)."""
        raise NotImplementedError

    def last_id(self) -> int:
        """The highest id ever stored, by any process sharing the store (0 before the first)."""
        raise NotImplementedError


class MessageStore(Store):
    """The last messages (encoded) and keys in this process's memory; no method awaits, so no locks."""

    def __init__(self, history_size: int, key_capacity: int) -> None:
        super().__init__(history_size, key_capacity)
        self._history: deque[bytes] = deque(maxlen=history_size)
        self._keys: OrderedDict[str, Remembered] = OrderedDict()
        self._next_id = 1

    async def put(
        self, text: str, reply: str, received_at: str, peer: dict[str, Any] | None, key: str | None
    ) -> Stored:
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
            if len(self._keys) > self.key_capacity:
                self._keys.popitem(last=False)
        self.on_commit(message_id)
        return Stored(message_id, encoded, True)

    def get(self, message_id: int) -> bytes | None:
        index = message_id - (self._next_id - len(self._history))
        if 0 <= index < len(self._history):
            return self._history[index]
        return None

    def recent_ids(self, limit: int) -> range:
        return range(self._next_id - min(limit, len(self._history)), self._next_id)

    def since(self, after_id: int, limit: int, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        first = self._next_id - len(self._history)
        start = max(after_id + 1, first)
        stop = min(start + max(limit, 0), self._next_id)
        return bounded(((i, self._history[i - first]) for i in range(start, stop)), max_bytes)

    def first_id(self) -> int | None:
        return self._next_id - len(self._history) if self._history else None

    def last_id(self) -> int:
        return self._next_id - 1
