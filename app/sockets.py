"""The listening socket's life: check the path, bind safely, set mode and group, clean up.

Better than ``uvicorn --uds``: a live server's socket is never replaced, files that are not sockets
are never touched, the socket is never more open than the target mode (it is bound under a strict
umask, then chowned, then chmodded), and on exit it is removed only if it is still the one we made.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass

from client._address import MAX_PATH_BYTES

__all__ = ["BACKLOG", "BoundSocket", "SocketError", "bind_tcp", "bind_unix"]

logger = logging.getLogger("app.sockets")

BACKLOG = 2048
PROBE_TIMEOUT = 1.0
"""Seconds to wait for an existing socket to accept before deciding whether it is alive."""


class SocketError(Exception):
    """The server cannot listen where it was told to; the message says what, where and what to do."""


@dataclass(slots=True)
class BoundSocket:
    """A listening socket plus what is needed to remove its file, and only its file, on exit."""

    sock: socket.socket
    path: str | None = None
    identity: tuple[int, int, int] = (0, 0, 0)
    """(st_dev, st_ino, st_ctime_ns) after setup: inode numbers alone are reused at once."""

    def remove(self) -> bool:
        """Unlink the socket file if it is still the inode we created; True if removed."""
        if self.path is None:
            return False
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if _identity(st) != self.identity or not stat.S_ISSOCK(st.st_mode):
            logger.warning("Left %s in place: it is no longer the socket this server created", self.path)
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        return True

    def close(self) -> None:
        """Close the listening socket and remove its file (idempotent)."""
        self.sock.close()
        if self.remove():
            logger.debug("Removed socket %s", self.path)
        self.path = None


def bind_unix(path: str, mode: int = 0o660, group: int | None = None, backlog: int = BACKLOG) -> BoundSocket:
    """Bind and listen on ``path`` with ``mode`` and ``group``; raise :class:`SocketError` if we cannot."""
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise SocketError(
            f"cannot listen on {path}: the path is {size} bytes, AF_UNIX allows at most {MAX_PATH_BYTES}; "
            "use a shorter --socket"
        )
    _ensure_parent(path)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Owner-only while it is bound: never more open than the target mode (which includes 0600).
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        bound = BoundSocket(sock, path, _identity(os.lstat(path)))
    except OSError as exc:
        sock.close()
        hint = ""
        if isinstance(exc, PermissionError):
            parent = os.path.dirname(path)
            hint = f"; uid {os.geteuid()} needs write access to {parent} (check its owner and mode)"
        raise SocketError(f"cannot bind {path}: {_reason(exc)}{hint}") from exc
    try:
        _apply_owner_and_mode(path, mode, group)
        bound.identity = _identity(os.lstat(path))
        sock.listen(backlog)
    except BaseException:
        bound.close()
        raise
    return bound


def bind_tcp(host: str, port: int, backlog: int = BACKLOG) -> BoundSocket:
    """Bind and listen on ``host:port`` (debugging and benchmarks); port 0 picks a free port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SocketError(f"cannot listen on {host}:{port}: {_reason(exc)}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot listen on {host}:{port}: {_reason(exc)}") from exc
    return BoundSocket(sock)


def describe(path: str) -> str:
    """``mode 0660, owner uid 1000, group 1000 (csi)`` for the log line at start."""
    st = os.stat(path)
    try:
        name = f" ({grp.getgrgid(st.st_gid).gr_name})"
    except KeyError:
        name = ""
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, group {st.st_gid}{name}"


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(path) or "/"
    if os.path.isdir(parent):
        return
    if os.path.lexists(parent):
        raise SocketError(
            f"cannot create the socket's directory {parent}: it exists and is not a directory; "
            "choose another --socket"
        )
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise SocketError(
            f"cannot create the socket's directory {parent}: {_reason(exc)}; "
            "create it (or mount a volume there) or choose another --socket"
        ) from exc
    logger.info("Created directory %s for the socket", parent)


def _clear_stale(path: str) -> None:
    """Refuse anything but a dead socket at ``path``; remove a dead one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketError(f"cannot inspect {path}: {_reason(exc)}") from exc
    if stat.S_ISLNK(st.st_mode):
        kind = "a symbolic link"
    elif stat.S_ISDIR(st.st_mode):
        kind = "a directory"
    elif stat.S_ISREG(st.st_mode):
        kind = "a regular file"
    elif not stat.S_ISSOCK(st.st_mode):
        kind = "not a socket"
    else:
        kind = ""
    if kind:
        raise SocketError(
            f"cannot listen on {path}: it exists and is {kind}; left untouched. "
            "Remove it yourself or choose another --socket"
        )
    state = _probe(path)
    if state == "live":
        raise SocketError(
            f"cannot listen on {path}: another server is already listening on it; "
            "stop it first or choose another --socket"
        )
    if state != "stale":
        raise SocketError(
            f"cannot listen on {path}: the existing socket cannot be checked ({state}); left untouched"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketError(f"cannot remove the stale socket {path}: {_reason(exc)}") from exc
    logger.info("Removed stale socket %s (nothing was listening on it)", path)


def _probe(path: str) -> str:
    """``live`` if something accepts on ``path``, ``stale`` if refused, else a reason."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return "stale"
    except FileNotFoundError:
        return "stale"
    except TimeoutError:
        # A full backlog or a stuck server: something owns it, so do not steal it.
        return "live"
    except OSError as exc:
        return _reason(exc)
    finally:
        probe.close()
    return "live"


def _apply_owner_and_mode(path: str, mode: int, group: int | None) -> None:
    if group is not None:
        try:
            os.chown(path, -1, group)
        except OSError as exc:
            raise SocketError(
                f"cannot give {path} to group {group}: {_reason(exc)}; "
                "the server's user must be root or a member of that group (--socket-group)"
            ) from exc
    try:
        os.chmod(path, mode)
    except OSError as exc:
        raise SocketError(f"cannot set mode {mode:04o} on {path}: {_reason(exc)}") from exc
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) != mode or (group is not None and st.st_gid != group):
        raise SocketError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o} group {st.st_gid} after setting "
            f"mode {mode:04o} group {group}; does the filesystem support it?"
        )


def _reason(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__
