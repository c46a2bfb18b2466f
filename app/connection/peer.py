"""Who is at the other end of a Unix-socket connection: ``SO_PEERCRED`` and ``SO_PEERGROUPS``."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import socket
import struct
from dataclasses import dataclass

PEER_KEY = "uds.peer"  # scope["extensions"][PEER_KEY]: {"pid", "uid", "gid"} (not over TCP)
CONNECTION_KEY = "uds.connection"  # scope["extensions"][CONNECTION_KEY]: the PeerConnection
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+
_UCRED = struct.Struct("3i")
_INT = struct.Struct("i")


def read_peer(sock: socket.socket | None) -> dict[str, int] | None:
    """The connecting process's ``{"pid", "uid", "gid"}`` for a Unix socket, else None."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return {"pid": pid, "uid": uid, "gid": gid}


def read_groups(sock: socket.socket) -> tuple[int, ...]:
    """The connecting process's supplementary group ids, as at connect(); empty if unknown."""
    for room in (64, 65536):  # NGROUPS_MAX is 65536; most processes have a handful
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, room * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return ()
        return tuple(array.array("I", raw[: len(raw) - len(raw) % 4]))
    return ()


def queued(sock: socket.socket | None, request: int) -> int:
    """Bytes of unread input (``termios.FIONREAD``) or unread output (``TIOCOUTQ``); 0 if unknown."""
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            return int(_INT.unpack(fcntl.ioctl(sock.fileno(), request, _INT.pack(0)))[0])
    return 0


@dataclass(slots=True)
class PeerConnection:
    """One connection's identity: the access check caches its scopes on it, per policy ``generation``."""

    groups: tuple[int, ...]
    generation: int = -1
    scopes: frozenset[str] = frozenset()
