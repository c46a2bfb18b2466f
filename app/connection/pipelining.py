"""HTTP/1.1 pipelining bounded by backpressure: past ``MAX_PIPELINE`` waiting requests, input is
held unparsed and reading pauses until an answer makes room."""

from __future__ import annotations

from uvicorn.protocols.http.flow_control import FlowControl

__all__ = ["BODY_UNCOUNTED", "HELD_BUDGET", "HELD_PER_PEER", "MAX_PIPELINE", "HoldingFlow", "next_cut"]

MAX_PIPELINE = 8
"""Requests parsed ahead of the one being answered on a connection; httptools parses a whole read
at once, so without a bound one read of small requests queued megabytes of parsed requests."""
HELD_BUDGET = 8 * 1024 * 1024
HELD_PER_PEER = HELD_BUDGET // 4
"""Bytes of input held unparsed, and of request bodies received but not yet read by the application,
by the whole server and by one peer uid; past them the request gets 503 (``Retry-After: 1``)."""
BODY_UNCOUNTED = 4 * 1024
"""Unread body bytes of the request being answered that draw nothing on the held-input budget:
most bodies are smaller, and cost no bookkeeping on the hot path."""
HEAD_END = b"\r\n\r\n"


class HoldingFlow(FlowControl):
    """uvicorn's flow control, except that reading stays paused while input is :attr:`held`
    (uvicorn resumes reading after every answer and whenever the application waits for a body)."""

    held: bytes = b""
    """Input read but not parsed yet, from :attr:`held_from` on."""
    held_from = 0

    def resume_reading(self) -> None:
        if self.read_paused and not self.held:
            super().resume_reading()


def next_cut(data: bytes, start: int, room: int) -> tuple[int, bool]:
    """Where the next piece of ``data[start:]`` to parse ends, and whether it ends halfway through
    a head end (``CRLF CRLF``): the piece then completes at most ``room`` heads (at least one)."""
    cut = start
    for _ in range(max(room, 1)):
        found = data.find(HEAD_END, cut)
        if found < 0:
            return len(data), False
        cut = found + 4
    return cut - 2, True
