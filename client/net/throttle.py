"""At most one log line per period for events that peers can trigger at will."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

_OTHERS = object()  # the key shared by every key past Throttle.keys


@dataclass(slots=True)
class _Kind:
    last: float = float("-inf")  # when its last line was written
    held: int = 0  # events held back since, the last of them:
    level: int = logging.INFO
    message: str = ""
    args: tuple[object, ...] = ()


class Throttle:
    """One line per ``period`` for each ``key`` (past ``keys`` keys, one for the rest), those held back
    counted into the next or :meth:`flush`'s; ``log``: a logger, or a function that writes a line."""

    __slots__ = ("_kinds", "_log", "keys", "period")

    def __init__(
        self, log: logging.Logger | Callable[[str], None], period: float = 10.0, *, keys: int = 64
    ) -> None:
        self._log = log
        self.period = period
        self.keys = keys
        self._kinds: dict[Hashable, _Kind] = {}

    def log(self, level: int, message: str, *args: object, key: Hashable = None) -> bool:
        """Write ``message % args`` now, or count it for later; return whether it was written."""
        now = time.monotonic()
        kinds = self._kinds
        kind = kinds.get(key)
        if kind is None:
            if len(kinds) >= self.keys:  # forget kinds quiet for a period, else share one key
                kinds = {k: old for k, old in kinds.items() if old.held or now - old.last < self.period}
                self._kinds = kinds
                key = key if len(kinds) < self.keys else _OTHERS
            kind = kinds.setdefault(key, _Kind())
        if now - kind.last < self.period:
            kind.held += 1
            kind.level, kind.message, kind.args = level, message, args
            return False
        if kind.held:
            message += f" (and {kind.held} more like it in the last {now - kind.last:.0f}s)"
            kind.held = 0
        kind.last = now
        self._write(level, message, args)
        return True

    def flush(self) -> None:
        """Write, for each key with events held back, the last of them and how many there were."""
        now = time.monotonic()
        for kind in self._kinds.values():
            if kind.held:
                more = f" (and {kind.held - 1} more like it in the last {now - kind.last:.0f}s)"
                self._write(kind.level, kind.message + (more if kind.held > 1 else ""), kind.args)
                kind.held = 0
                kind.last = now

    def _write(self, level: int, message: str, args: tuple[object, ...]) -> None:
        if isinstance(self._log, logging.Logger):
            self._log.log(level, message, *args)
        else:
            self._log(message % args if args else message)
