"""Helpers shared by the integration tests: short socket paths, real server processes, polling.

Tests never sleep and hope: they poll with a deadline and put the last error in the failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from app.serving import spawn
from benchmarks._spawn import poll, socket_dir
from client.wait import probe

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
_SIGTERM = signal.SIGTERM  # the class below has a method named signal


short_tmpdir = socket_dir
"""A fresh directory under /tmp with a short name (AF_UNIX paths stop at 107 bytes)."""


def wait_until(
    check: Callable[[], T | None], *, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"
) -> T:
    """Call ``check`` until it returns something other than None/False, or fail after ``timeout``.

    Exceptions raised by ``check`` count as "not yet"; the last one is reported on failure. The
    loop is :func:`benchmarks._spawn.poll`, the one the benchmarks use; its pause
    grows from ``interval`` to 50 ms at most (a test's wait ends soon after its condition holds).
    """
    try:
        return poll(
            check, timeout, what=what, retry_on=Exception, first_delay=interval, max_delay=max(interval, 0.05)
        )
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def http_over_uds(
    path: str,
    method: str = "GET",
    target: str = "/healthz",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One raw HTTP/1.1 request over the socket, stdlib only; returns (status, body)."""
    import http.client

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)

    conn = _Conn("localhost", timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _fill(conn: socket.socket, buffer: bytearray) -> bool:
    """Append what ``conn`` has to ``buffer``; False once the peer has closed."""
    chunk = conn.recv(65536)
    buffer += chunk
    return bool(chunk)


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def read_head(conn: socket.socket, buffer: bytearray) -> tuple[bytes, dict[str, str]] | None:
    """The next message head (start line and headers) from ``conn``; None if the peer closes first.

    ``buffer`` holds bytes already read and keeps those that follow the head.
    """
    while b"\r\n\r\n" not in buffer:
        if not _fill(conn, buffer):
            return None
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    buffer[:] = rest
    return head, _headers(head)


Message = tuple[bytes, dict[str, str], bytes]
"""A raw HTTP message: head (start line and headers), headers by lowercase name, body."""


def read_message(conn: socket.socket, buffer: bytearray | None = None) -> Message | None:
    """One raw HTTP/1.1 request or response framed by Content-Length: (head, headers, body).

    None if the peer closes before the whole message; bytes past it stay in ``buffer``.
    """
    if buffer is None:
        buffer = bytearray()
    found = read_head(conn, buffer)
    if found is None:
        return None
    head, headers = found
    length = int(headers.get("content-length", "0"))
    while len(buffer) < length:
        if not _fill(conn, buffer):
            return None
    body = bytes(buffer[:length])
    del buffer[:length]
    return head, headers, body


def response_status(head: bytes) -> int:
    return int(head.split(None, 2)[1])


def read_response(conn: socket.socket, buffer: bytearray | None = None) -> tuple[int, dict[str, str], bytes]:
    """One whole response (skipping 1xx) as (status, headers, body); fails if the peer closes first."""
    if buffer is None:
        buffer = bytearray()
    while True:
        message = read_message(conn, buffer)
        if message is None:
            raise AssertionError(f"connection closed before a whole response: {bytes(buffer)!r}")
        head, headers, body = message
        status = response_status(head)
        if status >= 200:
            return status, headers, body


def socket_accepts(path: str) -> bool:
    """Whether a server on ``path`` answers ``GET /healthz`` with 200 (raises if nothing answers)."""
    status, _ = probe(path, timeout=1.0)
    return status == 200


class ServerProcess(spawn.ServerProcess):
    """A real ``uds-server`` (``python -m app ARGS``) with its output captured to a file.

    Failures are AssertionErrors that carry what the server printed. Unless ``ARGS`` or ``env``
    name a data directory (or the memory store), the server keeps its durable store in a fresh
    temporary directory, removed on leaving the block: tests never write to /var/lib.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        socket_path: str | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        python: str = PYTHON,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.args = list(args)
        self.socket_path = socket_path
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="uds-server-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self._final_output = ""
        self.data_dir: Path | None = None
        named = {"--data-dir", "--store"} & {arg.split("=", 1)[0] for arg in self.args}
        if not named and not {"UDS_DATA_DIR", "UDS_STORE"} & set(env or {}):
            self.data_dir = Path(tempfile.mkdtemp(prefix="uds-data-"))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        super().__init__(
            spawn.app_command(*self.args, python=python),
            socket=socket_path,
            stdout=self._log,
            env=env,
            cwd=ROOT,
            data_dir=self.data_dir,
            pass_fds=pass_fds,
        )

    @property
    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        if not self.log_path.exists():
            return self._final_output
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 15.0, **delays: float) -> ServerProcess:
        """Poll every 50 ms at most: a test waits for each server it starts, and a probe costs little."""
        assert self.socket_path, "wait_ready needs socket_path"
        delays.setdefault("max_delay", 0.05)
        try:
            return super().wait_ready(timeout, **delays)
        except spawn.SpawnError as exc:
            raise AssertionError(f"{exc}\n--- server output ---\n{self.output}") from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = _SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code (killing the process if it hangs)."""
        try:
            code = super().stop(sig, timeout)
        except spawn.SpawnError as exc:
            raise AssertionError(f"{exc}:\n{self.output}") from None
        self._log.close()
        return code

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        with contextlib.suppress(Exception):
            self._log.close()
        # Keep what the server said for assertions made after the block, then tidy /tmp.
        if self._own_log and self.log_path.exists():
            self._final_output = self.log_path.read_text(encoding="utf-8", errors="replace")
            self.log_path.unlink()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


@contextlib.contextmanager
def running_server(
    *extra: str, env: dict[str, str] | None = None, tmp: Path | None = None
) -> Iterator[ServerProcess]:
    """Start ``uds-server`` on a short temp socket, wait until it answers, stop it after."""
    directory = tmp or short_tmpdir()
    path = str(directory / "s.sock")
    with ServerProcess(["--socket", path, *extra], socket_path=path, env=env) as server:
        server.wait_ready()
        yield server
        server.stop()
    if tmp is None:
        shutil.rmtree(directory, ignore_errors=True)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``uds-client`` (``python -m client``) and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [PYTHON, "-m", "client", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=timeout,
        input=input,
        check=False,
    )


def require_tool(name: str) -> str:
    """The path of an external tool the test needs; fail (never skip) when it is missing."""
    found = shutil.which(name)
    if not found:
        raise AssertionError(f"{name} is not installed; scripts/test installs it (apt-get install {name})")
    return found


def python_with_open_files(directory: Path, soft: int, hard: int) -> str:
    """An executable that runs this Python under RLIMIT_NOFILE ``soft:hard`` (like ``prlimit``)."""
    wrapper = directory / "python-nofile"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        f"os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


def python_with_listen_fds(directory: Path, fd: int, *, listen_pid: str | None = None) -> str:
    """An executable that runs this Python with descriptor ``fd`` passed as systemd passes a socket:
    moved to fd 3, with ``LISTEN_FDS=1``, ``LISTEN_FDNAMES=api`` and ``LISTEN_PID`` its own pid (or
    ``listen_pid``). The child must be started with ``pass_fds=(fd,)``."""
    wrapper = directory / "python-listen-fds"
    pid = "str(os.getpid())" if listen_pid is None else repr(listen_pid)
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"if {fd} != 3:\n"
        f"    os.dup2({fd}, 3)\n"
        f"    os.close({fd})\n"
        f"os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='api', LISTEN_PID={pid})\n"
        f"os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


def open_files_of(pid: int) -> tuple[int, int]:
    """The ``(soft, hard)`` open-file limit of process ``pid``, read from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/PID/limits")


NOBODY = 65534
"""The uid (and gid) the permission tests drop to; CI runs as root, which file modes do not stop."""


def python_as_nobody(
    *args: str,
    extra_groups: list[int] | None = None,
    cwd: str | Path = ROOT,
    uid: int = NOBODY,
    gid: int = NOBODY,
) -> subprocess.CompletedProcess[str]:
    """Run this Python with ``args`` as uid/gid 65534 (or ``uid``/``gid``; plus ``extra_groups``),
    output captured."""
    return subprocess.run(
        [PYTHON, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
        user=uid,
        group=gid,
        extra_groups=extra_groups or [],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str, mode: int) -> Iterator[Path]:
    """A tmpfs of ``size`` (``4m``) and ``mode`` mounted at ``where`` (created), unmounted after: a
    real disk that fills up. Needs root, as CI runs; fails (does not skip) without it."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode:o}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mounted.returncode == 0, f"cannot mount a tmpfs (this test needs root): {mounted.stderr.strip()}"
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def serving(server: socketserver.UnixStreamServer) -> Iterator[None]:
    """``server`` answering in a daemon thread; on the way out it is shut down, closed and its
    socket file removed."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        Path(server.server_address).unlink(missing_ok=True)


def error_body(body: bytes, status: int, code: str) -> dict[str, object]:
    """The project's JSON error shape in ``body``, with this status and code and a one-line message."""
    doc: dict[str, object] = json.loads(body)
    assert doc["status"] == status, doc
    assert doc["error"] == code, doc
    assert isinstance(doc["message"], str)
    assert "\n" not in doc["message"]
    return doc
