"""``--workers N``: N worker processes serve the one socket this process bound; this one supervises
(starts, replaces with a growing delay, passes SIGHUP on, stops them). docs/internals.md, "Serving"."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait

from uvicorn.config import STARTUP_FAILURE

from app.api.policy import PolicyError
from app.config import Settings
from app.logs import configure
from app.serving.notify import Notifier
from app.serving.server import SOCKET_LOST, AppFactory, Services, Stopped, early_signals, serve, signal_names
from app.serving.sockets import BoundSocket

logger = logging.getLogger("app.serving.workers")

READY = "ready"
QUICK_DEATH = 10.0  # a worker dying this soon after its start counts toward the restart delay
FIRST_DELAY = 0.5
MAX_DELAY = 10.0
CALM = 30.0  # seconds without a death after which the restart delay starts again from nothing
STOP_GRACE = 5.0  # seconds past --shutdown-timeout a worker gets to exit before it is killed
CHECK_EVERY = 1.0  # seconds between checks of the socket file, as the single-process server
_STOPS = (signal.SIGTERM, signal.SIGINT)


def describe_exit(code: int) -> str:
    """``exited with status 1`` or ``killed by signal SIGKILL`` for a ``Popen.returncode``."""
    if code >= 0:
        return f"exited with status {code}"
    with contextlib.suppress(ValueError):
        return f"killed by signal {signal.Signals(-code).name}"
    return f"killed by signal {-code}"


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    started: float = field(default_factory=time.monotonic)
    ready: float | None = None
    hangup_owed: bool = False  # a SIGHUP came while it was starting: it gets one once it serves


@dataclass(eq=False)
class Supervisor:
    """Keep ``settings.workers`` workers on ``bound`` until a stop signal; ``app_factory`` goes to
    each pickled (None: this process never imports FastAPI); ``worker_exited(pid)`` after each reap."""

    settings: Settings
    app_factory: AppFactory | None
    bound: BoundSocket
    address: str
    worker_exited: Callable[[int], None]
    notifier: Notifier
    due: dict[int, float] = field(default_factory=dict)  # slots waiting for a replacement, and when
    signals: list[int] = field(default_factory=list)
    hangups: int = 0
    announced: bool = False
    failed_starts: int = 0  # workers in a row that died before serving
    quick_deaths: int = 0
    last_death: float = float("-inf")

    def run(self) -> int:
        """Supervise until stopped; return the exit code (0 clean stop, 3 startup failure or lost socket)."""
        self.slots: list[_Worker | None] = [None] * self.settings.workers
        self._wake, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (*_STOPS, signal.SIGHUP)}
        try:
            for slot in range(len(self.slots)):
                self._start(slot)
            return self._stop(self._supervise())
        finally:
            for worker in self._live():  # an exception above: never leave a worker behind
                worker.proc.send_signal(signal.SIGKILL)
                self._reap(worker)
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake)
            os.close(wake_w)

    def _on_signal(self, sig: int, frame: object) -> None:
        if sig == signal.SIGHUP:
            self.hangups += 1
        else:
            self.signals.append(sig)

    def _supervise(self) -> int:
        next_check = time.monotonic() + CHECK_EVERY
        while True:
            wakeups = [next_check, self.notifier.next_ping, *self.due.values()]
            for worker, message in self._messages(max(0.0, min(wakeups) - time.monotonic())):
                if message is None:
                    self._died(worker)
                elif message == READY:
                    self._serving(worker)
            if self.signals:
                return 0
            if self.hangups:  # to every worker that serves; one still starting gets it once ready
                self.hangups = 0
                logger.info("Received SIGHUP: passing it to %d worker(s)", len(self._live()))
                for worker in self._live():
                    worker.hangup_owed = worker.ready is None
                    if worker.ready is not None:
                        worker.proc.send_signal(signal.SIGHUP)
            now = time.monotonic()
            self.notifier.ping_if_due(now)
            if self.quick_deaths and now - self.last_death >= CALM:
                self.quick_deaths = 0
            for slot, when in sorted(self.due.items()):
                if when <= now:
                    del self.due[slot]
                    self._start(slot)
            if self.failed_starts >= len(self.slots) and not self._live():
                logger.error(
                    "Every worker failed to start (%d in a row): see the lines above; stopping",
                    self.failed_starts,
                )
                return STARTUP_FAILURE
            if now >= next_check:
                next_check = now + CHECK_EVERY
                if self.bound.lost():
                    logger.error(SOCKET_LOST, self.address)
                    return STARTUP_FAILURE

    def _messages(self, timeout: float) -> Iterator[tuple[_Worker, object | None]]:
        """Wait up to ``timeout`` for workers or a signal; yield each message (None: pipe closed)."""
        by_conn = {worker.conn: worker for worker in self._live()}
        for item in wait([*by_conn, self._wake], timeout):
            if item == self._wake:
                os.read(self._wake, 512)  # the signals' bytes: the handlers have counted them
                continue
            worker = by_conn[item]  # type: ignore[index]
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                message = None
            yield worker, message

    def _live(self) -> list[_Worker]:
        return [worker for worker in self.slots if worker is not None]

    def _start(self, slot: int) -> _Worker:
        """Start a worker in ``slot``: a fresh interpreter given the listening socket and its pair."""
        conn, theirs = Pipe()
        listen_fd = self.bound.sock.fileno()
        try:
            proc = subprocess.Popen(
                # Isolated (-I): the working directory and PYTHON* variables stay off the worker's path.
                [sys.executable, "-I", "-m", "app.serving.workers", str(listen_fd), str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(listen_fd, theirs.fileno()),
            )
        finally:
            theirs.close()
        worker = _Worker(proc, conn)
        self.slots[slot] = worker
        # If it died at once, its end of the pair reads as closed and _supervise reaps it.
        with contextlib.suppress(OSError):
            conn.send((self.settings, self.app_factory, self.address))
        return worker

    def _serving(self, worker: _Worker) -> None:
        worker.ready = time.monotonic()
        if worker.hangup_owed:
            worker.proc.send_signal(signal.SIGHUP)
        self.failed_starts = 0
        if not self.announced and all(w is not None and w.ready is not None for w in self.slots):
            self.announced = True
            logger.info(
                "%d workers serving (pids %s)",
                len(self.slots),
                ", ".join(str(w.proc.pid) for w in self._live()),
            )
            logger.info("🔌 Server listening on %s", self.address)
            self.notifier.ready(f"Serving on {self.address} with {len(self.slots)} workers")

    def _died(self, worker: _Worker) -> None:
        """Reap a worker whose end of the pair closed, log it and schedule its replacement."""
        slot = self.slots.index(worker)
        code = self._reap(worker)
        now = time.monotonic()
        if worker.ready is None:
            self.failed_starts += 1
        delay = 0.0
        if now - worker.started <= QUICK_DEATH:
            if self.quick_deaths:
                delay = min(FIRST_DELAY * 2 ** (self.quick_deaths - 1), MAX_DELAY)
            self.quick_deaths += 1
        self.last_death = now
        when = "before serving" if worker.ready is None else f"after {now - worker.started:.1f}s of serving"
        if delay:
            then = f"starting a replacement in {delay:g}s ({self.quick_deaths} quick exits in a row)"
            self.due[slot] = now + delay
        else:
            then = f"replaced by pid {self._start(slot).proc.pid}"
        logger.warning("Worker pid %d %s %s; %s", worker.proc.pid, describe_exit(code), when, then)
        self.notifier.send(f"Worker pid {worker.proc.pid} {describe_exit(code)}; {then}")

    def _reap(self, worker: _Worker) -> int:
        """Wait for ``worker`` to exit (kill it if it lingers), free its slot; return its exit code."""
        self.slots[self.slots.index(worker)] = None
        worker.conn.close()
        try:
            code = worker.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:  # its pair closed, yet it runs on: it cannot serve us
            worker.proc.kill()
            code = worker.proc.wait()
        self.worker_exited(worker.proc.pid)
        return code

    def _stop(self, code: int) -> int:
        """Stop every worker (each drains within the shutdown timeout), then return ``code``."""
        live = self._live()
        self.due.clear()
        timeout = self.settings.shutdown_timeout
        self.notifier.send(f"Stopping {len(live)} worker(s)", "STOPPING=1")
        if self.signals:
            logger.info(
                "Received %s: stopping %d worker(s), each drains for up to %gs",
                signal_names(self.signals),
                len(live),
                timeout,
            )
        # New connections are refused once every worker has closed its copy too, as with one process.
        self.bound.sock.close()
        forwarded = len(self.signals)
        for worker in live:
            worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout + STOP_GRACE
        while self._live() and time.monotonic() < deadline:
            for worker, message in self._messages(deadline - time.monotonic()):
                if message is None:  # a late "ready" is ignored: it drains all the same
                    self._stopped(worker)
            if signal.SIGINT in self.signals[forwarded:]:  # a second Ctrl-C: workers stop without waiting
                for worker in self._live():
                    worker.proc.send_signal(signal.SIGINT)
            forwarded = len(self.signals)
        for worker in self._live():
            logger.error(
                "Worker pid %d did not stop within %gs of SIGTERM: killed",
                worker.proc.pid,
                timeout + STOP_GRACE,
            )
            worker.proc.send_signal(signal.SIGKILL)
            self._stopped(worker)
        if live:
            logger.info("All workers stopped")
        return code

    def _stopped(self, worker: _Worker) -> None:
        code = self._reap(worker)
        if code not in (0, STARTUP_FAILURE) and code != -signal.SIGKILL:
            logger.warning("Worker pid %d %s while stopping", worker.proc.pid, describe_exit(code))


def _watch_parent(conn: Connection) -> None:
    """Block until the parent's end of the pair closes (it exited or was killed), then drain."""
    with contextlib.suppress(EOFError, OSError):
        while True:
            conn.recv()
    logger.warning("Worker pid %d: the parent process is gone; stopping", os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)


def worker_main(listen_fd: int, parent_fd: int) -> int:
    """One worker: build the app from the parent's settings, serve the inherited socket; the exit code."""
    conn = Connection(parent_fd)
    with early_signals(), socket.socket(fileno=listen_fd) as sock:
        try:
            try:
                settings, app_factory, address = conn.recv()
            except (EOFError, OSError):
                return STARTUP_FAILURE  # the parent went away before it told us anything
            configure(
                settings.log_level, settings.log_format, debug=settings.debug, access_log=settings.access_log
            )
            threading.Thread(target=_watch_parent, args=(conn,), name="watch-parent", daemon=True).start()
            try:
                services = Services.build(settings)
                application = services.application(settings, app_factory)
            except PolicyError as exc:  # the file changed since the parent checked it
                logger.error("Worker pid %d: %s", os.getpid(), exc)
                return STARTUP_FAILURE
            except Exception:
                logger.error("Worker pid %d could not build the application", os.getpid(), exc_info=True)
                return STARTUP_FAILURE
            server = serve(
                settings, services, application, sock, address, on_started=lambda: conn.send(READY)
            )
        except Stopped:
            return 0
    logger.info("Worker pid %d stopped after %d request(s)", os.getpid(), server.server_state.total_requests)
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2])))
