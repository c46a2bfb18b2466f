"""``uds-client proxy``: a TCP listener that pipes every connection to the Unix socket, byte for byte.

Browsers, curl without ``--unix-socket`` and ``kubectl port-forward`` speak TCP only; the proxy lets
them reach the socket. It is a byte pipe, so keep-alive, streaming and half-close behave as they do
on the socket itself. The server sees the proxy as its peer (SO_PEERCRED is the proxy's pid/uid).

Exit codes: 0 after SIGINT/SIGTERM; 2 bad ``--listen`` or the TCP port cannot be bound (in use,
not permitted); 3 the socket cannot be reached at start.

Top-level imports are light stdlib modules only, so ``uds-client`` starts fast: asyncio (and uvloop,
when installed) are imported when the proxy runs.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import asyncio

from client._address import to_url
from client._errors import ConnectError, UsageError, reason_for

__all__ = [
    "DEFAULT_LISTEN",
    "Listen",
    "Proxy",
    "add_arguments",
    "check_socket",
    "is_loopback",
    "parse_listen",
    "run",
    "serve",
]

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_HOST = "127.0.0.1"


class Listen(tuple[str, int]):
    """A parsed ``--listen`` value: ``(host, port)``."""

    __slots__ = ()

    def __new__(cls, host: str, port: int) -> Listen:
        return super().__new__(cls, (host, port))

    @property
    def host(self) -> str:
        return self[0]

    @property
    def port(self) -> int:
        return self[1]


def parse_listen(value: str) -> Listen:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (no host means 127.0.0.1)."""
    text = value.strip()
    host, port_text = DEFAULT_HOST, text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise UsageError(f"invalid --listen {value!r}: write [::1]:8080 for an IPv6 address")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        if text.count(":") > 1:
            raise UsageError(f"invalid --listen {value!r}: put an IPv6 address in brackets, as in [::1]:8080")
        host, port_text = text.split(":")
        host = host or DEFAULT_HOST
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(
            f"invalid --listen {value!r}: the port must be a number 0..65535, as in 127.0.0.1:8080"
        )
    if not host or any(c.isspace() for c in host):
        raise UsageError(f"invalid --listen {value!r}: expected HOST:PORT, :PORT or PORT")
    return Listen(host, int(port_text))


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_socket(path: str, timeout: float) -> None:
    """Connect to the socket once, or raise :class:`ConnectError` with the contract's reason."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as exc:
        raise ConnectError(to_url(path), reason_for(exc)) from exc
    finally:
        sock.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``uds-client proxy``."""
    parser.epilog = (
        "Exit codes: 0 stopped by SIGINT/SIGTERM; 2 bad --listen or the TCP address cannot be used "
        "(in use, not permitted); 3 the socket cannot be reached at start. The server sees the proxy "
        "as the caller: whoever can reach the TCP port acts with this user's rights."
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"TCP address to listen on: HOST:PORT, [IPv6]:PORT, :PORT or PORT (default {DEFAULT_LISTEN}; "
        "no host means 127.0.0.1, loopback only; port 0 picks a free port)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not log a line per connection (startup lines and errors are still printed)",
    )


def run(args: argparse.Namespace) -> int:
    """Check the socket, listen on TCP, pipe connections until SIGINT/SIGTERM; return the exit code."""
    listen = parse_listen(args.listen)
    check_socket(args.socket, args.timeout)
    return serve(
        listen,
        args.socket,
        connect_timeout=args.timeout,
        log_connections=not getattr(args, "quiet", False),
        stream=sys.stderr,
    )


_CHUNK = 256 * 1024
# After the server has closed its side, how long the client may keep its side open before it is cut.
_CLOSE_GRACE = 5.0
# How long to wait for a request head before answering 502 when the socket cannot be reached.
_HEAD_WAIT = 1.0
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    return {
        errno.EADDRINUSE: "address already in use",
        errno.EACCES: "permission denied",
        errno.EADDRNOTAVAIL: "address not available on this machine",
    }.get(exc.errno or 0, (exc.strerror or type(exc).__name__).lower())


