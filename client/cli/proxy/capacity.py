"""The proxy's places: at most ``cap`` connections at once, and who gives one up to a newcomer."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Hashable

MAKE_ROOM_AFTER = 1.0
"""At the cap, a connection without a whole request head this long after it opened is closed to
make room (oldest first): clients send theirs in milliseconds."""
Task = asyncio.Task[None]


class Places:
    """Connections counted against the cap, and which of them have sent a head or been judged.

    ``note(line, key)`` is told of each refusal and eviction (the caller throttles the lines).
    """

    def __init__(self, cap: int, note: Callable[[str, Hashable], None]) -> None:
        self.cap = cap
        self.note = note
        self.held: set[Task] = set()
        self.waiting: dict[Task, float] = {}
        """Connections without a whole request head yet, oldest first, with the time they opened."""
        self.unjudged: dict[Task, int | None] = {}
        """Connections whose request is not judged yet, oldest first, with the uid that opened them."""

    def take(self, task: Task, owner: int | None) -> bool:
        """Count a new connection, closing one without a request head to make room; False (refuse
        it) when every place is held by one that sent its head or opened under ``MAKE_ROOM_AFTER``
        ago, those without a head hold at most half, and no uid but the newcomer's (``owner``)
        holds over half with requests not judged."""
        now = time.monotonic()
        if len(self.held) >= self.cap:
            oldest = next(iter(self.waiting.items()), None)
            # Silent connections filling half the places are a flood: the oldest goes whatever its
            # age, or a stranger opening them faster than one a second per place locks all out.
            crowded = len(self.waiting) > self.cap // 2
            if oldest is None or (now - oldest[1] < MAKE_ROOM_AFTER and not crowded):
                victim = self._flooder(owner)
                if victim is None:
                    self.note(f"{self._full}: refused a connection with 503", "refused")
                    return False
            else:
                victim = oldest[0]
            self.release(victim)
            victim.cancel()  # it closes its connection; nothing of it has reached the socket
            self.note(
                f"{self._full}: closed a connection to make room (no request head, or not yet judged)",
                "closed",
            )
        self.held.add(task)
        self.waiting[task] = now
        self.unjudged[task] = owner
        return True

    def _flooder(self, owner: int | None) -> Task | None:
        """The oldest unjudged connection of a uid other than ``owner`` that holds over half the
        places with such connections (their caller lookups queue up and would lock all out)."""
        counts = Counter(self.unjudged.values())
        if not counts:
            return None
        uid, held = counts.most_common(1)[0]
        if uid == owner or held <= self.cap // 2:
            return None
        return next(task for task, of in self.unjudged.items() if of == uid)

    def give_up(self, task: Task) -> None:
        """A refused request's connection leaves the count at once: unread refusals must not fill it."""
        self.held.discard(task)
        self.waiting.pop(task, None)

    def release(self, task: Task) -> None:
        self.give_up(task)
        self.unjudged.pop(task, None)

    @property
    def _full(self) -> str:
        return f"Proxy at its connection limit ({self.cap}, --max-connections)"
