"""Wait for the server's socket to appear and answer, with exponential backoff (stdlib only).

In a Pod the client container may start before the server has bound ``/csi/csi.sock``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from client._errors import ConnectError, WaitTimeout
from client._probe import probe
from client.address import to_url

__all__ = ["wait_for_socket"]


def wait_for_socket(path: str, timeout: float, *, first_delay: float = 0.02, max_delay: float = 1.0,
                    on_retry: Callable[[str, float], None] | None = None) -> float:
    """Poll ``GET /healthz`` until the server answers (any status); return the seconds waited.

    Between attempts the delay doubles from ``first_delay`` up to ``max_delay``, never past the
    deadline. ``on_retry(reason, delay)`` is called before each pause. On the deadline raise
    :class:`WaitTimeout` naming the time waited and the last reason.
    """
    started = time.monotonic()
    deadline = started + timeout
    delay = first_delay
    while True:
        remaining = deadline - time.monotonic()
        try:
            probe(path, timeout=max(min(remaining, 5.0), 0.05))
        except ConnectError as exc:
            reason = exc.reason
        else:
            return time.monotonic() - started
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(to_url(path), time.monotonic() - started, reason)
        pause = min(delay, remaining)
        if on_retry is not None:
            on_retry(reason, pause)
        time.sleep(pause)
        delay = min(delay * 2, max_delay)
