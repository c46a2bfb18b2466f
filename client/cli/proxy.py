"""``uds-client proxy``: a loopback TCP port in front of the Unix socket, for browsers and curl.

Browsers, curl without ``--unix-socket`` and ``kubectl port-forward`` speak TCP only; the proxy lets
them reach the socket without widening who can use it. The socket's file permissions say who may
call the API; a TCP port has no such permissions, so the proxy checks every request before any of
it reaches the socket:

* **The caller must be someone who could have used the socket.** Two ways to prove it:

  - *By uid, as identd does* (no setup, works for curl and a browser on the same machine): the
    kernel reports the uid that owns the connecting TCP socket (:mod:`client.cli._caller`, an exact
    ``sock_diag`` lookup by address pair), the gids come from the process holding that socket, and
    the caller is admitted only if the socket's owner, group and mode would let it ``connect()``
    (search on each directory, write on the socket). When that process is not visible (a proxy
    not running as root sees only its own uid's processes), the groups are unknown and a group's
    bits admit no one that the others' bits would not. Only callers in this network namespace can
    be identified: a Pod's containers share one, so they are checked like local users; anything
    else is unknown and needs the token.
  - *By token*: a random token made at start is printed only on the proxy's stderr
    (``Docs: http://127.0.0.1:PORT/docs?token=...``). A request is admitted that carries it in a
    ``Uds-Proxy-Token`` header (the server's docs pages read it from their address and send it
    with each request) or as ``?token=`` in its URL (curl, the docs page itself); the proxy removes
    it, and a ``Referer`` holding it, before forwarding. It is never a cookie: a browser sends a
    cookie to every port of the host, so a page that another user serves on another loopback port
    would receive it. Reading the proxy's output proves the caller is the user who started it (or
    can ``kubectl exec`` into the Pod, which is more). This is what ``kubectl port-forward``
    needs: its connections are made by the container runtime (uid 0).

  Both are on by default; ``--token-only`` turns the uid check off. Everything else gets ``403``.
  The uid check alone would admit a cross-site page in the user's browser, so a request whose
  ``Origin`` is not the proxy's own is refused too.
* **Host must be the proxy's own address** (``127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT``,
  the ``--listen`` address, and any ``--allow-host``), or the answer is ``421``: a DNS-rebinding
  page in a local browser sends its own host name.
* **The server learns who is behind the proxy**: the proxy removes any ``Uds-Forwarded-Peer``
  header the caller sent and adds ``Uds-Forwarded-Peer: uid=U gid=G pid=P`` for the identified
  caller (``pid=0``, ``gid=-1`` when not visible). The server records it as the message's
  ``peer.forwarded_for`` next to the proxy's own SO_PEERCRED, so the claim is attributable, and
  its allowlist (``--allow-uid``/``--allow-gid``) must admit both. A caller admitted by the token
  is not named: the token is the proxy user's to share, and its holder acts as that user.

To check every request, the proxy reads each request head (h11 parses it, at most 32 KiB and 100
header fields, within ``--head-timeout``) and forwards **one request per TCP connection**: it
sends ``Connection: close`` upstream, so the server answers with ``Connection: close`` and ends
the connection, and clients open a new one for their next request (RFC 9112 section 9.6); a
pipelined request behind the first is not forwarded. Measured with 500 sequential
``GET /healthz`` on the 2-CPU test machine: 218 us each on one keep-alive connection through the
old byte pipe (557 us with a new connection each); 0.8 to 1.1 ms with the checks, most of it
finding the caller's process (the last callers' processes are looked at first; a full scan of
``/proc`` took 9 to 11 ms). A browser loads the docs in a handful of requests. Bodies are
streamed with backpressure (h11 decodes them, the proxy re-frames them: a chunked body stays
chunked, its trailers dropped; the request keeps the client's HTTP version); responses are copied
byte for byte.

Connections are capped (``--max-connections``, lowered to fit the open-file limit, whose soft
value the proxy raises to the hard one at start): at the cap the oldest connection open for over
``MAKE_ROOM_AFTER`` without a whole request head (any such one, oldest first, once they hold
over half the places) is closed to make room, else the newcomer gets
``503``; a connection silent from the start is closed after ``FIRST_BYTE_TIMEOUT``; a refused
request's connection leaves the count once answered. Without this,
1,100 idle connections under a limit of 1,024 files left the proxy unable to answer anyone.

Exit codes: 0 after SIGINT/SIGTERM; 2 bad ``--listen`` or the TCP port cannot be bound (in use,
not permitted); 3 the socket cannot be reached at start.

Top-level imports are light stdlib modules only, so ``uds-client`` starts fast: asyncio, h11 (and
uvloop, when installed) are imported when the proxy runs.
"""

