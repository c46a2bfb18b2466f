"""The lingering close (nginx's ``lingering_close``): after an answer that ends a connection, shut
down writing, discard what the peer still sends (up to ``limit`` bytes, for up to ``seconds``),
then close, so that a client still writing its request reads the answer, not a broken pipe."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["LIMIT", "SECONDS", "Linger", "linger"]

SECONDS = 2.0
LIMIT = 256 * 1024


def _shut_write(transport: asyncio.WriteTransport) -> bool:
    """Half-close ``transport``; close it instead (and return False) where it cannot half-close."""
    if transport.is_closing():
        return False
    try:
        transport.write_eof()  # the client reads the answer to its end, then EOF
    except (OSError, RuntimeError, NotImplementedError):
        transport.close()
        return False
    return True


class Linger:
    """The lingering close of a protocol's ``transport``: feed what arrives to :meth:`discard`;
    :meth:`cancel` once the connection is lost."""

    __slots__ = ("_left", "_timer", "transport")

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        loop: asyncio.AbstractEventLoop,
        *,
        seconds: float = SECONDS,
        limit: int = LIMIT,
    ) -> None:
        self.transport = transport
        self._left = limit
        self._timer = loop.call_later(seconds, transport.close) if _shut_write(transport) else None

    def discard(self, size: int) -> None:
        """``size`` bytes arrived and were dropped: close once over the limit."""
        self._left -= size
        if self._left < 0:
            self.transport.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def linger(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    seconds: float = SECONDS,
    limit: int = LIMIT,
) -> None:
    """The lingering close of a stream connection, returning when the peer is done or a bound is
    hit; the caller closes ``writer`` afterwards."""
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
