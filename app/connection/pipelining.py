"""HTTP/1.1 pipelining bounded: past ``MAX_PIPELINE`` waiting requests, input is held unparsed."""

from __future__ import annotations

from uvicorn.protocols.http.flow_control import FlowControl

MAX_PIPELINE = 8  # requests parsed ahead of the one being answered
HELD_BUDGET = 8 * 1024 * 1024  # bytes held unparsed or unread by the application, in all (503 past it)
HELD_PER_PEER = HELD_BUDGET // 4  # and by one peer uid
BODY_UNCOUNTED = 4 * 1024  # unread body bytes of the request being answered that draw nothing
HEAD_END = b"\r\n\r\n"


class HoldingFlow(FlowControl):
    """uvicorn's flow control, except that reading stays paused while input is :attr:`held`."""

    held: bytes = b""  # input read but not parsed yet, from held_from on
    held_from = 0

    def resume_reading(self) -> None:
        if self.read_paused and not self.held:
            super().resume_reading()


def next_cut(data: bytes, start: int, room: int) -> tuple[int, bool]:
    """The end of a piece of ``data[start:]`` with at most ``room`` heads (1+); if it splits CRLF CRLF."""
    cut = start
    for _ in range(max(room, 1)):
        found = data.find(HEAD_END, cut)
        if found < 0:
            return len(data), False
        cut = found + 4
    return cut - 2, True