from __future__ import annotations

import argparse
import errno
import hmac
import ipaddress
import json
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote_to_bytes

if TYPE_CHECKING:
    import asyncio

    import h11

    from client.cli._caller import Caller

from client._errors import ConnectError, UsageError, reason_for
from client.address import to_url

__all__ = [
    "DEFAULT_LISTEN",
    "FORWARDED_HEADER",
    "TOKEN_HEADER",
    "Listen",
    "Proxy",
    "add_arguments",
    "allowed_hosts",
    "check_socket",
    "connection_cap",
    "is_loopback",
    "parse_listen",
    "raise_open_file_limit",
    "run",
    "serve",
    "split_token",
]

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_HOST = "127.0.0.1"
FORWARDED_HEADER = b"uds-forwarded-peer"
"""The request header that names the caller behind the proxy (the server records it)."""
TOKEN_HEADER = b"uds-proxy-token"
"""The request header that carries the proxy's token (the docs pages send it); never forwarded."""
MAX_HEAD_BYTES = 32 * 1024
"""Largest request head the proxy reads (the server's own limit)."""
MAX_HEADERS = 100
"""Most header fields in one request (the server's own limit)."""
DEFAULT_HEAD_TIMEOUT = 30.0
"""Seconds a connection may take to send its request head (the server's request_timeout)."""
FIRST_BYTE_TIMEOUT = 10.0
"""Seconds a new connection may stay silent before the proxy closes it (at most ``--head-timeout``):
browsers open spare connections and send nothing on them."""
DEFAULT_MAX_CONNECTIONS = 256
"""Connections served at once (``--max-connections``); each one admitted holds two file descriptors."""
FD_RESERVE = 64
"""File descriptors kept free beyond the connections: the listener, logs, lookups of the caller."""
MAKE_ROOM_AFTER = 1.0
"""At the cap, a connection that has not sent a whole request head this many seconds after it was
opened is closed to make room for a newcomer (oldest first): curl and browsers send theirs in
milliseconds, so only an idle or trickling connection is that slow."""
LOG_PERIOD = 10.0
"""Seconds between two log lines about connections refused or closed at the connection cap."""
_REFUSING = 32
"""503 answers that may linger at once (so that the client reads them); beyond that, the proxy
answers and closes at once, and the file descriptors stay bounded however fast connections come."""


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


