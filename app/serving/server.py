"""Run the application under uvicorn on a socket we bound ourselves, and stop it cleanly.

``run(settings)`` binds (``app.serving.sockets``), serves with httptools + uvloop and our protocol
(``app.connection.protocol``), drains on SIGTERM/SIGINT within ``shutdown_timeout``, reloads the access
policy and reopens the audit log on SIGHUP (at the next tick, on the event loop), removes the
socket on every exit path and returns the process exit code: 0 clean stop, 3 startup failure.

With ``workers`` above 1 the process binds, then hands the socket to ``app.serving.workers``, whose
worker processes each serve it through :func:`serve`; this process alone removes the socket.

A socket passed by a service manager (``app.serving.activation``) is served instead of binding one, and
left in place; with ``NOTIFY_SOCKET`` the manager hears readiness and the drain (``app.serving.notify``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Generator
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.server import HANDLED_SIGNALS

from app.api.policy import PolicyError
from app.config import Settings
from app.connection.protocol import PeerCredProtocol
from app.metrics.core import MetricsError, Recorder
from app.metrics.endpoint import LoopEndpoint, for_workers
from app.metrics.exposition import Metrics
from app.serving.activation import address_of, inherited_socket
from app.serving.notify import Notifier
from app.serving.sockets import BoundSocket, SocketError, bind_tcp, bind_unix, describe
from app.storage.store import StoreError

__all__ = ["STARTUP_FAILURE", "UdsConfig", "UdsServer", "build_config", "note_hangup", "run", "serve"]

if TYPE_CHECKING:
    from app.api.access import Access

logger = logging.getLogger("app.serving.server")

SOCKET_LOST = (
    "Socket %s was removed or replaced by another program: clients cannot reach this server; stopping"
)
"""The error line (``%s``: the address) of a server, or a ``--workers`` parent, whose socket file went."""


_hangups: list[int] = []
"""SIGHUPs received and not yet acted on; the server's tick takes them (a handler does no I/O)."""


def note_hangup(sig: int, frame: FrameType | None) -> None:
    """The SIGHUP handler, for the whole life of a serving process (the default action would kill it)."""
    _hangups.append(sig)


class _Stopped(Exception):
    """A stop signal arrived before the server was serving."""