def bad_gateway(message: str) -> bytes:
    """A complete HTTP/1.1 502 response carrying the shared JSON error shape."""
    body = json.dumps({"error": "bad_gateway", "message": message, "status": 502}).encode()
    head = (
        "HTTP/1.1 502 Bad Gateway\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class Proxy:
    """Accepts TCP connections and pipes each one to a new connection on the Unix socket."""

    def __init__(self, path: str, *, connect_timeout: float, log: Callable[[str], None],
                 log_connections: bool = True) -> None:
        self.path = path
        self.url = to_url(path)
        self.connect_timeout = connect_timeout
        self.log = log
        self.log_connections = log_connections
        self.tasks: set[asyncio.Task[None]] = set()
        self.count = 0

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """Serve one TCP connection until both sides are done (or the proxy stops)."""
        import asyncio

        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.count += 1
        number = self.count
        peer = client_writer.get_extra_info("peername")
        who = _hostport(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else "?"
        started = time.monotonic()
        moved = [0, 0]  # bytes to the socket, bytes to the client
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    _open_unix(self.path), self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                reason = reason_for(exc)
                message = str(ConnectError(self.url, reason))
                self.log(f"proxy #{number} {who}: {message} (answered 502)")
                await self._refuse(client_reader, client_writer, message)
                return
            if self.log_connections:
                self.log(f"proxy #{number} open {who} -> {self.url}")
            note = " (cut: the proxy is stopping)"
            try:
                note = await self._pipe(client_reader, client_writer, upstream_reader, upstream_writer, moved)
            finally:
                upstream_writer.close()
                if self.log_connections:
                    self.log(
                        f"proxy #{number} close {who}: {moved[0]} B to socket, {moved[1]} B to client, "
                        f"{time.monotonic() - started:.3f} s{note}"
                    )
        finally:
            client_writer.close()
            self.tasks.discard(task)

    async def _pipe(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                    upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter,
                    moved: list[int]) -> str:
        """Copy both ways until both are done; return a note for the log line ("" if all went well)."""
        import asyncio

        up = asyncio.ensure_future(_copy(client_reader, upstream_writer, moved, 0))
        down = asyncio.ensure_future(_copy(upstream_reader, client_writer, moved, 1))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            for t, direction in ((up, "client to socket"), (down, "socket to client")):
                error = t.exception() if t in done and not t.cancelled() else None
                if error is not None:
                    what = error.strerror if isinstance(error, OSError) and error.strerror else error
                    return f" ({direction} stopped: {str(what).lower() or type(error).__name__})"
            if up in done:
                # The client half-closed (sent FIN): the server may still be answering.
                await asyncio.wait({down})
            else:
                # The server is done; give the client a moment to close its side, then cut it.
                await asyncio.wait({up}, timeout=_CLOSE_GRACE)
            return ""
        finally:
            for t in (up, down):
                if not t.done():
                    t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: str) -> None:
        import asyncio
        import contextlib

        # Read the request head first: closing with unread input would reset the connection and
        # the client would never see the answer.
        unanswered = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)
        with contextlib.suppress(*unanswered):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_WAIT)
        with contextlib.suppress(OSError):
            writer.write(bad_gateway(message))
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(reader.read(), _HEAD_WAIT)

    async def close_all(self) -> int:
        """Cut every open connection; return how many there were."""
        import asyncio

        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)


async def _open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the socket, retrying while its listen backlog is full (EAGAIN on AF_UNIX)."""
    import asyncio

    delay = 0.001
    while True:
        try:
            return await asyncio.open_unix_connection(path)
        except BlockingIOError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, moved: list[int],
                index: int) -> None:
    """Copy until EOF, waiting for the other side to drain (backpressure), then pass the EOF on."""
    while True:
        data = await reader.read(_CHUNK)
        if not data:
            break
        writer.write(data)
        moved[index] += len(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


def serve(listen: Listen, path: str, *, connect_timeout: float = 5.0, log_connections: bool = True,
          stream: TextIO | None = None) -> int:
    """Run the proxy until SIGINT or SIGTERM; return 0. Raises :class:`UsageError` if it cannot bind."""
    import asyncio

    out = stream if stream is not None else sys.stderr

    def log(line: str) -> None:
        try:
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):
            pass

    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    proxy = Proxy(path, connect_timeout=connect_timeout, log=log, log_connections=log_connections)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_main(proxy, listen, log))


async def _main(proxy: Proxy, listen: Listen, log: Callable[[str], None]) -> int:
    import asyncio

    try:
        server = await asyncio.start_server(proxy.handle, listen.host, listen.port, backlog=1024,
                                            reuse_address=True)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {_hostport(*listen)} ({_bind_reason(exc)}). "
            "Stop what uses it or choose another address with --listen."
        ) from exc
    port = server.sockets[0].getsockname()[1]
    where = _hostport(listen.host, port)
    browse = _hostport(_WILDCARD.get(listen.host, listen.host), port)
    loopback = is_loopback(listen.host)
    scope = "loopback only" if loopback else "REACHABLE FROM OTHER MACHINES"
    log(f"Proxy listening on http://{where} ({scope}) -> {proxy.url}")
    if not loopback:
        log(
            f"WARNING: {where} is not a loopback address: anyone who can reach it can call the API with "
            "this user's rights (the server sees the proxy as the peer). Use --listen 127.0.0.1:PORT "
            "unless you mean it."
        )
    log(f"Docs: http://{browse}/docs")
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        server.close()
        count = await proxy.close_all()
        await server.wait_closed()
    log(f"Proxy stopped ({', '.join(received) or 'stop'}): closed {count} open connection(s)")
    return 0
