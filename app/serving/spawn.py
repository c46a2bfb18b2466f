"""Start a server in a child process and wait until it answers: the one helper for that job.

``uds-demo``, ``benchmarks/bench.py --spawn``, the other benchmarks and the tests start ``uds-server``
through :class:`ServerProcess`, as a command (``python -m app``, :func:`app_command`). Readiness is
polled with a deadline by the client's one wait loop (:mod:`client.wait`); a child that exits first
ends the wait at once with its exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

from client import ClientError, ConnectError, WaitTimeout
from client.wait import poll, wait_for_socket

START_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0


class SpawnError(ClientError):
    """The child server could not start, did not answer in time, or did not stop when told."""


def python_command(module: str, *args: str, python: str = sys.executable) -> list[str]:
    """``python -I -u -m module ARGS``: ``module`` from ``python``'s installation only, unbuffered.

    Isolated mode keeps the working directory, ``PYTHON*`` variables and the user's site-packages
    off the child's path: code another user planted in a world-writable directory never runs as us.
    """
    return [python, "-I", "-u", "-m", module, *args]


def app_command(*args: str, python: str = sys.executable) -> list[str]:
    """The ``uds-server`` command line: ``python -m app`` in isolated mode (:func:`python_command`)."""
    return python_command("app", *args, python=python)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def socket_dir(prefix: str = "uds") -> Path:
    """A fresh directory under /tmp with a short name: AF_UNIX paths stop at 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix + "-", dir="/tmp"))


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(server CPUs, load-generator CPUs), the first CPU and the rest; None with fewer than two."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    return {available[0]}, set(available[1:])


def probe_tcp(host: str, port: int, *, timeout: float = 5.0) -> int:
    """``GET /healthz`` over TCP; return the status or raise :class:`ConnectError`."""
    address = f"http://{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head = sock.recv(64)
    except ConnectionRefusedError as exc:
        hint = "Is a server listening there (uds-server --host HOST --port PORT)?"
        raise ConnectError(address, "connection refused", hint) from exc
    except OSError as exc:
        raise ConnectError.caused_by(address, exc) from exc
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ConnectError(address, "not an HTTP server", "Check the address.")
    return int(parts[1])


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` confining the child to ``cpus`` before it starts any thread, or None."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class ServerProcess:
    """A server command in a child process (its own session), and where it serves.

    ``socket`` or ``host``/``port`` say where :meth:`wait_ready` looks; the command must serve there.
    ``stdout`` takes the child's output, stderr included (``subprocess.PIPE``, a file, or the
    default ``DEVNULL``). ``env`` is laid over ``os.environ`` (a value of None removes the name).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        socket: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        name: str = "uds-server",
        stdout: int | IO[Any] = subprocess.DEVNULL,
        text: bool = False,
        env: Mapping[str, str | None] | None = None,
        cwd: str | Path | None = None,
        cpus: set[int] | None = None,
        data_dir: str | Path | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        """``data_dir`` becomes ``UDS_DATA_DIR`` (a ``--data-dir`` flag in the command wins): callers
        that start servers for a moment pass a temporary directory. ``pass_fds``: descriptors the
        child keeps (a listening socket handed over, say)."""
        self.command = list(command)
        self.socket = socket
        self.host = host
        self.port = port
        self.name = name
        self.ready_after: float | None = None
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if data_dir is not None:
            full_env["UDS_DATA_DIR"] = str(data_dir)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self.started = time.monotonic()
        self.proc: subprocess.Popen[Any] = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=text,
            encoding="utf-8" if text else None,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=pinned(cpus),
            pass_fds=pass_fds,
        )

    @property
    def where(self) -> str:
        return f"unix://{self.socket}" if self.socket else f"http://{self.host}:{self.port}"

    def _check_alive(self, *_: object) -> None:
        code = self.proc.poll()
        if code is not None:
            raise SpawnError(f"{self.name} exited with code {code} before it answered on {self.where}")

    def _tcp_ready(self) -> bool:
        self._check_alive()
        assert self.port is not None
        probe_tcp(self.host, self.port, timeout=1.0)
        return True

    def wait_ready(
        self, timeout: float = START_TIMEOUT, *, first_delay: float = 0.01, max_delay: float = 0.2
    ) -> Self:
        """Wait until ``GET /healthz`` gets an answer; ``ready_after`` is then the seconds since exec.

        Raise :class:`SpawnError` as soon as the child exits, or after ``timeout`` with the last error.
        """
        try:
            if self.socket is not None:
                self._check_alive()
                wait_for_socket(
                    self.socket,
                    timeout,
                    first_delay=first_delay,
                    max_delay=max_delay,
                    on_retry=self._check_alive,
                )
            elif self.port is not None:
                poll(self._tcp_ready, timeout, what=self.where, first_delay=first_delay, max_delay=max_delay)
            else:
                raise ValueError("wait_ready needs the socket or the port the server serves on")
        except (WaitTimeout, TimeoutError) as exc:
            self._check_alive()
            last = exc if isinstance(exc, WaitTimeout) else exc.__cause__
            reason = last.reason if isinstance(last, ConnectError) else repr(last)
            raise SpawnError(
                f"{self.name} did not answer on {self.where} within {timeout:g}s (last error: {reason})"
            ) from exc
        self.ready_after = time.monotonic() - self.started
        return self

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (if still running) and return the exit code; kill it and raise on a hang."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise SpawnError(
                    f"{self.name} did not stop within {timeout:g}s of {signal.Signals(sig).name}"
                ) from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def spawn(
    command: Sequence[str], *, timeout: float = START_TIMEOUT, **options: Any
) -> Iterator[ServerProcess]:
    """Start ``command``, wait until it answers, stop it with SIGTERM on leaving.

    ``options`` are :class:`ServerProcess`'s. SIGKILL ends it instead if the block raised.
    """
    with ServerProcess(command, **options) as server:
        server.wait_ready(timeout)
        yield server
        server.stop()
