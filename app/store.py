"""Bounded in-memory message history and a bounded (LRU) memory of idempotency keys.

Everything runs on the event loop thread with no ``await`` inside a method, so no locks are needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

__all__ = ["MessageStore"]

Record = dict[str, Any]


class MessageStore:
    """The last ``history_size`` messages (ids increasing) and the last ``key_capacity`` keys."""

    __slots__ = ("_history", "_key_capacity", "_keys", "_next_id")

    def __init__(self, history_size: int, key_capacity: int) -> None:
        if history_size < 1 or key_capacity < 1:
            raise ValueError("history_size and key_capacity must be at least 1")
        self._history: deque[Record] = deque(maxlen=history_size)
        self._keys: OrderedDict[str, Record] = OrderedDict()
        self._key_capacity = key_capacity
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._history)

    def add(self, text: str, reply: str, received_at: str, peer: dict[str, int] | None,
            key: str | None = None) -> Record:
        """Store a new message (and remember ``key`` for it); the oldest ones fall off."""
        record: Record = {
            "id": self._next_id, "text": text, "reply": reply, "received_at": received_at, "peer": peer,
        }
        self._next_id += 1
        self._history.append(record)
        if key is not None:
            self._keys[key] = record
            if len(self._keys) > self._key_capacity:
                self._keys.popitem(last=False)
        return record

    def by_key(self, key: str) -> Record | None:
        """The message first stored under ``key``, if the key is still remembered (marks it recent)."""
        record = self._keys.get(key)
        if record is not None:
            self._keys.move_to_end(key)
        return record

    def get(self, message_id: int) -> Record | None:
        """The message with this id, if it is still in the history."""
        if not self._history:
            return None
        index = message_id - self._history[0]["id"]
        if 0 <= index < len(self._history):
            return self._history[index]
        return None

    def recent(self, limit: int) -> list[Record]:
        """The most recent ``limit`` messages, oldest first."""
        size = len(self._history)
        if limit >= size:
            return list(self._history)
        return [self._history[i] for i in range(size - limit, size)]

    def clear(self) -> None:
        """Forget every message and key; ids start again at 1."""
        self._history.clear()
        self._keys.clear()
        self._next_id = 1

    @property
    def remembered_keys(self) -> int:
        return len(self._keys)
