"""``uds-server``'s life: prepare the store, bind (or take the service manager's socket), serve,
remove the socket on every exit path; exit 0 after a clean stop, 3 after a startup failure."""

from __future__ import annotations

import logging
import os
import signal

from uvicorn.config import STARTUP_FAILURE
from uvicorn.server import HANDLED_SIGNALS

from app.api.policy import PolicyError
from app.config import Settings
from app.metrics.core import MetricsError
from app.metrics.endpoint import LoopEndpoint, for_workers
from app.serving.activation import announce, inherited_socket
from app.serving.notify import Notifier
from app.serving.private_dir import SocketError
from app.serving.server import AppFactory, Services, Stopped, early_signals, serve
from app.serving.sockets import BoundSocket, bind_tcp, bind_unix, describe
from app.serving.workers import Supervisor
from app.storage.schema import prepare_store
from app.storage.store import StoreError

logger = logging.getLogger("app.serving.server")


def bind(settings: Settings, inherited: BoundSocket | None = None) -> tuple[BoundSocket, str]:
    """The listening socket ``settings`` name, unless one was ``inherited``; with the address to log."""
    if inherited is not None:
        return inherited, announce(inherited.sock, settings.socket)
    if settings.uses_tcp:
        host = settings.host or "127.0.0.1"
        bound = bind_tcp(host, settings.port or 0)
        return bound, f"http://{host}:{bound.sock.getsockname()[1]}"
    bound = bind_unix(settings.socket, settings.socket_mode, settings.socket_group)
    logger.info("Socket %s: %s", settings.socket, describe(settings.socket))
    return bound, settings.socket


def run(settings: Settings, app_factory: AppFactory | None = None) -> int:
    """Serve until stopped (with ``--workers`` above 1, supervise the workers); the exit code."""
    bound: BoundSocket | None = None
    notifier = Notifier.from_environ(os.environ)
    with early_signals():
        try:
            inherited = inherited_socket(os.environ)  # before anything starts a child process
            prepare_store(settings)  # the data directory and the database, checked before binding
            if settings.workers > 1:  # this process never builds an application (nor imports FastAPI)
                bound, address = bind(settings, inherited)
                with for_workers(settings) as worker_exited:  # the workers' metrics and the one endpoint
                    return Supervisor(settings, app_factory, bound, address, worker_exited, notifier).run()
            services = Services.build(settings)
            application = services.application(settings, app_factory)
            bound, address = bind(settings, inherited)
            listen = settings.metrics_listen
            endpoint = LoopEndpoint(listen, services.metrics.rendered) if listen is not None else None
            options = {"bound": bound, "endpoint": endpoint, "notifier": notifier}
            server = serve(settings, services, application, bound.sock, address, **options)
            return 0 if server.started and not server.socket_lost else STARTUP_FAILURE
        except Stopped:
            logger.info("Stopped before serving")
            return 0
        except (SocketError, StoreError, MetricsError, PolicyError) as exc:
            logger.error("%s", exc)
            notifier.send(f"Failed to start: {exc}")
            return STARTUP_FAILURE
        finally:
            notifier.close()
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)  # nothing may interrupt the cleanup below
            if bound is not None:
                bound.close()
