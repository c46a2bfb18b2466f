"""The connection protocol's error answers: in the JSON error shape, after the answers owed to
requests pipelined before, then a lingering close; and the request deadline's 408."""

from __future__ import annotations

import contextlib
import logging

import httptools

from app.connection import framing
from app.connection.capacity import CapLog
from app.connection.state import ConnectionState
from client.net.answers import error_response
from client.net.linger import Linger
from client.net.throttle import Throttle

_CLOSE = (("connection", "close"),)
_RETRY = (("retry-after", "1"), *_CLOSE)
logger = logging.getLogger("app.connections")
CAP_LOG = CapLog()
_REJECTED = Throttle(logger)


class Refusals(ConnectionState):
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
        """Write ``answer``, then close lingering (``client.net.linger``)."""
        if self.transport.is_closing():
            return
        if answer:
            self.transport.write(answer)
        if self._linger is None:
            self._linger = Linger(self.transport, self.loop)

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
        # The application, if it waits for the body, learns that the client is gone.
        late = f"the request was not complete within {self.request_timeout:g}s; send it faster"
        self._refuse(408, "request_timeout", late, log=False)
