"""The lingering close (nginx's): half-close, discard what comes (``limit`` bytes, ``seconds``), close."""

from __future__ import annotations

import asyncio
import contextlib

SECONDS = 2.0
LIMIT = 256 * 1024


def _shut_write(transport: asyncio.WriteTransport) -> bool:
    """Half-close ``transport``, or close it and return False where it cannot half-close."""
    if transport.is_closing():
        return False
    try:
        transport.write_eof()
    except (OSError, RuntimeError, NotImplementedError):
        transport.close()
        return False
    return True


class Linger:
    """A protocol's lingering close: feed what arrives to :meth:`discard`; :meth:`cancel` once lost."""

    __slots__ = ("_left", "_timer", "transport")

    def __init__(
        self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop, *, seconds: float = SECONDS
    ) -> None:
        self.transport = transport
        self._left = LIMIT
        self._timer = loop.call_later(seconds, transport.close) if _shut_write(transport) else None

    def discard(self, size: int) -> None:
        self._left -= size
        if self._left < 0:
            self.transport.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def linger(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    seconds: float = SECONDS,
    limit: int = LIMIT,
) -> None:
    """A stream connection's lingering close; the caller closes ``writer`` afterwards."""
    if not _shut_write(writer.transport):
        return
    deadline = asyncio.get_running_loop().time() + seconds
    with contextlib.suppress(OSError, TimeoutError):
        while limit > 0:
            async with asyncio.timeout_at(deadline):
                data = await reader.read(min(limit, 64 * 1024))
            if not data:
                break
            limit -= len(data)
