"""The connection protocol's per-request hooks: parsing, bounds on heads and bodies, early answers."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import httptools
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from app.connection import framing
from app.connection.framing import MAX_HEADER_BYTES, MAX_HEADERS, Refusal
from app.connection.peer import CONNECTION_KEY, PEER_KEY
from app.connection.pipelining import BODY_UNCOUNTED, HEAD_END, MAX_PIPELINE, next_cut
from app.connection.state import ConnectionState
from client.net.throttle import Throttle

_UPGRADES = Throttle(logging.getLogger("app.connections"))


class RequestHooks(ConnectionState):
    def data_received(self, data: bytes) -> None:
        if self._refused:
            if self._linger is not None:
                self._linger.discard(len(data))
            return
        flow = self.flow
        if flow.held:  # read before the pause took effect: it waits behind what is held
            held = flow.held[flow.held_from :] + data
            self._unhold()
            self._hold(held, 0)
            return
        # Fewer head ends than free places: the pipeline cannot overflow (the usual case).
        if data.count(HEAD_END) < MAX_PIPELINE - len(self.pipeline):
            self._parse(data)
        else:
            self._feed(data, 0)

    def _feed(self, data: bytes, start: int) -> None:
        """Parse ``data[start:]`` as far as the pipeline has room, then hold the rest."""
        view = memoryview(data)
        while start < len(data):
            room = MAX_PIPELINE - len(self.pipeline)
            if room <= 0 and (self._message_done or self._in_head):
                self._hold(data, start)
                return
            cut, halfway = next_cut(data, start, room)
            self._parse(view[start:cut])
            start = cut
            if self._refused or self.transport.is_closing():
                return
            if halfway and self._in_head and not self._head_bytes:
                self._head_bytes = 1  # split here: on_headers_complete measures the whole head

    def _hold(self, data: bytes, start: int) -> None:
        """Keep ``data[start:]`` unparsed and stop reading; past the held-input budget, 503."""
        if not self.held.take(len(data), self.uid):
            self._refuse(*framing.HELD_FULL)
            return
        self.flow.held = data
        self.flow.held_from = start
        self.flow.pause_reading()
        self._waiting_since = None  # the peer owes nothing: we hold its next request

    def _unhold(self) -> None:
        if self.flow.held:
            self.held.give(len(self.flow.held), self.uid)
            self.flow.held = b""

    def _release(self) -> None:
        """An answer went out: parse what was held, as far as the pipeline has room."""
        flow = self.flow
        data, start = flow.held, flow.held_from
        self._unhold()
        self._feed(data, start)
        if not flow.held and not self._refused:
            flow.resume_reading()
            if not self._message_done:
                self._await_request()  # the rest of a request is due from now

    def _parse(self, data: bytes | memoryview) -> None:
        """Feed ``data`` to the parser, with the bounds that need the reads' sizes."""
        self._unset_keepalive_if_required()
        self._chunk_bytes = size = len(data)
        begins = self._begins
        chunk_cycle = self._chunked_cycle if self._in_chunk_head else None
        body_before = len(chunk_cycle.body) if chunk_cycle is not None else 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # One throttled line, not uvicorn's two per request.
            _UPGRADES.log(logging.WARNING, "Ignored an Upgrade request: served as plain HTTP (no WebSockets)")
            return
        except httptools.HttpParserError as exc:  # our limits raise from callbacks, which ends up here
            self._refuse(*(self._reject or framing.parse_refusal(exc)))
            return
        # The head is bounded by the reads that carry it on (the one it began in may hold a body).
        if self._in_head and self._begins == begins:
            self._head_bytes += size
            if self._head_bytes > MAX_HEADER_BYTES:
                self._refuse(*framing.HEAD_TOO_LARGE)
        elif (
            chunk_cycle is not None
            and self._in_chunk_head
            and self.cycle is chunk_cycle
            and len(chunk_cycle.body) == body_before
            and not chunk_cycle.response_complete
        ):
            # A whole read after the last chunk's header and no body: trailer fields.
            self._trailer_bytes += size
            if self._trailer_bytes > MAX_HEADER_BYTES:
                self._refuse(*framing.TRAILERS_TOO_LARGE)
            elif len(self.headers) > MAX_HEADERS:
                self._refuse(*framing.TOO_MANY_TRAILERS)
        if not self._message_done and not self._in_head and self.cycle is not self._watched:
            self._watch(self.cycle)  # its body is still coming: its task may answer before it has

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.peer is not None:
            extensions: dict[Any, Any] = {PEER_KEY: dict(self.peer), CONNECTION_KEY: self.connection}
            self.scope["extensions"] = extensions
        self._in_head = True
        self._message_done = False
        self._begins += 1
        self._head_bytes = 0
        self._await_request()

    def on_headers_complete(self) -> None:
        headers = self.headers
        if len(headers) > MAX_HEADERS:
            self._fail(framing.TOO_MANY_HEADERS)
        split_or_big = self._head_bytes or self._chunk_bytes > MAX_HEADER_BYTES
        if split_or_big and len(self.url) + sum(len(n) + len(v) + 4 for n, v in headers) > MAX_HEADER_BYTES:
            self._fail(framing.HEAD_TOO_LARGE)
        host = None
        hosts = 0
        for name, value in headers:
            if name == b"host":
                host = value
                hosts += 1
        if host != self._good_host or hosts != 1:
            refusal = framing.check_host(host, hosts, self.parser.get_http_version())
            if refusal is not None:
                self._fail(refusal)
            self._good_host = host  # valid, or None (HTTP/1.0)
        if self._over_cap:
            if len(self.connections) > (self.max_connections or 0):
                self._fail(framing.FULL)
            self._over_cap = False
        self._in_head = False
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous:  # else an upgrade, which uvicorn handled
            if self._draining:
                cycle.keep_alive = False  # its task has not run yet: the answer says Connection: close
            timed = self._timed_send
            if timed is not None and self.tally is not None:  # counting (its task reads cycle.send later)
                cycle.send = timed(cycle, self.tally)  # type: ignore[method-assign, assignment]
            self._live.append(cycle)
        self.headers = []  # trailer fields (after a chunked body) land in a list of their own

    def _fail(self, refusal: Refusal) -> NoReturn:
        """Refuse from a parser callback (httptools turns the exception into a parse error)."""
        self._reject = refusal
        raise ValueError(refusal[2])

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        # The hot path: a small body of the request being answered, nothing drawn on this connection.
        if self.pipeline or self._bodies or len(cycle.body) + len(body) > BODY_UNCOUNTED:
            self._draw(cycle, len(body))
        super().on_body(body)

    def _draw(self, cycle: RequestResponseCycle, arriving: int) -> None:
        """Draw ``cycle``'s unread body plus ``arriving`` bytes on the held-input budget, or refuse."""
        if cycle.response_complete:
            return  # uvicorn drops the rest of the body
        drawn = self._bodies.get(cycle, 0)
        change = len(cycle.body) + arriving - drawn
        if change < 0:
            self.held.give(-change, self.uid)
        elif change and not self.held.take(change, self.uid):
            self._fail(framing.BODIES_FULL)
        self._bodies[cycle] = drawn + change

    def _settle_bodies(self, lost: bool = False) -> None:
        """Give back what the bodies of answered requests drew (all once the connection is ``lost``)."""
        bodies = self._bodies
        for cycle in [cycle for cycle in bodies if lost or cycle.response_complete]:
            drawn = bodies.pop(cycle)
            if drawn:
                self.held.give(drawn, self.uid)

    def _watch(self, cycle: RequestResponseCycle) -> None:
        """An answer ``cycle`` starts before its body is in says ``Connection: close``, and we close."""
        self._watched = cycle
        send = cycle.send

        def early_send(message: Any) -> Any:
            if cycle is self.cycle and not self._message_done and not self._in_head:
                if message["type"] == "http.response.start":
                    cycle.keep_alive = False  # uvicorn writes Connection: close
                elif not message.get("more_body", False):
                    cycle.keep_alive = True  # uvicorn does not close: on_response_complete lingers
            reply = send(message)
            vars(cycle).pop("send", None)  # the task holds this send: the cycle need not (no loop)
            return reply

        cycle.send = early_send  # type: ignore[method-assign]

    def on_chunk_header(self) -> None:
        self._in_chunk_head = True
        cycle = self.cycle
        if self._chunked_cycle is not cycle:  # the first chunk of this message
            self._chunked_cycle = cycle
            self._trailer_bytes = 0
            codings = [value for name, value in self.scope["headers"] if name == b"transfer-encoding"]
            if len(codings) != 1 or codings[0].strip().lower() != b"chunked":
                self._fail(framing.CODING)

    def on_chunk_complete(self) -> None:
        self._in_chunk_head = False

    def on_message_complete(self) -> None:
        trailers = self.headers  # the last chunk's on_chunk_complete came just before, after them
        if trailers:
            if len(trailers) > MAX_HEADERS:
                self._fail(framing.TOO_MANY_TRAILERS)
            if sum(len(name) + len(value) + 4 for name, value in trailers) > MAX_HEADER_BYTES:
                self._fail(framing.TRAILERS_TOO_LARGE)
        self._waiting_since = None
        self._message_done = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        live = self._live
        if len(live) == 1:
            live.clear()
        else:
            live[:] = [cycle for cycle in live if not cycle.response_complete]
        pending = self._pending
        if pending is not None:
            last = not self.pipeline  # the answer that completed was the last one owed before the error
            self._start_next()
            if last and not self.transport.is_closing():
                self._close_after(pending)
        elif self.pipeline and self.transport.get_write_buffer_size() and not self.transport.is_closing():
            # The answers are not going out: the next pipelined request waits for resume_writing.
            self._next_waits = True
            self.transport.set_write_buffer_limits(high=0)
        else:
            self._start_next()
            if not self._message_done and not self._in_head and self.cycle.response_complete:
                # Answered before the whole request came in (403, 413, 415...): parse no more of it.
                self._refused = True
                self._waiting_since = None
                self._close_after(b"")

    def _start_next(self) -> None:
        """uvicorn's end of an answer (the next pipelined request starts), then what it held goes."""
        super().on_response_complete()
        if self._bodies:
            self._settle_bodies()
        if self.flow.held and not self._refused and not self.transport.is_closing():
            self._release()
