"""``uds-client proxy``: a loopback TCP port in front of the Unix socket, for browsers and curl;
its options, start-up lines, signals and exit codes (docs/internals.md, "The proxy")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable

from client._errors import ConnectError, UsageError
from client.address import to_url
from client.cli.proxy.capacity import MAKE_ROOM_AFTER
from client.cli.proxy.forwarding import REFUSING, Proxy, hostport
from client.net.limits import FD_RESERVE, connection_cap, raise_open_file_limit

_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}
_STOP = (signal.SIGINT, signal.SIGTERM)


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (no host means 127.0.0.1)."""
    text, bad = value.strip(), f"invalid --listen {value!r}"
    host, _, port_text = text.rpartition(":")
    if text.startswith("["):
        if not host.endswith("]"):
            raise UsageError(f"{bad}: write [::1]:8080 for an IPv6 address")
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{bad}: put an IPv6 address in brackets, as in [::1]:8080")
    else:
        host = host or "127.0.0.1"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{bad}: the port must be a number 0..65535, as in 127.0.0.1:8080")
    if not host or any(c.isspace() or c in "[]" for c in host):
        raise UsageError(f"{bad}: expected HOST:PORT, :PORT or PORT")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    with contextlib.suppress(ValueError):
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def allowed_hosts(listen_host: str, port: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` values the proxy answers to: its own address, loopback names, and ``extra``."""
    names = {hostport(listen_host, port)}
    if listen_host in _WILDCARD or is_loopback(listen_host):
        names |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    if port == 80:
        names |= {name.rsplit(":", 1)[0] for name in names}
    return frozenset(name.lower() for name in (*names, *extra))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Access: a request is admitted if the user who opened the TCP connection (looked up by uid, this "
        "machine and network namespace only) may connect to the socket, or if it carries the token printed "
        "at start (in a Uds-Proxy-Token header or ?token= in the URL; the printed docs URL carries it, never "
        "a cookie). Exit codes: 0 stopped by SIGINT/SIGTERM; 2 bad --listen or the TCP address cannot be "
        "used (in use, not permitted); 3 the socket cannot be reached at start."
    )
    listen = "TCP address to listen on: HOST:PORT, [IPv6]:PORT, :PORT or PORT (default %(default)s; no host "
    listen += "means 127.0.0.1, loopback only; port 0 picks a free port)"
    parser.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help=listen)
    only = "admit only requests carrying the printed token, even from users who may use the socket"
    parser.add_argument("--token-only", action="store_true", help=only)
    also = "also answer requests whose Host header is HOST:PORT (for example the local side of kubectl "
    also += "port-forward 9000:8080); repeatable"
    parser.add_argument("--allow-host", action="append", default=[], metavar="HOST:PORT", help=also)
    head = "close a connection that has not sent its whole request head in time (default %(default)g)"
    # The default is the server's request_timeout.
    parser.add_argument("--head-timeout", type=float, default=30.0, metavar="SECONDS", help=head)
    cap = f"connections served at once; at the limit, one open for over {MAKE_ROOM_AFTER:g}s without a whole "
    cap += "request head is closed to make room, or the newcomer gets 503 (default %(default)s; lowered to "
    cap += "fit the open-file limit)"
    parser.add_argument("--max-connections", type=int, default=256, metavar="N", help=cap)
    quiet = "do not log a line per forwarded request (startup lines, refusals and errors are still printed)"
    parser.add_argument("--quiet", action="store_true", help=quiet)


def run(args: argparse.Namespace) -> int:
    """Check the socket, listen on TCP, serve until SIGINT/SIGTERM; return the exit code."""
    listen = parse_listen(args.listen)
    if not args.head_timeout > 0:
        raise UsageError(f"invalid --head-timeout {args.head_timeout!r}: give a number of seconds above 0")
    if not args.max_connections > 0:
        raise UsageError(f"invalid --max-connections {args.max_connections!r}: give a whole number above 0")
    extra = tuple(hostport(*parse_listen(value)) for value in args.allow_host)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # reachable now, or exit 3
        sock.settimeout(args.timeout)
        try:
            sock.connect(args.socket)
        except OSError as exc:
            raise ConnectError.caused_by(to_url(args.socket), exc) from exc
    soft, _ = raise_open_file_limit()
    # Each connection holds two files (the caller's and the socket's); refusals being answered one.
    cap = connection_cap(args.max_connections, soft, reserve=FD_RESERVE + REFUSING, files_each=2)
    if cap < args.max_connections:
        _log(
            f"Connections: at most {cap} at once, not {args.max_connections} (--max-connections): the "
            f"open-file limit is {soft}; raise it (ulimit -n) to serve more"
        )
    proxy = Proxy(args, cap, _log)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:  # the client image has no uvloop: asyncio's own loop then
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(proxy, listen, extra))


def _log(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


async def _serve(proxy: Proxy, listen: tuple[str, int], allow_hosts: tuple[str, ...]) -> int:
    log, host = proxy.log, listen[0]
    try:
        server = await asyncio.start_server(proxy.handle, *listen, backlog=1024, reuse_address=True)
    except OSError as exc:
        # asyncio rewrites strerror ("error while attempting to bind on address ..."): the errno's.
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        if isinstance(exc, socket.gaierror):
            reason = "unknown host"
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = "address not available on this machine"
        raise UsageError(
            f"cannot listen on {hostport(*listen)} ({reason}). "
            "Stop what uses it or choose another address with --listen."
        ) from exc
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[str] = asyncio.Queue()
    for sig in _STOP:  # before the first line: a supervisor may signal as soon as it reads one
        loop.add_signal_handler(sig, signals.put_nowait, sig.name)
    port = server.sockets[0].getsockname()[1]
    proxy.listening(allowed_hosts(host, port, allow_hosts))
    where = hostport(host, port)
    browse = hostport(_WILDCARD.get(host, host), port)
    loopback = is_loopback(host)
    scope = "loopback only" if loopback else "REACHABLE FROM OTHER MACHINES"
    log(f"Proxy listening on http://{where} ({scope}) -> {proxy.url}")
    if not loopback:
        warning = f"WARNING: {where} is not a loopback address: callers on other machines cannot be "
        warning += "identified and need the token; anyone who sees it can call the API with this user's "
        log(f"{warning}rights. Use --listen 127.0.0.1:PORT unless you mean it.")
    who = f"callers on this machine who may connect to {proxy.url} themselves (checked by uid), or anyone"
    who = "only requests" if proxy.rules.token_only else who
    log(f"Access: {who} with this proxy's token (open the URL below; its page sends it)")
    log(f"Docs: http://{browse}/docs?token={proxy.rules.token}")
    try:
        received = await signals.get()
    finally:
        # A second signal (coreutils timeout sends two) must not kill the proxy while it stops.
        server.close()
        count = await proxy.close_all()
        await server.wait_closed()
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)  # removing a handler restores the default action
        for sig in _STOP:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP)
    log(f"Proxy stopped ({received}): closed {count} open connection(s)")
    return 0
