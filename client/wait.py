"""The one wait loop (:func:`poll`, stdlib only), and :func:`wait_for_socket`, which polls the
server's socket with the raw probe: in a Pod the client may start before the server binds it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from client._errors import ConnectError, WaitTimeout
from client._probe import probe
from client.address import to_url

T = TypeVar("T")


def poll(
    check: Callable[[], T | None],
    timeout: float,
    *,
    what: str,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = ConnectError,
    first_delay: float = 0.01,
    max_delay: float = 0.2,
    on_retry: Callable[[BaseException | None, float], None] | None = None,
) -> T:
    """``check()`` once it returns neither None nor False (``retry_on`` means "not yet"), else
    :class:`TimeoutError` after ``timeout`` s; pauses double from ``first_delay`` to ``max_delay``,
    each after ``on_retry(last exception or None, pause)``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    delay = first_delay
    while True:
        try:
            result = check()
        except retry_on as exc:
            last = exc
        else:
            if result is not None and result is not False:
                return result
            last = None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            message = f"timed out after {timeout:g}s waiting for {what}; last error: {last!r}"
            raise TimeoutError(message) from last
        pause = min(delay, remaining)
        if on_retry is not None:
            on_retry(last, pause)
        time.sleep(pause)
        delay = min(delay * 2, max_delay)


def wait_for_socket(
    path: str,
    timeout: float,
    *,
    first_delay: float = 0.02,
    max_delay: float = 1.0,
    on_retry: Callable[[str, float], None] | None = None,
) -> float:
    """Poll ``GET /healthz`` until the server answers (any status); return the seconds waited.
    As :func:`poll`, with ``on_retry(reason, delay)``; on the deadline :class:`WaitTimeout`."""
    started = time.monotonic()

    def answered() -> bool:
        probe(path, timeout=max(min(started + timeout - time.monotonic(), 5.0), 0.05))
        return True

    def tell(last: BaseException | None, pause: float) -> None:
        if on_retry is not None and isinstance(last, ConnectError):
            on_retry(last.reason, pause)

    try:
        poll(
            answered, timeout, what=to_url(path), first_delay=first_delay, max_delay=max_delay, on_retry=tell
        )
    except TimeoutError as exc:
        last = exc.__cause__
        reason = last.reason if isinstance(last, ConnectError) else "no answer"
        raise WaitTimeout(to_url(path), time.monotonic() - started, reason) from last
    return time.monotonic() - started
