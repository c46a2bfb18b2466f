"""The uvicorn server on a socket we bound, in ``uds-server`` or in each ``--workers`` worker:
drain on SIGTERM/SIGINT, reload on SIGHUP, exit codes. See docs/internals.md, "Serving"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from app.config import Settings
from app.connection.protocol import protocol_factory
from app.metrics.core import Recorder
from app.metrics.endpoint import LoopEndpoint
from app.serving.notify import Notifier
from app.serving.sockets import BoundSocket
from client.net.limits import connection_cap, raise_open_file_limit

if TYPE_CHECKING:  # a --workers parent imports this module and never builds these (nor FastAPI)
    from app.api.access import Access
    from app.metrics.exposition import Metrics
    from app.storage.events import EventHub
    from app.storage.store import Store

logger = logging.getLogger("app.serving.server")

SOCKET_LOST = (
    "Socket %s was removed or replaced by another program: clients cannot reach this server; stopping"
)

AppFactory = Callable[..., Any]  # create_app(settings, *, store, hub, metrics, access) or a stand-in

_hangups: list[int] = []  # SIGHUPs not yet acted on; the server's tick takes them (a handler does no I/O)


class Stopped(BaseException):
    """A stop signal before serving (a BaseException: no ``except Exception`` may take it)."""


def _early(sig: int, frame: FrameType | None) -> None:
    if sig != signal.SIGHUP:
        raise Stopped(signal.Signals(sig).name)
    _hangups.append(sig)


@contextlib.contextmanager
def early_signals() -> Iterator[None]:
    """Until uvicorn's handlers take over: SIGTERM/SIGINT raise :class:`Stopped`, SIGHUP waits for a tick."""
    previous = {sig: signal.signal(sig, _early) for sig in (*HANDLED_SIGNALS, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def signal_names(signals: list[int]) -> str:
    return ", ".join(signal.Signals(s).name for s in signals)


@dataclass(slots=True)
class Services:
    """What the application is given and the server itself uses (docs/internals.md, "Layout")."""

    store: Store
    hub: EventHub
    metrics: Metrics
    access: Access

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Built in each serving process; raises ``PolicyError`` on a bad policy file."""
        from app.api.access import Access
        from app.api.versions import API_VERSIONS
        from app.metrics.exposition import DIR_ENV, Metrics
        from app.storage.events import EventHub, stream_capacity
        from app.storage.sqlite import build_store

        store = build_store(settings)  # not opened yet: the application's lifespan opens it
        hub = EventHub(store, stream_capacity(settings.max_streams, settings.workers))
        # With --workers, this worker's file goes in the directory the parent names.
        metrics = Metrics(directory=os.environ.get(DIR_ENV), shown_uids=settings.metrics_uid)
        return cls(store, hub, metrics, Access(settings, API_VERSIONS))

    def application(self, settings: Settings, factory: AppFactory | None = None) -> Any:
        """The application ``factory`` (default ``app.main.create_app``) builds with these services."""
        if factory is None:
            from app.main import create_app

            factory = create_app
        return factory(settings, store=self.store, hub=self.hub, metrics=self.metrics, access=self.access)


class UdsServer(uvicorn.Server):
    """uvicorn's Server that drains, logs and exits 0 after a signal. Once serving it logs the demo
    line and tells ``notifier``, or calls ``on_started`` (a worker: its parent does both)."""

    def __init__(
        self,
        config: uvicorn.Config,
        address: str,
        services: Services,
        on_started: Callable[[], None] | None = None,
        *,
        bound: BoundSocket | None = None,
        endpoint: LoopEndpoint | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        super().__init__(config)
        self.address = address
        self.services = services
        self.on_started = on_started
        services.metrics.open_connections = lambda: len(self.server_state.connections)
        self.drained = False
        self.signals: list[int] = []
        self.bound = bound
        self.socket_lost = False
        self.endpoint = endpoint
        self.notifier = notifier or Notifier()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        self.services.hub.drain_soon()  # /readyz answers 503 from now on; event streams end
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's, without re-raising the signal once stopped (private: docs/internals.md, "Signals")."""
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started:
            return
        if self.endpoint is not None:
            await self.endpoint.start()
        if self.on_started is None:
            logger.info("🔌 Server listening on %s", self.address)
            self.notifier.ready(f"Serving on {self.address}")
        else:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self.server_state
        names = signal_names(self.signals) or "a stop request"
        self.notifier.send(f"Draining {len(state.connections)} connection(s) after {names}", "STOPPING=1")
        logger.info(
            "Received %s: draining %d connection(s), %d request(s) in flight (up to %gs)",
            names,
            len(state.connections),
            len(state.tasks),
            self.config.timeout_graceful_shutdown or 0,
        )
        loop = asyncio.get_running_loop()
        began = loop.time()
        if self.endpoint is not None:
            self.endpoint.close()
        await super().shutdown(sockets=sockets)
        took = loop.time() - began
        self.services.metrics.flush()  # the last gauges, for a parent still serving --workers' metrics
        if self.services.access.audit is not None:
            self.services.access.audit.close()  # the last lines, and the count of refusals not itemized
        if self.drained:
            logger.info("Drain done in %.2fs: all requests finished", took)
        elif self.force_exit:
            logger.warning("Drain cut short after %.2fs by a second signal", took)
        else:
            logger.warning("Drain timed out after %.2fs: unfinished requests were cancelled", took)

    async def on_tick(self, counter: int) -> bool:
        """Flush gauges and audit lines, reload after SIGHUP; stop (exit 3) once our socket file is lost."""
        self.notifier.ping_if_due()
        access = self.services.access
        hangup = bool(_hangups)
        _hangups.clear()  # before the reload: a SIGHUP during it asks for the next one
        self.services.metrics.flush()
        if hangup:
            access.reload()
        if access.audit is not None:
            access.audit.flush()
        if counter % 10 == 0 and self.bound is not None and self.bound.lost():
            self.socket_lost = True  # uvicorn stops ticking once this returns True
            logger.error(SOCKET_LOST, self.address)
            return True
        return await super().on_tick(counter)

    async def _wait_tasks_to_complete(self) -> None:
        await super()._wait_tasks_to_complete()
        self.drained = True


def build_config(
    settings: Settings, app: Any, recorder: Recorder | None = None, max_connections: int | None = None
) -> uvicorn.Config:
    """The uvicorn Config for ``settings``; ``max_connections`` replaces the setting if given."""
    http = protocol_factory(
        request_timeout=settings.request_timeout,
        send_timeout=settings.send_timeout,
        max_connections=settings.max_connections if max_connections is None else max_connections,
        recorder=recorder,
    )
    return uvicorn.Config(
        app,
        loop="uvloop",
        http=cast(type[asyncio.Protocol], http),  # uvicorn calls it as it would a protocol class
        ws="none",
        lifespan="on",
        log_config=None,
        log_level=None,
        access_log=settings.access_log,
        proxy_headers=False,
        server_header=False,
        # uvicorn types these as int but schedules them with call_later, which takes seconds as float.
        timeout_keep_alive=cast(int, settings.keepalive_timeout),
        timeout_graceful_shutdown=cast(int, settings.shutdown_timeout),
    )


def serve(
    settings: Settings,
    services: Services,
    application: Any,
    sock: socket.socket,
    address: str,
    **options: Any,
) -> UdsServer:
    """Serve ``application`` on ``sock`` until stopped; ``options`` go to :class:`UdsServer`."""
    open_files, _ = raise_open_file_limit()
    # Connections past the open-file limit would fail silently at accept(): cap them below it.
    cap = connection_cap(settings.max_connections, open_files)
    config = build_config(settings, application, services.metrics.recorder, cap)
    server = UdsServer(config, address, services, **options)
    try:
        server.run(sockets=[sock])
    finally:
        if server.endpoint is not None:
            server.endpoint.close()
    return server
