"""What the connection protocol knows of its connection and of the request under way."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from app.connection.budget import Budget
from app.connection.deadlines import SendDeadline
from app.connection.framing import Refusal
from app.connection.peer import PeerConnection
from app.connection.pipelining import HELD_BUDGET, HELD_PER_PEER, HoldingFlow
from app.metrics.core import PeerTally, Recorder
from client.net.linger import Linger


class ConnectionState(HttpToolsProtocol):
    """The keywords: seconds to send a whole request and to read some of a paused answer, the
    connection cap (None: none), the metrics recorder (None: nothing counted) and the held-input
    budget shared by the connections (None: one of its own)."""

    flow: HoldingFlow
    _send: SendDeadline

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
        self._good_host = b"localhost"
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
