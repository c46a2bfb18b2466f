"""Socket activation (``sd_listen_fds(3)``): serve the one listening Unix stream socket a service
manager passes, never chmodded or removed; anything else is a :class:`SocketError`. docs/systemd.md."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import MutableMapping

from app.logs import escaped
from app.serving.private_dir import SocketError
from app.serving.sockets import BoundSocket, describe

logger = logging.getLogger("app.serving.activation")

FIRST_FD = 3  # SD_LISTEN_FDS_START
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_FIX = "pass one listening Unix stream socket (ListenStream=/path in the .socket unit)"


def inherited_socket(environ: MutableMapping[str, str]) -> BoundSocket | None:
    """The one socket ``environ`` passes this process, or None; its variables are removed."""
    listen_pid, listen_fds, names = (environ.pop(name, None) for name in VARIABLES)
    if listen_fds is None or listen_pid is None:
        return None
    if listen_pid.strip() != str(os.getpid()):
        logger.info(
            "LISTEN_FDS is set for pid %s, not this process (pid %d): ignored, binding the socket itself",
            escaped(listen_pid),
            os.getpid(),
        )
        return None
    count = int(listen_fds) if listen_fds.strip().isdecimal() else -1
    if count == 0:
        return None
    if count != 1:
        shown = f"LISTEN_FDS={escaped(listen_fds)}" + (f", names {escaped(names)}" if names else "")
        raise SocketError(f"cannot serve the sockets passed by the service manager ({shown}): {_FIX}")
    sock = _check(FIRST_FD, (names or "").split(":")[0])
    sock.set_inheritable(False)  # workers get it through pass_fds; nothing else should
    return BoundSocket(sock)


def announce(sock: socket.socket, configured: str) -> str:
    """Log the inherited socket (warn if every user may write to it); return its address."""
    name = sock.getsockname()
    if isinstance(name, bytes):  # the abstract namespace: a leading NUL byte
        address = "@" + escaped(name[1:].decode("utf-8", "backslashreplace"))
    else:
        address = escaped(name) if name else f"an unnamed socket (fd {sock.fileno()})"
    unused = "" if configured == address else f"; --socket {configured} is not used"
    details, mode = "", 0
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
    return address


def _check(fd: int, name: str) -> socket.socket:
    """A socket object for descriptor ``fd`` if it is a listening Unix stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        reason = "it is not open" if exc.errno == errno.EBADF else "it is not a socket"
    else:
        if sock.family != socket.AF_UNIX:
            family = _FAMILIES.get(sock.family, f"a family {int(sock.family)}")
            reason = f"it is {family} socket, not a Unix (AF_UNIX) one"
        elif sock.type != socket.SOCK_STREAM:
            kind = _TYPES.get(sock.type, f"a type {int(sock.type)}")
            reason = f"it is {kind} socket, not a stream (SOCK_STREAM) one"
        elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            reason = "it is not listening (a .socket unit with Accept=yes passes connections instead)"
        else:
            return sock
        sock.detach()  # leave the descriptor to its owner; we exit anyway
    what = f"fd {fd}" + (f" named {escaped(name)!r}" if name else "")
    raise SocketError(f"cannot serve the socket passed by the service manager ({what}): {reason}; {_FIX}")


_FAMILIES = {socket.AF_INET: "an IPv4 (AF_INET)", socket.AF_INET6: "an IPv6 (AF_INET6)"}
_TYPES = {socket.SOCK_DGRAM: "a datagram", socket.SOCK_SEQPACKET: "a seqpacket", socket.SOCK_RAW: "a raw"}