def raise_open_file_limit() -> tuple[int, int]:
    """Raise ``RLIMIT_NOFILE``'s soft limit to the hard limit; return the ``(soft, hard)`` in force.

    The server does the same (it is not imported: the client never imports ``app``). The default
    soft limit, often 1024, would let a few hundred idle connections exhaust the proxy's files.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit above the kernel's nr_open
            pass
    return soft, hard


def connection_cap(requested: int, soft_limit: int) -> int:
    """``requested``, but no more than the open-file limit leaves room for (two files each)."""
    if soft_limit < 0:  # RLIM_INFINITY
        return requested
    return max(1, min(requested, (soft_limit - FD_RESERVE - _REFUSING) // 2))


def allowed_hosts(listen_host: str, port: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` values the proxy answers to: its own address, loopback names, and ``extra``."""
    names = {_hostport(listen_host, port)}
    if listen_host in _WILDCARD or is_loopback(listen_host):
        names |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    if port == 80:
        names |= {name.rsplit(":", 1)[0] for name in names}
    return frozenset(name.lower() for name in (*names, *extra))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``uds-client proxy``."""
    parser.epilog = (
        "Access: a request is admitted if the user who opened the TCP connection (looked up by uid, "
        "this machine and network namespace only) may connect to the socket, or if it carries the "
        "token printed at start (in a Uds-Proxy-Token header or ?token= in the URL; the printed docs "
        "URL carries it, never a cookie). Exit codes: 0 stopped by SIGINT/SIGTERM; 2 bad --listen "
        "or the TCP address cannot be used (in use, not permitted); "
        "3 the socket cannot be reached at start."
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"TCP address to listen on: HOST:PORT, [IPv6]:PORT, :PORT or PORT (default {DEFAULT_LISTEN}; "
        "no host means 127.0.0.1, loopback only; port 0 picks a free port)",
    )
    parser.add_argument(
        "--token-only",
        action="store_true",
        help="admit only requests carrying the printed token, even from users who may use the socket",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="also answer requests whose Host header is HOST:PORT (for example the local side of "
        "kubectl port-forward 9000:8080); repeatable",
    )
    parser.add_argument(
        "--head-timeout",
        type=float,
        default=DEFAULT_HEAD_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that has not sent its whole request head in time "
        f"(default {DEFAULT_HEAD_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once; at the limit, one open for over "
        f"{MAKE_ROOM_AFTER:g}s without a whole request head is closed to make room, or the newcomer "
        f"gets 503 (default {DEFAULT_MAX_CONNECTIONS}; lowered to fit the open-file limit)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not log a line per forwarded request (startup lines, refusals and errors are still printed)",
    )


def run(args: argparse.Namespace) -> int:
    """Check the socket, listen on TCP, serve connections until SIGINT/SIGTERM; return the exit code."""
    listen = parse_listen(args.listen)
    if not args.head_timeout > 0:
        raise UsageError(f"invalid --head-timeout {args.head_timeout!r}: give a number of seconds above 0")
    if not args.max_connections > 0:
        raise UsageError(f"invalid --max-connections {args.max_connections!r}: give a whole number above 0")
    extra = [parse_listen(value) for value in args.allow_host]
    check_socket(args.socket, args.timeout)
    return serve(
        listen,
        args.socket,
        connect_timeout=args.timeout,
        log_connections=not args.quiet,
        stream=sys.stderr,
        token_only=args.token_only,
        allow_hosts=[_hostport(*hp) for hp in extra],
        head_timeout=args.head_timeout,
        max_connections=args.max_connections,
    )


_CHUNK = 256 * 1024
# After answering, how long the proxy keeps reading (and dropping) what the client still sends, so
# that closing does not reset the connection before the client has read the answer.
_LINGER = 2.0
_LINGER_BYTES = 1 << 20
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}
# Hop-by-hop fields are not forwarded; the proxy sets Connection itself.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"te", FORWARDED_HEADER}
)
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_ERRORS = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    421: "misdirected_request",
    431: "headers_too_large",
    501: "not_implemented",
    502: "bad_gateway",
    503: "unavailable",
}


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


def _shown(value: bytes | str, limit: int = 200) -> str:
    """Text from outside as it goes into one log line or message: control characters escaped, cut."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if len(text) > limit:
        text = text[:limit] + "..."
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def split_token(target: bytes) -> tuple[bytes | None, bytes]:
    """The token given as ``token=`` in the query of ``target`` (the last one), and ``target`` without it.

    A name is decoded as a page's ``URLSearchParams`` decodes it (``%74oken`` is ``token``), so what
    the docs page reads as the token never reaches the socket; the other parameters are kept byte
    for byte.
    """
    path, sep, query = target.partition(b"?")
    if not sep or (b"token" not in query and b"%" not in query):
        return None, target
    given = None
    kept = []
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == b"token":
            given = unquote_to_bytes(value.replace(b"+", b" "))
        else:
            kept.append(pair)
    if given is None:
        return None, target
    return given, path + (b"?" + b"&".join(kept) if kept else b"")


