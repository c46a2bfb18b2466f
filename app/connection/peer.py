"""Who is at the other end of a Unix-socket connection: ``SO_PEERCRED`` and ``SO_PEERGROUPS``."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import socket
import struct

__all__ = ["CONNECTION_KEY", "PEER_KEY", "PeerConnection", "queued", "read_groups", "read_peer"]

PEER_KEY = "uds.peer"
"""``scope["extensions"][PEER_KEY]``: ``{"pid", "uid", "gid"}`` of the connecting process (not over TCP)."""
CONNECTION_KEY = "uds.connection"
"""``scope["extensions"][CONNECTION_KEY]``: the connection's :class:`PeerConnection`."""
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
"""Linux 4.13+: the connecting process's supplementary groups, as the kernel saw them at connect()."""
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


def read_groups(sock: socket.socket | None) -> tuple[int, ...]:
    """The connecting process's supplementary group ids (``SO_PEERGROUPS``); empty if unknown."""
    if sock is None:
        return ()
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
    """Bytes queued in the kernel: unread input (``termios.FIONREAD``) or output the peer has not
    read yet (``termios.TIOCOUTQ``); 0 if unknown."""
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            return int(_INT.unpack(fcntl.ioctl(sock.fileno(), request, _INT.pack(0)))[0])
    return 0


class PeerConnection:
    """One Unix-socket connection's identity, shared by its requests: its credentials never change
    while it is open, so the access check computes its scopes once (per policy ``generation``)."""

    __slots__ = ("generation", "groups", "scopes")

    def __init__(self, groups: tuple[int, ...]) -> None:
        self.groups = groups
        self.generation = -1
        self.scopes: frozenset[str] = frozenset()
