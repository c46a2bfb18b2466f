"""A bounded amount shared by every connection of one process, of which one peer uid may hold a part."""

from __future__ import annotations


class Budget:
    """Drawn on and given back on the event loop thread; what does not fit is refused, not queued."""

    __slots__ = ("free", "held", "per_peer")

    def __init__(self, total: int, per_peer: int) -> None:
        self.free = total
        self.per_peer = per_peer
        self.held: dict[int | None, int] = {}

    def take(self, amount: int, uid: int | None) -> bool:
        held = self.held.get(uid, 0)
        if amount > self.free or held + amount > self.per_peer:
            return False
        self.free -= amount
        self.held[uid] = held + amount
        return True

    def give(self, amount: int, uid: int | None) -> None:
        self.free += amount
        left = self.held[uid] - amount
        if left:
            self.held[uid] = left
        else:
            del self.held[uid]
