"""The proxy's places: at most ``cap`` connections at once, and who gives one up to a newcomer."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["LOG_PERIOD", "MAKE_ROOM_AFTER", "Places"]

MAKE_ROOM_AFTER = 1.0
"""At the cap, a connection without a whole request head this long after it opened is closed to
make room (oldest first): clients send theirs in milliseconds."""
LOG_PERIOD = 10.0
"""Seconds between two log lines about the cap (and about one kind of refusal)."""

Task = asyncio.Task[None]


class Places:
    """Connections counted against the cap, and which of them have sent a head or been judged.

    One line is logged at the first refusal or eviction, then one per period that sums them up.
    """

    def __init__(self, cap: int, log: Callable[[str], None]) -> None:
        self.cap = cap
        self.log = log
        self.held: set[Task] = set()
        self.waiting: dict[Task, float] = {}
        """Connections without a whole request head yet, oldest first, with the time they opened."""
        self.unjudged: dict[Task, int | None] = {}
        """Connections whose request is not judged yet, oldest first, with the uid that opened them."""
        self.refused = self.closed = 0
        self._timer: asyncio.TimerHandle | None = None

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
                    self._note(refused=True)
                    return False
            else:
                victim = oldest[0]
            self.release(victim)
            victim.cancel()  # it closes its connection; nothing of it has reached the socket
            self._note(refused=False)
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

    def _note(self, *, refused: bool) -> None:
        if refused:
            self.refused += 1
        else:
            self.closed += 1
        if self._timer is None:
            self._report()

    def _report(self) -> None:
        self._timer = None
        if not (self.refused or self.closed):
            return
        self.log(
            f"Proxy at its connection limit ({self.cap}, --max-connections): refused {self.refused} "
            f"connection(s) with 503, closed {self.closed} without a request head after "
            f"{MAKE_ROOM_AFTER:g}s to make room; next report in {LOG_PERIOD:g}s at most"
        )
        self.refused = self.closed = 0
        self._timer = asyncio.get_running_loop().call_later(LOG_PERIOD, self._report)

    def close(self) -> None:
        """Log what is still counted and stop the timer."""
        self._report()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
