"""Tell a service manager how the server is doing: systemd's ``sd_notify(3)``. A failed send is
dropped with one warning, never stopping the server; without ``NOTIFY_SOCKET`` nothing is sent."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import MutableMapping

from app.logs import escaped

logger = logging.getLogger("app.serving.notify")

VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notifications to ``address`` (None: sends nothing); pings every ``watchdog_every`` s."""

    def __init__(self, address: str | bytes | None = None, watchdog_every: float | None = None) -> None:
        self.address = address
        self.watchdog_every = watchdog_every if address is not None else None  # half the manager's timeout
        self.next_ping = time.monotonic() if self.watchdog_every else math.inf
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Notifier:
        """The notifier ``environ`` asks for; removes the variables so that workers never notify."""
        raw, usec, watchdog_pid = (environ.pop(name, None) for name in VARIABLES)
        if not raw or raw[0] not in "@/":
            if raw:
                logger.warning(
                    "NOTIFY_SOCKET=%s is neither a path nor @abstract: the service manager is not told "
                    "when the server is ready",
                    escaped(raw),
                )
            return cls()
        address = b"\0" + os.fsencode(raw[1:]) if raw[0] == "@" else raw
        every = None
        if usec and (watchdog_pid is None or watchdog_pid.strip() == str(os.getpid())):
            timeout = int(usec) / 1e6 if usec.strip().isdecimal() else 0.0
            if timeout > 0:
                every = timeout / 2
            else:
                logger.warning("WATCHDOG_USEC=%s is not a positive number: no watchdog pings", escaped(usec))
        return cls(address, every)

    def send(self, status: str | None, *lines: str) -> None:
        """``STATUS=status`` and ``lines`` (``KEY=value``) in one datagram; one warning on failure."""
        if self.address is None:
            return
        if status is not None:
            lines = (*lines, "STATUS=" + " ".join(escaped(status).split()))
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                shown = self.address if isinstance(self.address, str) else "@" + os.fsdecode(self.address[1:])
                logger.warning(
                    "Could not notify the service manager at %s (%s): it may not learn the server's "
                    "state; serving on",
                    escaped(shown),
                    exc.strerror or exc,
                )

    def ready(self, status: str) -> None:
        self.send(status, "READY=1", f"MAINPID={os.getpid()}")

    def ping_if_due(self, now: float | None = None) -> None:
        """``WATCHDOG=1`` if ``watchdog_every`` seconds have passed since the last ping."""
        now = time.monotonic() if now is None else now
        if self.watchdog_every is not None and now >= self.next_ping:
            self.next_ping = now + self.watchdog_every
            self.send(None, "WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