class UdsConfig(uvicorn.Config):
    """uvicorn's Config plus the deadlines our protocol (``app.connection.protocol``) enforces."""

    def __init__(self, app: Any, *, request_timeout: float, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.request_timeout = request_timeout
        """Seconds a client has to send a whole request (head and body)."""
        self.send_timeout = send_timeout
        """Seconds a response may make no write progress before the connection is closed."""
        self.recorder: Recorder | None = None
        """Where the protocol counts requests for ``/metrics`` (``app.metrics.core``)."""


class UdsServer(uvicorn.Server):
    """uvicorn's Server that marks the app draining, logs the drain and exits 0 after a signal.

    Once serving it logs the demo line, or, given ``on_started`` (a worker process, whose parent
    logs that line once for all workers), calls it instead.
    """

    def __init__(
        self,
        config: UdsConfig,
        app: Any,
        address: str,
        on_started: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(config)
        self.app = app
        self.address = address
        self.on_started = on_started
        self.metrics = metrics
        if self.metrics is not None:
            self.metrics.open_connections = lambda: len(self.server_state.connections)
        self.drained = False
        self.signals: list[int] = []
        self.bound: BoundSocket | None = None
        self.socket_lost = False
        self.endpoint: LoopEndpoint | None = None
        """The ``--metrics-listen`` endpoint this server's loop serves, if any."""
        self.notifier = Notifier()
        """Tells the service manager when this server serves and drains (a worker's tells nobody)."""
        self.access: Access | None = getattr(getattr(app, "state", None), "access", None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        state = getattr(self.app, "state", None)
        if state is not None:
            state.draining = True  # /readyz answers 503 from now on
            events = getattr(state, "events", None)
            if events is not None:
                events.drain_soon()  # every event stream gets `shutdown` and ends: no wait on them
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's, without re-raising the captured signal once the server has stopped.

        uvicorn raises a captured SIGTERM/SIGINT again after the graceful shutdown, when its own
        handlers are gone; ``run()`` must instead remove the socket and return 0. The signals are
        forgotten just before that (``self.signals`` keeps them for the drain log). The list is
        uvicorn's private ``_captured_signals``: tests/app/test_server_process.py fails loudly if
        uvicorn renames it or re-raises another way.
        """
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.endpoint is not None:
            await self.endpoint.start()
        if self.started:
            if self.on_started is None:
                logger.info("🔌 Server listening on %s", self.address)
                self.notifier.ready(f"Serving on {self.address}")
            else:
                self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        import asyncio

        state = self.server_state
        names = ", ".join(signal.Signals(s).name for s in self.signals) or "a stop request"
        busy = len(state.tasks)
        self.notifier.stopping(f"Draining {len(state.connections)} connection(s) after {names}")
        logger.info(
            "Received %s: draining %d connection(s), %d request(s) in flight (up to %gs)",
            names,
            len(state.connections),
            busy,
            self.config.timeout_graceful_shutdown or 0,
        )
        loop = asyncio.get_running_loop()
        began = loop.time()
        if self.endpoint is not None:
            self.endpoint.close()
        await super().shutdown(sockets=sockets)
        took = loop.time() - began
        if self.metrics is not None:
            self.metrics.flush()  # the last gauges, for a parent still serving --workers' metrics
        if self.access is not None and self.access.audit is not None:
            self.access.audit.close()  # the last lines, and the count of refusals not itemized
        if self.drained:
            logger.info("Drain done in %.2fs: all requests finished", took)
        elif self.force_exit:
            logger.warning("Drain cut short after %.2fs by a second signal", took)
        else:
            logger.warning("Drain timed out after %.2fs: unfinished requests were cancelled", took)

    async def on_tick(self, counter: int) -> bool:
        """Every tick (0.1 s) write the metrics' gauges (``--workers``: to the worker's file); once a
        second, stop (exit 3) if another program removed or replaced our socket file. After a SIGHUP,
        reload the access policy (the next request sees it); write the audit lines queued."""
        if self.metrics is not None:
            self.metrics.flush()
        self.notifier.ping_if_due()
        access = self.access
        if _hangups:
            _hangups.clear()
            if access is not None:
                access.reload()
        if access is not None and access.audit is not None:
            access.audit.flush()
        if counter % 10 == 0 and self.bound is not None and self.bound.in_place() is not True:
            if not self.socket_lost:
                self.socket_lost = True
                logger.error(SOCKET_LOST, self.address)
            return True
        return await super().on_tick(counter)

    async def _wait_tasks_to_complete(self) -> None:
        await super()._wait_tasks_to_complete()
        self.drained = True


def build_config(settings: Settings, app: Any, metrics: Metrics | None = None) -> UdsConfig:
    """The uvicorn Config for ``settings``: httptools + uvloop, our protocol, our logging."""
    config = UdsConfig(
        app,
        request_timeout=settings.request_timeout,
        send_timeout=settings.send_timeout,
        loop="uvloop",
        http=PeerCredProtocol,
        ws="none",
        lifespan="on",
        log_config=None,
        log_level=None,
        access_log=settings.access_log,
        proxy_headers=False,
        server_header=False,
        limit_concurrency=settings.max_connections,
        # uvicorn types these as int but schedules them with call_later, which takes seconds as float.
        timeout_keep_alive=cast(int, settings.keepalive_timeout),
        timeout_graceful_shutdown=cast(int, settings.shutdown_timeout),
    )
    config.recorder = metrics.recorder if metrics is not None else None
    return config


def bind(settings: Settings, inherited: BoundSocket | None = None) -> tuple[BoundSocket, str]:
    """Bind the listening socket named by ``settings``, unless one was ``inherited`` from a service
    manager; return it and the address to log."""
    if inherited is not None:
        address = address_of(inherited.sock)
        unused = "" if settings.socket == address else f"; --socket {settings.socket} is not used"
        details = ""
        mode = 0
        if address.startswith("/"):
            with contextlib.suppress(OSError):  # its file may be gone: the socket still serves
                details = f": {describe(address)}"
                mode = os.lstat(address).st_mode
        logger.info("Socket %s passed by the service manager%s%s", address, details, unused)
        if mode & 0o002:
            logger.warning(
                "Socket %s is writable by every user (mode %04o): any local user can call the API; "
                "set SocketMode=0660 and SocketGroup= in its .socket unit",
                address,
                mode & 0o777,
            )
        return inherited, address
    if settings.uses_tcp:
        host = settings.host or "127.0.0.1"
        bound = bind_tcp(host, settings.port or 0)
        port = bound.sock.getsockname()[1]
        return bound, f"http://{host}:{port}"
    bound = bind_unix(settings.socket, settings.socket_mode, settings.socket_group)
    logger.info("Socket %s: %s", settings.socket, describe(settings.socket))
    return bound, settings.socket


def run(settings: Settings, app_factory: Callable[..., Any] | None = None) -> int:
    """Serve until stopped; return the exit code (0 clean stop, 3 startup failure)."""
    previous = {sig: signal.signal(sig, _stop_early) for sig in HANDLED_SIGNALS}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, note_hangup)
    bound: BoundSocket | None = None
    notifier = Notifier.from_environ(os.environ)
    try:
        inherited = inherited_socket(os.environ)  # before anything starts a child process
        from app.storage.sqlite import prepare_store

        prepare_store(settings)  # the data directory and the database, checked before binding
        if settings.workers > 1:
            from app.serving.workers import Supervisor, SupervisorHooks

            bound, address = bind(settings, inherited)
            with for_workers(settings) as worker_gone:  # the workers' metrics directory and the one endpoint

                class Hooks(SupervisorHooks):
                    def worker_exited(self, pid: int) -> None:
                        worker_gone(pid)

                return Supervisor(settings, app_factory, bound, address, Hooks(), notifier).run()
        if app_factory is None:  # here, not above: a --workers parent never imports FastAPI
            from app.main import create_app

            app_factory = create_app
        metrics = Metrics.for_settings(settings, os.environ)
        application = app_factory(settings, metrics=metrics)
        bound, address = bind(settings, inherited)
        endpoint = (
            LoopEndpoint(settings.metrics_listen, metrics.rendered) if settings.metrics_listen else None
        )
        try:
            server = serve(
                settings,
                application,
                bound.sock,
                address,
                bound=bound if bound.path is not None else None,  # TCP and inherited: no file to watch
                endpoint=endpoint,
                notifier=notifier,
                metrics=metrics,
            )
        finally:
            if endpoint is not None:
                endpoint.close()
        return 0 if server.started and not server.socket_lost else STARTUP_FAILURE
    except _Stopped:
        logger.info("Stopped before serving")
        return 0
    except (SocketError, StoreError, MetricsError, PolicyError) as exc:
        logger.error("%s", exc)
        notifier.status(f"Failed to start: {exc}")
        return STARTUP_FAILURE
    finally:
        notifier.close()
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # nothing may interrupt the cleanup below
        if bound is not None:
            bound.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    settings: Settings,
    application: Any,
    sock: socket.socket,
    address: str,
    *,
    bound: BoundSocket | None = None,
    on_started: Callable[[], None] | None = None,
    endpoint: LoopEndpoint | None = None,
    notifier: Notifier | None = None,
    metrics: Metrics | None = None,
) -> UdsServer:
    """Serve ``application`` on the listening ``sock`` until stopped; return the finished server.

    ``bound``: the socket file to check once a second (stop if it is removed or replaced).
    ``notifier``: tells the service manager when it serves and drains (None: nobody is told).
    """
    from app.connection.protocol import connection_cap, raise_open_file_limit

    open_files, _ = raise_open_file_limit()
    config = build_config(settings, application, metrics)
    # Connections past the open-file limit would fail silently at accept(): cap them below it.
    config.limit_concurrency = connection_cap(config.limit_concurrency, open_files)
    server = UdsServer(config, application, address, on_started, metrics)
    server.bound = bound
    server.endpoint = endpoint
    if notifier is not None:
        server.notifier = notifier
    server.run(sockets=[sock])
    return server


def _stop_early(sig: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(sig).name)
