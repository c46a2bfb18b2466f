"""Start a server in a child process and wait until it answers on its socket (the demo's helper;
benchmarks/_spawn.py extends it). A child that exits first ends the wait at once with its code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from client import ClientError, WaitTimeout
from client.wait import wait_for_socket

START_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0


class SpawnError(ClientError):
    """The child server could not start, did not answer in time, or did not stop when told."""


def python_command(module: str, *args: str, python: str = sys.executable) -> list[str]:
    """``python -I -u -m module ARGS``: isolated, so no code another user planted is on the path."""
    return [python, "-I", "-u", "-m", module, *args]


def app_command(*args: str, python: str = sys.executable) -> list[str]:
    return python_command("app", *args, python=python)


class ServerProcess:
    """A server command in its own session, serving on ``socket``; ``env`` is laid over os.environ
    (None removes a name); ``popen`` goes to Popen (``stdout`` takes stderr too)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        socket: str | None = None,
        name: str = "uds-server",
        env: Mapping[str, str | None] | None = None,
        data_dir: str | Path | None = None,
        **popen: Any,
    ) -> None:
        self.socket = socket
        self.name = name
        data = {} if data_dir is None else {"UDS_DATA_DIR": str(data_dir)}
        laid = {**os.environ, "PYTHONUNBUFFERED": "1", **data, **(env or {})}
        popen.setdefault("stdout", subprocess.DEVNULL)
        self.proc: subprocess.Popen[Any] = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            encoding="utf-8" if popen.get("text") else None,
            env={key: value for key, value in laid.items() if value is not None},
            start_new_session=True,
            **popen,
        )

    @property
    def where(self) -> str:
        return f"unix://{self.socket}"

    def check_alive(self, *_: object) -> None:
        code = self.proc.poll()
        if code is not None:
            raise SpawnError(f"{self.name} exited with code {code} before it answered on {self.where}")

    def wait_answer(self, timeout: float, first_delay: float, max_delay: float) -> None:
        """Poll until the server answers; :class:`WaitTimeout` on the deadline."""
        if self.socket is None:
            raise ValueError("wait_ready needs the socket the server serves on")
        self.check_alive()
        wait_for_socket(
            self.socket, timeout, first_delay=first_delay, max_delay=max_delay, on_retry=self.check_alive
        )

    def wait_ready(
        self, timeout: float = START_TIMEOUT, *, first_delay: float = 0.01, max_delay: float = 0.2
    ) -> Self:
        """Wait for an answer; :class:`SpawnError` once the child exits, or at ``timeout``."""
        try:
            self.wait_answer(timeout, first_delay, max_delay)
        except WaitTimeout as exc:
            self.check_alive()
            raise SpawnError(
                f"{self.name} did not answer on {self.where} within {timeout:g}s (last error: {exc.reason})"
            ) from exc
        return self

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
        self.proc.kill()  # nothing if it has exited already
        self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