def error_answer(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response carrying the shared JSON error shape."""
    body = json.dumps({"error": _ERRORS.get(status, "error"), "message": message, "status": status}).encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def bad_gateway(message: str) -> bytes:
    """A complete HTTP/1.1 502 response carrying the shared JSON error shape."""
    return error_answer(502, message)


class _Closed(Exception):
    """The client closed the connection before sending a request."""


@dataclass
class _Verdict:
    """What to do with one request: forward it (``status`` 0) or refuse."""

    status: int = 0
    message: str = ""
    target: bytes = b""
    by: str = ""


class _CapReport:
    """Connections refused (503) or closed to make room at the cap: one log line per period at most.

    The first event is logged at once; later ones are counted and summed up when the period ends.
    """

    def __init__(self, log: Callable[[str], None], cap: int) -> None:
        self.log = log
        self.cap = cap
        self.refused = 0
        self.closed = 0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, *, refused: bool) -> None:
        if refused:
            self.refused += 1
        else:
            self.closed += 1
        if self._timer is None:
            self._flush()

    def _flush(self) -> None:
        import asyncio

        self._timer = None
        if not (self.refused or self.closed):
            return
        self.log(
            f"Proxy at its connection limit ({self.cap}, --max-connections): refused {self.refused} "
            f"connection(s) with 503, closed {self.closed} without a request head after "
            f"{MAKE_ROOM_AFTER:g}s to make room; next report in {LOG_PERIOD:g}s at most"
        )
        self.refused = self.closed = 0
        self._timer = asyncio.get_running_loop().call_later(LOG_PERIOD, self._flush)

    def close(self) -> None:
        """Log what is still counted (the proxy is stopping) and stop the timer."""
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_REFUSAL_KEYS = 64
"""Distinct (status, caller uid) pairs counted per ``LOG_PERIOD``; beyond, one more bucket counts the rest."""


class _RefusalLog:
    """Lines about refused requests: for each status and caller uid, the first at once, then at the
    end of the period one line that counts the others and repeats the last (a refused peer must
    not flood the log: each of its requests wrote a line)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.counted: dict[tuple[int, int | None], list[Any]] = {}
        """``(status, uid)``: ``[requests refused since the line logged, the last line]``."""
        self._timer: asyncio.TimerHandle | None = None

    def note(self, status: int, caller: Caller | None, line: str) -> None:
        import asyncio

        key = (status, caller.uid if caller is not None else None)
        if key not in self.counted and len(self.counted) >= _REFUSAL_KEYS:
            key = (0, None)
        entry = self.counted.get(key)
        if entry is None:
            self.counted[key] = [0, line]
            self.log(line)
        else:
            entry[0] += 1
            entry[1] = line
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LOG_PERIOD, self.flush)

    def flush(self) -> None:
        """Log the counts of the period and start a new one."""
        self._timer = None
        for (status, uid), (count, last) in self.counted.items():
            if count:
                who = "unknown callers" if uid is None else f"uid {uid}"
                refused = f"refused with {status}" if status else "refused"
                self.log(
                    f"proxy: {count} more request(s) from {who} {refused} in the last "
                    f"{LOG_PERIOD:g}s; the last: {last}"
                )
        self.counted.clear()

    def close(self) -> None:
        """Log what is still counted (the proxy is stopping) and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()


class Proxy:
    """Accepts TCP connections, checks each request, forwards admitted ones to the Unix socket."""

    def __init__(
        self,
        path: str,
        *,
        connect_timeout: float,
        log: Callable[[str], None],
        log_connections: bool = True,
        token: str | None = None,
        token_only: bool = False,
        head_timeout: float = DEFAULT_HEAD_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        from client.cli._caller import SocketAccess

        self.path = path
        self.url = to_url(path)
        self.connect_timeout = connect_timeout
        self.log = log
        self.log_connections = log_connections
        self.token = token or secrets.token_urlsafe(24)
        self.token_only = token_only
        self.head_timeout = head_timeout
        self.access = SocketAccess(path)
        self.hosts: frozenset[str] = frozenset()
        self.origins: frozenset[str] = frozenset()
        self.max_connections = max_connections
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots: set[asyncio.Task[None]] = set()
        """Connections counted against ``max_connections`` (not those being refused)."""
        self.checking: dict[asyncio.Task[None], int | None] = {}
        """Connections whose request is not judged yet, oldest first, with the uid that opened them."""
        self.waiting: dict[asyncio.Task[None], float] = {}
        """Connections without a whole request head yet, oldest first, with the time they opened."""
        self.refusing = 0
        self.report = _CapReport(log, max_connections)
        self.refusals = _RefusalLog(log)
        self.count = 0

    def listening(self, hosts: frozenset[str]) -> None:
        """Set what the proxy answers to, once its port is known."""
        self.hosts = hosts
        self.origins = frozenset(f"http://{host}" for host in hosts)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one TCP connection: one request, checked, then forwarded or refused."""
        import asyncio

        import h11

        from client.cli._caller import find_caller

        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        owner = _owner(peer, local)
        if not self._take_slot(task, owner):
            try:
                await self._refuse(reader, writer)
            finally:
                writer.close()
                self.tasks.discard(task)
            return
        self.count += 1
        number = self.count
        who = _hostport(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else "?"
        finding: asyncio.Future[Caller | None] | None = None
        started = time.monotonic()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        received = [0]
        try:
            try:
                request = await asyncio.wait_for(
                    _next_request(reader, conn, received, min(FIRST_BYTE_TIMEOUT, self.head_timeout)),
                    self.head_timeout,
                )
            except _Closed:
                return
            except TimeoutError:
                if received[0]:
                    self.refusals.note(
                        408,
                        None,
                        f"proxy #{number} {who}: no complete request head within "
                        f"{self.head_timeout:g}s (answered 408)",
                    )
                    await self._refused(
                        task,
                        reader,
                        writer,
                        error_answer(
                            408,
                            f"the request head was not complete within {self.head_timeout:g}s; "
                            "send it faster",
                        ),
                    )
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in _ERRORS else 400
                # h11 may quote the request line, and with it a token in the URL.
                reason = str(exc).replace(self.token, "<token>")
                message = f"the request is not valid HTTP/1.1 ({_shown(reason)})"
                if status == 431:
                    message = f"the request head is over {MAX_HEAD_BYTES} bytes"
                self.refusals.note(status, None, f"proxy #{number} {who}: refused {status}: {message}")
                await self._refused(task, reader, writer, error_answer(status, message))
                return
            except (OSError, asyncio.IncompleteReadError):
                return
            self.waiting.pop(task, None)
            # The caller is looked up once its head is in: a flood of silent connections must not
            # queue lookups (threads, /proc) ahead of the requests that wait for theirs.
            if isinstance(peer, tuple) and isinstance(local, tuple):
                matter = _never if self.token_only else self.access.may_ever
                finding = asyncio.ensure_future(asyncio.to_thread(find_caller, peer[:2], local[:2], matter))
            caller = await finding if finding is not None else None
            verdict = self._check(request, caller)
            self.checking.pop(task, None)
            line = f"{_shown(request.method)} {_shown(split_token(request.target)[1])}"
            if verdict.status:
                self.refusals.note(
                    verdict.status,
                    caller,
                    f"proxy #{number} {who} {_describe(caller)}: refused {verdict.status} "
                    f"{line}: {verdict.message}",
                )
                await self._refused(task, reader, writer, error_answer(verdict.status, verdict.message))
                return
            await self._forward(
                reader,
                writer,
                conn,
                request,
                verdict,
                caller,
                f"proxy #{number} {who} {_describe(caller)} {line}",
                started,
            )
        finally:
            if finding is not None and not finding.done():
                finding.cancel()
            writer.close()
            self.tasks.discard(task)
            self.slots.discard(task)
            self.waiting.pop(task, None)
            self.checking.pop(task, None)

    def _take_slot(self, task: asyncio.Task[None], owner: int | None) -> bool:
        """Count a new connection against the cap, closing one without a request head to make room.

        False when the proxy is full of connections that sent their head or opened less than
        ``MAKE_ROOM_AFTER`` seconds ago, those without a head hold at most half the places, and
        no other uid than the newcomer's (``owner``) holds over half of them with requests not yet
        judged: the newcomer is refused.
        """
        now = time.monotonic()
        if len(self.slots) >= self.max_connections:
            oldest = next(iter(self.waiting.items()), None)
            # Silent connections filling half the places are a flood (a client sends its head in
            # milliseconds): the oldest goes whatever its age, or a stranger opening them faster
            # than one a second per place would lock every caller out.
            crowded = len(self.waiting) > self.max_connections // 2
            if oldest is None or (now - oldest[1] < MAKE_ROOM_AFTER and not crowded):
                victim = self._flooder(owner)
                if victim is None:
                    self.report.note(refused=True)
                    return False
            else:
                victim = oldest[0]
            self.waiting.pop(victim, None)
            self.checking.pop(victim, None)
            self.slots.discard(victim)
            victim.cancel()  # it closes its connection; nothing of it has reached the socket
            self.report.note(refused=False)
        self.slots.add(task)
        self.waiting[task] = now
        self.checking[task] = owner
        return True

    def _flooder(self, owner: int | None) -> asyncio.Task[None] | None:
        """The oldest connection not yet judged of a uid other than ``owner`` that holds over half
        the places with such connections, if there is one (their caller lookups queue up: one
        stranger sending requests faster than they are judged would lock every caller out)."""
        from collections import Counter

        counts = Counter(self.checking.values())
        if not counts:
            return None
        uid, held = counts.most_common(1)[0]
        if uid == owner or held <= self.max_connections // 2:
            return None
        return next(task for task, of in self.checking.items() if of == uid)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer 503; linger for the client to read it while few others do, else close at once."""
        answer = error_answer(
            503,
            f"the proxy is at its connection limit ({self.max_connections}); try again shortly",
            (("Retry-After", "1"),),
        )
        await self._answer_bounded(reader, writer, answer)

    async def _refused(
        self,
        task: asyncio.Task[None],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answer: bytes,
    ) -> None:
        """Answer a request refused before the socket; its connection gives up its place at once.

        A refused connection that lingered in its place let uid 65534, refused itself, lock every
        caller out: its unread 403s filled the cap.
        """
        self.slots.discard(task)
        self.waiting.pop(task, None)
        await self._answer_bounded(reader, writer, answer)

    async def _answer_bounded(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes
    ) -> None:
        """Answer and linger while fewer than ``_REFUSING`` do; beyond that, answer and close at once."""
        import contextlib

        if self.refusing >= _REFUSING:
            with contextlib.suppress(OSError):
                writer.write(answer)
            return
        self.refusing += 1
        try:
            await _answer(reader, writer, answer)
        finally:
            self.refusing -= 1

    def _check(self, request: h11.Request, caller: Caller | None) -> _Verdict:
        """Host, Origin, then the caller: by uid against the socket's permissions, or by token."""
        if len(request.headers) > MAX_HEADERS:
            return _Verdict(431, f"the request has more than {MAX_HEADERS} header fields")
        # h11 bounds a head that arrives in pieces; one that arrived whole is measured here.
        size = len(request.method) + len(request.target) + 11
        if size + sum(len(name) + len(value) + 4 for name, value in request.headers) > MAX_HEAD_BYTES:
            return _Verdict(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
        host = origin = given = None
        framing = set()
        for name, value in request.headers:
            if name == b"host":
                host = value
            elif name in (b"content-length", b"transfer-encoding"):
                framing.add(name)
            elif name == b"origin":
                origin = value
            elif name == TOKEN_HEADER:
                given = value
        if host is None:
            return _Verdict(400, "the request has no Host header; send Host: 127.0.0.1:PORT")
        if len(framing) == 2:  # RFC 9112 section 6.1: a sign of request smuggling
            return _Verdict(400, "the request has both Content-Length and Transfer-Encoding; send one")
        if host.decode("latin-1").lower() not in self.hosts:
            return _Verdict(
                421,
                f"this proxy does not answer for host {_shown(host)!r}; use "
                f"{' or '.join(sorted(self.hosts))} (or start it with --allow-host)",
            )
        if origin is not None and origin.decode("latin-1").lower() not in self.origins:
            return _Verdict(
                403,
                f"cross-origin requests are refused (Origin {_shown(origin)!r}); "
                "open the page from the proxy's own address",
            )
        in_url, target = split_token(request.target)
        if given is None:
            given = in_url
        # A caller the uid check admits is admitted (and named) by uid, token or not: the docs
        # page opened at the printed URL sends the token with every request.
        if not self.token_only and caller is not None and self.access.allows(caller.uid, caller.groups):
            return _Verdict(target=target, by="uid")
        if given is not None:
            if not hmac.compare_digest(given, self.token.encode()):
                return _Verdict(403, "wrong token; open the URL the proxy printed at start")
            return _Verdict(target=target, by="token")
        if self.token_only:
            why = "this proxy admits only requests with its token"
        elif caller is None:
            why = "the proxy cannot tell who opened this connection (not a socket of this machine)"
        else:
            why = (
                f"uid {caller.uid} may not connect to {self.url} ({self.access.describe()}; groups "
                f"{_groups(caller)})"
            )
        return _Verdict(403, f"{why}; open the URL with the token that the proxy printed at start")

    def _upstream_headers(self, request: h11.Request, caller: Caller | None) -> list[tuple[bytes, bytes]]:
        token = self.token.encode()
        headers: list[tuple[bytes, bytes]] = []
        for raw_name, value in request.headers.raw_items():
            lower = raw_name.lower()
            if lower in _HOP_BY_HOP or lower == TOKEN_HEADER:
                continue
            if lower == b"referer" and token in value:  # the token is a secret for the proxy alone
                continue
            headers.append((raw_name, value))
        headers.append((b"Connection", b"close"))
        if caller is not None:
            headers.append(
                (b"Uds-Forwarded-Peer", f"uid={caller.uid} gid={caller.gid} pid={caller.pid}".encode())
            )
        return headers

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: h11.Connection,
        request: h11.Request,
        verdict: _Verdict,
        caller: Caller | None,
        label: str,
        started: float,
    ) -> None:
        import asyncio

        import h11

        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                _open_unix(self.path), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            message = str(ConnectError(self.url, reason_for(exc)))
            self.log(f"{label}: {message} (answered 502)")
            await _answer(reader, writer, bad_gateway(message))
            return
        if self.log_connections:
            self.log(f"{label} -> {self.url} (admitted by {verdict.by})")
        moved = [0, 0]  # bytes to the socket, bytes to the client
        note = " (cut: the proxy is stopping)"
        # Only a caller identified by uid is named to the server. The token is the proxy user's to
        # share: whoever holds it acts as that user, which is what the server sees on the socket.
        headers = self._upstream_headers(request, caller if verdict.by == "uid" else None)
        chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
        try:
            # The request line keeps the client's HTTP version, so the server frames its answer
            # for that client (no chunked answer to HTTP/1.0).
            head = b"%s %s HTTP/%s\r\n%s\r\n" % (
                request.method,
                verdict.target,
                request.http_version,
                b"".join(b"%s: %s\r\n" % field for field in headers),
            )
            upstream_writer.write(head)
            moved[0] += len(head)
            body = asyncio.ensure_future(_copy_body(reader, conn, chunked, upstream_writer, moved))
            down = asyncio.ensure_future(_copy(upstream_reader, writer, moved, 1))
            note, error = await _finish(body, down)
            if isinstance(error, h11.RemoteProtocolError) and moved[1] == 0:
                # The socket got a cut-off body and is answering nothing: the client hears why.
                await _answer(
                    reader,
                    writer,
                    error_answer(400, f"the request body is not valid HTTP/1.1 ({_shown(str(error))})"),
                )
            elif not writer.is_closing():
                await _linger(reader, writer)
        finally:
            upstream_writer.close()
            if self.log_connections:
                self.log(
                    f"{label}: {moved[0]} B to socket, {moved[1]} B to client, "
                    f"{time.monotonic() - started:.3f} s{note}"
                )

    async def close_all(self) -> int:
        """Cut every open connection; return how many there were."""
        import asyncio

        self.report.close()
        self.refusals.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)


