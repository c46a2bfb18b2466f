""":func:`wait_for_socket` polls the server's socket with the raw probe (stdlib only): in a Pod the
client may start before the server binds it."""

from __future__ import annotations

import time
from collections.abc import Callable

from client._errors import ConnectError, WaitTimeout
from client._probe import probe
from client.address import to_url


def wait_for_socket(
    path: str,
    timeout: float,
    *,
    first_delay: float = 0.02,
    max_delay: float = 1.0,
    on_retry: Callable[[str, float], None] | None = None,
) -> float:
    """Poll ``GET /healthz`` until the server answers (any status); return the seconds waited.
    Pauses double from ``first_delay`` to ``max_delay``, each after ``on_retry(reason, pause)``;
    on the deadline :class:`WaitTimeout`."""
    started = time.monotonic()
    deadline = started + timeout
    delay = first_delay
    while True:
        try:
            probe(path, timeout=max(min(deadline - time.monotonic(), 5.0), 0.05))
            return time.monotonic() - started
        except ConnectError as exc:
            last = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(to_url(path), time.monotonic() - started, last.reason) from last
        pause = min(delay, remaining)
        if on_retry is not None:
            on_retry(last.reason, pause)
        time.sleep(pause)
        delay = min(delay * 2, max_delay)
