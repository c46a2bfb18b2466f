"""The server's connection protocol driven in process: raw bytes in, raw bytes out, no process.

A :class:`Harness` holds one event loop and one application (started as the server starts it); each
:meth:`Harness.connect` builds the protocol exactly as the server does, on a :class:`FakeTransport`
whose socket is one end of a real ``socketpair`` (so ``SO_PEERCRED`` is read as over the server's
socket). The :class:`Peer` it returns has the few methods of a client socket the tests use
(``sendall``, ``recv``, ``settimeout``, ``close``), so ``tests.support.read_response`` reads the
answers from it; ``recv`` runs the loop until the protocol has written something or closed.

As a kernel socket does, a peer's bytes reach the protocol only while it reads (``pause_reading``
holds them back), and what the protocol writes is all "sent" at once (its write buffer stays empty):
tests of peers that read nothing need a real socket and stay process-level.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn
from uvicorn.server import ServerState

from app.config import Settings
from app.connection.protocol import PeerCredProtocol
from app.main import create_app
from app.serving.server import build_config

WAIT = 10.0
"""Seconds of loop time ``recv`` waits for the protocol: far above any answer, only there to fail."""


def new_protocol(
    config: Config,
    state: ServerState,
    app_state: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    **dependencies: Any,
) -> PeerCredProtocol:
    """The protocol for one connection, the one place tests build it: as uvicorn does, from the
    loaded ``config`` (``build_config`` gives it the server's settings), or with ``dependencies``
    (``request_timeout=``, ``held=``...) passed to its constructor."""
    factory = config.http_protocol_class
    if dependencies or getattr(factory, "func", None) is not PeerCredProtocol:  # not from build_config
        return PeerCredProtocol(config, state, app_state, loop, **dependencies)
    protocol = factory(config=config, server_state=state, app_state=app_state, _loop=loop)
    assert isinstance(protocol, PeerCredProtocol)
    return protocol


class FakeTransport(asyncio.Transport):
    """Records what the protocol writes and whether it half-closed (``write_eof``) or closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        super().__init__(extra={"socket": sock, "peername": None, "sockname": None})
        self.loop = loop
        self.protocol: PeerCredProtocol | None = None
        self.written = bytearray()
        self.eof = False
        self.closed = False
        self.reading = True
        self.inbound = bytearray()
        """The peer's bytes the protocol has not read yet (it paused reading)."""
        self.changed = asyncio.Event()

    def write(self, data: Any) -> None:
        assert not self.closed, "write after close"
        assert not self.eof, "write after write_eof"
        self.written += data
        self.changed.set()

    def write_eof(self) -> None:
        self.eof = True
        self.changed.set()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.changed.set()
            if self.protocol is not None:
                self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.loop.call_soon(self.deliver)

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def deliver(self) -> None:
        """Hand the protocol what the peer sent, if it reads (as one read, like a kernel buffer)."""
        if self.reading and self.inbound and not self.closed and self.protocol is not None:
            data = bytes(self.inbound)
            self.inbound.clear()
            self.protocol.data_received(data)


class Peer:
    """The client end of an in-process connection, used like a blocking socket with a timeout."""

    def __init__(self, harness: Harness, transport: FakeTransport, pair: tuple[socket.socket, ...]) -> None:
        self.harness = harness
        self.transport = transport
        self._pair = pair
        self._read = 0
        self.timeout = WAIT
        self.hung_up = False

    @property
    def protocol(self) -> PeerCredProtocol:
        assert self.transport.protocol is not None
        return self.transport.protocol

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = WAIT if timeout is None else timeout

    def sendall(self, data: bytes) -> None:
        """Send ``data``: the protocol reads it now if it reads; BrokenPipeError once it has closed."""
        if self.transport.closed:
            raise BrokenPipeError("the server closed the connection")
        self.transport.inbound += data
        self.transport.deliver()
        self.harness.run_ready()

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of what the protocol wrote; b"" once it half-closed or closed and all
        was read. Runs the loop meanwhile; TimeoutError after ``settimeout`` seconds of nothing."""
        transport = self.transport
        loop = self.harness.loop
        while len(transport.written) == self._read and not (transport.eof or transport.closed):
            transport.changed.clear()
            try:
                loop.run_until_complete(asyncio.wait_for(transport.changed.wait(), self.timeout))
            except TimeoutError:
                raise TimeoutError(f"the protocol wrote nothing for {self.timeout}s") from None
        chunk = bytes(transport.written[self._read : self._read + size])
        self._read += len(chunk)
        return chunk

    def close(self) -> None:
        """Hang up: the protocol loses the connection, as when a client closes its socket."""
        if not self.hung_up:
            self.hung_up = True
            if not self.transport.closed:
                self.transport.closed = True
                self.protocol.connection_lost(None)
            self.harness.run_ready()
            for end in self._pair:
                end.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Harness:
    """One event loop and one started application; :meth:`connect` opens connections to it."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.app = create_app(settings)
        self.config = build_config(settings, self.app)
        self.config.load()
        self.state = ServerState()
        self.lifespan = LifespanOn(self.config)
        self.loop.run_until_complete(self.lifespan.startup())
        assert not self.lifespan.startup_failed

    def connect(self) -> Peer:
        """A new connection, made as the server makes one (the protocol built from the config)."""
        server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        transport = FakeTransport(self.loop, server_end)
        protocol = new_protocol(self.config, self.state, self.lifespan.state, self.loop)
        transport.protocol = protocol
        protocol.connection_made(transport)
        return Peer(self, transport, (server_end, client_end))

    def run_ready(self) -> None:
        """Run the loop until the callbacks and tasks ready now have had their turn."""
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    def close(self) -> None:
        for protocol in list(self.state.connections):
            protocol.transport.close()
        self.run_ready()
        self.loop.run_until_complete(self.lifespan.shutdown())
        self.loop.close()


@contextmanager
def harness(settings: Settings | None = None) -> Iterator[Harness]:
    """A :class:`Harness` for ``settings`` (the memory store by default), closed on leaving."""
    made = Harness(settings or Settings(store="memory"))
    try:
        yield made
    finally:
        made.close()