def _owner(peer: object, local: object) -> int | None:
    """The uid that opened the connection ``peer -> local`` (one sock_diag lookup), None if unknown."""
    from client.cli._caller import tcp_owner

    if not (isinstance(peer, tuple) and isinstance(local, tuple)):
        return None
    found = tcp_owner(peer[:2], local[:2])
    return found[0] if found is not None else None


def _describe(caller: Caller | None) -> str:
    if caller is None:
        return "(unknown user)"
    return f"(uid={caller.uid} gid={caller.gid} pid={caller.pid})"


def _never(uid: int) -> bool:
    return False


def _groups(caller: Caller) -> str:
    if caller.source == "skipped":
        return "not looked up: none would let it in"
    if caller.groups is None:
        return "unknown: its process is not visible to the proxy, so the group's bits do not count"
    return f"{','.join(map(str, sorted(caller.groups))) or 'none'} of its process"


async def _next_request(
    reader: asyncio.StreamReader, conn: h11.Connection, received: list[int], first_byte: float
) -> h11.Request:
    """Read until h11 has a whole request head; raises :class:`_Closed` on EOF before one.

    The first bytes must come within ``first_byte`` seconds (:class:`TimeoutError` otherwise).
    """
    import asyncio

    import h11

    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if received[0]:
                data = await reader.read(_CHUNK)
            else:
                async with asyncio.timeout(first_byte):
                    data = await reader.read(_CHUNK)
            received[0] += len(data)
            if not data and not received[0]:
                raise _Closed
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return event
        raise _Closed  # ConnectionClosed


