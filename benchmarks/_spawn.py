"""Server processes for the benchmarks and the tests: app.serving.spawn's ServerProcess, plus a TCP
port to wait on, CPU pinning, free ports, short socket directories and a ``with`` block that serves.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

from app.serving import spawn as app_spawn
from client import ConnectError, WaitTimeout

T = TypeVar("T")


def poll(
    check: Callable[[], T | None],
    timeout: float,
    *,
    what: str,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = ConnectError,
    first_delay: float = 0.01,
    max_delay: float = 0.2,
) -> T:
    """``check()`` once it returns neither None nor False (``retry_on`` means "not yet"), else
    :class:`TimeoutError` after ``timeout`` s; pauses double from ``first_delay`` to ``max_delay``."""
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
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def socket_dir(prefix: str = "uds") -> Path:
    """A fresh directory under /tmp with a short name: AF_UNIX paths stop at 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix + "-", dir="/tmp"))


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(server CPUs, load-generator CPUs), the first CPU and the rest; None with fewer than two."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    return {available[0]}, set(available[1:])


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` confining the child to ``cpus`` before it starts any thread, or None."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def probe_tcp(host: str, port: int, *, timeout: float = 5.0) -> int:
    """``GET /healthz`` over TCP; return the status or raise :class:`ConnectError`."""
    address = f"http://{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head = sock.recv(64)
    except ConnectionRefusedError as exc:
        hint = "Is a server listening there (uds-server --host HOST --port PORT)?"
        raise ConnectError(address, "connection refused", hint) from exc
    except OSError as exc:
        raise ConnectError.caused_by(address, exc) from exc
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ConnectError(address, "not an HTTP server", "Check the address.")
    return int(parts[1])


class ServerProcess(app_spawn.ServerProcess):
    """A server that serves on ``socket`` or on ``host``:``port``, pinned to ``cpus`` if given;
    ``ready_after``: the seconds from exec to the first answer, once :meth:`wait_ready` returns."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        cpus: set[int] | None = None,
        **options: Any,
    ) -> None:
        self.port = port
        self.host = host
        self.ready_after: float | None = None
        self.started = time.monotonic()
        super().__init__(command, preexec_fn=pinned(cpus), **options)

    @property
    def where(self) -> str:
        return super().where if self.socket else f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout: float = app_spawn.START_TIMEOUT, **delays: float) -> Self:
        super().wait_ready(timeout, **delays)
        self.ready_after = time.monotonic() - self.started
        return self

    def wait_answer(self, timeout: float, first_delay: float, max_delay: float) -> None:
        if self.socket is not None or self.port is None:
            super().wait_answer(timeout, first_delay, max_delay)
            return
        port = self.port

        def answered() -> bool:
            self.check_alive()
            probe_tcp(self.host, port, timeout=1.0)
            return True

        try:
            poll(answered, timeout, what=self.where, first_delay=first_delay, max_delay=max_delay)
        except TimeoutError as exc:
            last = exc.__cause__
            reason = last.reason if isinstance(last, ConnectError) else repr(last)
            raise WaitTimeout(self.where, timeout, reason) from exc


@contextlib.contextmanager
def spawn(
    command: Sequence[str], *, timeout: float = app_spawn.START_TIMEOUT, **options: Any
) -> Iterator[ServerProcess]:
    """Start ``command``, wait until it answers, stop it with SIGTERM on leaving.

    ``options`` are :class:`ServerProcess`'s. SIGKILL ends it instead if the block raised.
    """
    with ServerProcess(command, **options) as server:
        server.wait_ready(timeout)
        yield server
        server.stop()
