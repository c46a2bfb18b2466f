"""What the connection protocol knows of its connection, and its error answers (then a lingering close)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from app.connection import framing
from app.connection.capacity import Budget, CapLog, logger
from app.connection.framing import Refusal
from app.connection.peer import PeerConnection
from app.connection.pipelining import HELD_BUDGET, HELD_PER_PEER, HoldingFlow
from app.metrics.core import PeerTally, Recorder
from client.net.answers import error_response
from client.net.linger import Linger
from client.net.throttle import Throttle

_CLOSE = (("connection", "close"),)
_RETRY = (("retry-after", "1"), *_CLOSE)
CAP_LOG = CapLog()
_REJECTED = Throttle(logger)


class ConnectionState(HttpToolsProtocol):
    """``held``: the held-input budget shared by the connections (None: one of its own)."""

    flow: HoldingFlow

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        request_timeout: float = 30.0,
        send_timeout: float = 30.0,
        max_connections: int | None = None,
        recorder: Recorder | None = None,
        held: Budget | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.limit_concurrency = None  # uvicorn's check answers plain text and never makes room
        self.held = held if held is not None else Budget(HELD_BUDGET, HELD_PER_PEER)
        self.recorder = recorder
        self._timed_send = recorder.timed_send if recorder is not None else None
        self.tally: PeerTally | None = None
        self.peer: dict[str, int] | None = None
        self.uid: int | None = None
        self.connection: PeerConnection | None = None
        self._deadline: asyncio.Handle | None = None
        self._waiting_since: float | None = None  # since when the peer owes a complete request
        self._in_head = False
        self._message_done = True
        self._begins = 0
        self._chunk_bytes = 0
        self._head_bytes = 0  # bytes of reads that continued an unfinished head (a lower bound)
        self._reject: Refusal | None = None
        self._refused = False  # an error was answered or waits to be: the rest of the input is ignored
        self._pending: bytes | None = None  # an error answer waiting for the answers owed before it
        self._good_host: bytes | None = b"localhost"
        self._in_chunk_head = False
        self._chunked_cycle: RequestResponseCycle | None = None
        self._watched: RequestResponseCycle | None = None
        self._trailer_bytes = 0
        self._over_cap = False
        self._linger: Linger | None = None
        self._draining = False
        self._live: list[RequestResponseCycle] = []  # the cycles not answered yet, in order
        self._next_waits = False  # a pipelined request waits for the answers before it to leave our buffer
        self._bodies: dict[RequestResponseCycle, int] = {}  # what each unanswered body draws on ``held``

    def _refuse(self, status: int, error: str, message: str, *, log: bool = True) -> None:
        """Answer ``status`` and close, after any answers owed to requests pipelined before this one."""
        self._refused = True
        self._reject = None
        self._waiting_since = None
        if (status, error, message) == framing.FULL:
            CAP_LOG.note(self.loop, self.max_connections or 0, "refused")
        elif log:
            _REJECTED.log(logging.WARNING, "Rejected a request with %d: %s", status, message)
        if self.transport.is_closing():
            return
        if self.recorder is not None and self.tally is not None:
            self.recorder.refused(self._method(), status, self.tally)
        answer = error_response(status, error, message, headers=_RETRY if status == 503 else _CLOSE)
        cycle = self.cycle
        if cycle is not None and not self._in_head and not self._message_done:
            # The error is in the body of the request being parsed, whose answer may be under way.
            waiting = next((item for item in self.pipeline if item[0] is cycle), None)
            if waiting is not None:
                self.pipeline.remove(waiting)  # never run; earlier requests are still being answered
                self._pending = answer
                return
            if cycle.response_started:
                self.transport.close()  # its answer is (being) sent; the rest of it is not read
                return
            cycle.disconnected = True  # the application waits for a body that will not come
            cycle.message_event.set()
        elif cycle is not None and not cycle.response_complete:
            self._pending = answer  # answer the requests before this one first
            self.flow.pause_reading()
            return
        self._close_after(answer)

    def _method(self) -> str:
        """The method of the request being refused, as far as it was parsed (else ``unknown``)."""
        method = self.scope.get("method") if self._begins else None
        if method is None and self._begins and self.url:  # the method comes before the target
            with contextlib.suppress(httptools.HttpParserError, UnicodeDecodeError):
                method = self.parser.get_method().decode("ascii")
        return method or "unknown"

    def _close_after(self, answer: bytes) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(answer)  # b"" writes nothing
        if self._linger is None:
            self._linger = Linger(self.transport, self.loop)

    def _await_request(self) -> None:
        """The peer owes a complete request from now (if not already), within ``request_timeout``."""
        if self._waiting_since is None:
            self._waiting_since = self.loop.time()
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        since = self._waiting_since
        if since is None or self.transport.is_closing():
            return  # idle between requests: uvicorn's keep-alive timeout takes over
        remaining = since + self.request_timeout - self.loop.time()
        if remaining > 0:
            self._deadline = self.loop.call_later(remaining, self._on_deadline)
            return
        self._waiting_since = None
        cycle = self.cycle
        if not self._in_head and (cycle is None or cycle.response_started):
            if cycle is None or cycle.response_complete:
                logger.info("Closed a connection that sent no request for %gs", self.request_timeout)
            self.transport.close()  # else the application answers without the late body
            return
        logger.warning(
            "Request not complete after %gs: answered 408 and closed the connection", self.request_timeout
        )
        late = f"the request was not complete within {self.request_timeout:g}s; send it faster"
        self._refuse(408, "request_timeout", late, log=False)