async def _copy_body(
    reader: asyncio.StreamReader,
    conn: h11.Connection,
    chunked: bool,
    writer: asyncio.StreamWriter,
    moved: list[int],
) -> None:
    """Stream the request body h11 decodes to the socket, re-framed, waiting for it to drain.

    A chunked body is sent as one chunk per piece read, and its trailers are dropped; a body of
    known length is sent as it is (h11 has checked that it is exactly that long).
    """
    import h11

    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(_CHUNK)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Data):
            if not event.data:
                continue
            out = b"%x\r\n%s\r\n" % (len(event.data), event.data) if chunked else bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            out = b"0\r\n\r\n" if chunked else b""
        else:
            return
        if out:
            writer.write(out)
            moved[0] += len(out)
            await writer.drain()
        if isinstance(event, h11.EndOfMessage):
            return


async def _finish(body: asyncio.Future[None], down: asyncio.Future[None]) -> tuple[str, BaseException | None]:
    """Wait for the answer to be copied; return a note for the log line ("" if all went well)."""
    import asyncio

    import h11

    try:
        done, _ = await asyncio.wait({body, down}, return_when=asyncio.FIRST_COMPLETED)
        if body in done and body.exception() is None:
            await asyncio.wait({down})  # the whole request is sent: wait for the whole answer
            done = {body, down}
        for t, direction in ((body, "client to socket"), (down, "socket to client")):
            error = t.exception() if t in done and not t.cancelled() else None
            if error is not None:
                if isinstance(error, h11.RemoteProtocolError):
                    what: object = f"invalid body: {error}"
                else:
                    what = error.strerror if isinstance(error, OSError) and error.strerror else error
                return f" ({direction} stopped: {str(what).lower() or type(error).__name__})", error
        return "", None
    finally:
        for t in (body, down):
            if not t.done():
                t.cancel()
        await asyncio.gather(body, down, return_exceptions=True)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes) -> None:
    """Send the proxy's own answer, end the connection, and linger so that it is not reset."""
    import contextlib

    with contextlib.suppress(OSError):
        writer.write(response)
        await writer.drain()
    await _linger(reader, writer)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then drop what the client still sends (up to a limit) until it closes too."""
    import asyncio
    import contextlib

    with contextlib.suppress(OSError):
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    deadline = asyncio.get_running_loop().time() + _LINGER
    dropped = 0
    with contextlib.suppress(OSError, TimeoutError):
        while dropped < _LINGER_BYTES:
            async with asyncio.timeout_at(deadline):
                data = await reader.read(_CHUNK)
            if not data:
                break
            dropped += len(data)


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


async def _copy(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, moved: list[int], index: int
) -> None:
    """Copy until EOF, waiting for the other side to drain (backpressure)."""
    while True:
        data = await reader.read(_CHUNK)
        if not data:
            break
        writer.write(data)
        moved[index] += len(data)
        await writer.drain()


def serve(
    listen: Listen,
    path: str,
    *,
    connect_timeout: float = 5.0,
    log_connections: bool = True,
    stream: TextIO | None = None,
    token_only: bool = False,
    allow_hosts: Iterable[str] = (),
    head_timeout: float = DEFAULT_HEAD_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> int:
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
    soft, _ = raise_open_file_limit()
    cap = connection_cap(max_connections, soft)
    if cap < max_connections:
        log(
            f"Connections: at most {cap} at once, not {max_connections} (--max-connections): the "
            f"open-file limit is {soft}; raise it (ulimit -n) to serve more"
        )
    proxy = Proxy(
        path,
        connect_timeout=connect_timeout,
        log=log,
        log_connections=log_connections,
        token_only=token_only,
        head_timeout=head_timeout,
        max_connections=cap,
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_main(proxy, listen, log, tuple(allow_hosts)))


async def _main(
    proxy: Proxy, listen: Listen, log: Callable[[str], None], allow_hosts: tuple[str, ...]
) -> int:
    import asyncio

    try:
        server = await asyncio.start_server(
            proxy.handle, listen.host, listen.port, backlog=1024, reuse_address=True
        )
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {_hostport(*listen)} ({_bind_reason(exc)}). "
            "Stop what uses it or choose another address with --listen."
        ) from exc
    port = server.sockets[0].getsockname()[1]
    proxy.listening(allowed_hosts(listen.host, port, allow_hosts))
    where = _hostport(listen.host, port)
    browse = _hostport(_WILDCARD.get(listen.host, listen.host), port)
    loopback = is_loopback(listen.host)
    scope = "loopback only" if loopback else "REACHABLE FROM OTHER MACHINES"
    log(f"Proxy listening on http://{where} ({scope}) -> {proxy.url}")
    if not loopback:
        log(
            f"WARNING: {where} is not a loopback address: callers on other machines cannot be identified "
            "and need the token; anyone who sees it can call the API with this user's rights. Use "
            "--listen 127.0.0.1:PORT unless you mean it."
        )
    if proxy.token_only:
        log("Access: only requests with this proxy's token (open the URL below; its page sends it)")
    else:
        log(
            f"Access: callers on this machine who may connect to {proxy.url} themselves (checked by uid), "
            "or anyone with this proxy's token (open the URL below; its page sends it)"
        )
    log(f"Docs: http://{browse}/docs?token={proxy.token}")
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
        # A second signal (coreutils timeout sends two) must not kill the proxy halfway through its
        # shutdown or on its way out: once stopping, the command ignores them until it exits.
        server.close()
        count = await proxy.close_all()
        await server.wait_closed()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    log(f"Proxy stopped ({', '.join(received) or 'stop'}): closed {count} open connection(s)")
    return 0
