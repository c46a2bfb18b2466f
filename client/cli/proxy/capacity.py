"""The proxy's places: at most ``cap`` connections at once, and who gives one up to a newcomer."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Hashable

MAKE_ROOM_AFTER = 1.0  # seconds without a whole request head before a connection may be evicted
Task = asyncio.Task[None]


class Places:
    """Connections counted against the cap; ``note(line, key)`` hears of each refusal and eviction."""

    def __init__(self, cap: int, note: Callable[[str, Hashable], None]) -> None:
        self.cap = cap
        self._full = f"Proxy at its connection limit ({cap}, --max-connections)"
        self.note = note
        self.held: set[Task] = set()
        self.waiting: dict[Task, float] = {}  # no whole head yet, oldest first: when they opened
        self.unjudged: dict[Task, int | None] = {}  # not judged yet, oldest first: the uid

    def take(self, task: Task, owner: int | None) -> bool:
        """Count a connection, evicting one if it may (docs/internals.md); False to refuse it."""
        now = time.monotonic()
        if len(self.held) >= self.cap:
            oldest = next(iter(self.waiting.items()), None)
            crowded = len(self.waiting) > self.cap // 2
            if oldest is None or (now - oldest[1] < MAKE_ROOM_AFTER and not crowded):
                # Else the oldest unjudged connection of a uid but the newcomer's holding over half.
                uid, held = Counter(self.unjudged.values()).most_common(1)[0] if self.unjudged else (owner, 0)
                if uid == owner or held <= self.cap // 2:
                    self.note(f"{self._full}: refused a connection with 503", "refused")
                    return False
                victim = next(t for t, of in self.unjudged.items() if of == uid)
            else:
                victim = oldest[0]
            self.release(victim)
            victim.cancel()  # it closes its connection; nothing of it has reached the socket
            why = "closed a connection to make room (no request head, or not yet judged)"
            self.note(f"{self._full}: {why}", "closed")
        self.held.add(task)
        self.waiting[task] = now
        self.unjudged[task] = owner
        return True

    def give_up(self, task: Task) -> None:
        """A refused request's connection leaves the count at once (unread refusals must not fill it)."""
        self.held.discard(task)
        self.waiting.pop(task, None)

    def release(self, task: Task) -> None:
        self.give_up(task)
        self.unjudged.pop(task, None)
