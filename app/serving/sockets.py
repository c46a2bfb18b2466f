"""The listening socket's life: bind in a private directory, set mode and group, rename into place
(never over a live socket or a non-socket), remove it on exit only if still ours. docs/internals.md."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass

from app.serving.private_dir import INNER, PrivateDir, SocketError, inner_path, probe, reason, replaced
from client.address import MAX_PATH_BYTES

logger = logging.getLogger("app.serving.sockets")

BACKLOG = 2048


@dataclass(slots=True)
class BoundSocket:
    """A listening socket plus what is needed to remove its file, and only its file, on exit."""

    sock: socket.socket
    path: str | None = None
    identity: tuple[int, int, int] = (0, 0, 0)  # (dev, ino, ctime_ns): inode numbers alone are reused

    def in_place(self) -> bool | None:
        """True while ``path`` is still our socket, False if something replaced it, None if gone."""
        if self.path is None:
            return None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return _identity(st) == self.identity and stat.S_ISSOCK(st.st_mode)

    def lost(self) -> bool:
        """True once a socket file of ours was removed or replaced (never for TCP or inherited sockets)."""
        return self.path is not None and self.in_place() is not True

    def close(self) -> None:
        """Close the listening socket and unlink its file if it is still the one we made (idempotent)."""
        self.sock.close()
        path, state = self.path, self.in_place()
        self.path = None
        if path is not None and state:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            logger.debug("Removed socket %s", path)
        elif state is False:
            logger.warning("Left %s in place: it is no longer the socket this server created", path)


def bind_unix(path: str, mode: int = 0o660, group: int | None = None) -> BoundSocket:
    """Listen on ``path`` with ``mode`` and ``group``; :class:`SocketError` if we cannot."""
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise SocketError(
            f"cannot listen on {path}: the path is {size} bytes, AF_UNIX allows at most {MAX_PATH_BYTES}; "
            "use a shorter --socket"
        )
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        cannot = f"cannot create the socket's directory {parent}"
        if os.path.lexists(parent):
            raise SocketError(f"{cannot}: it exists and is not a directory; choose another --socket")
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as exc:
            fix = "create it (or mount a volume there) or choose another --socket"
            raise SocketError(f"{cannot}: {reason(exc)}; {fix}") from exc
        logger.info("Created directory %s for the socket", parent)
    try:
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SocketError(f"cannot open the socket's directory {parent}: {reason(exc)}") from exc
    try:
        _warn_if_shared(parent, os.fstat(parent_fd), group)
        private = PrivateDir.create(path, parent, parent_fd)
        try:
            return _bind_privately(path, private, mode, group)
        finally:
            private.remove()
    finally:
        os.close(parent_fd)


def bind_tcp(host: str, port: int) -> BoundSocket:
    """Bind and listen on ``host:port`` (debugging and benchmarks); port 0 picks a free port."""
    sock = None
    try:
        family, *_, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # Not socket.create_server: it makes an IPv6 listener IPv6-only, not the system's default.
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise SocketError(f"cannot listen on {host}:{port}: {reason(exc)}") from exc
    return BoundSocket(sock)


def describe(path: str) -> str:
    """``mode 0660, owner uid 1000, group 1000 (csi)`` for the log line at start."""
    st = os.lstat(path)
    try:
        name = f" ({grp.getgrgid(st.st_gid).gr_name})"
    except KeyError:
        name = ""
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, group {st.st_gid}{name}"


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _bind_privately(path: str, private: PrivateDir, mode: int, group: int | None) -> BoundSocket:
    """Bind inside ``private``, set group and mode there (never following a symlink), listen, move."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Owner-only while it is bound: never more open than the target mode (which includes 0600).
        old_umask = os.umask(0o177)
        try:
            sock.bind(inner_path(private.fd, private.path))
        except OSError as exc:
            raise SocketError(f"cannot bind {path}: {reason(exc)}") from exc
        finally:
            os.umask(old_umask)
        made = private.inner_socket(path)
        if group is not None:
            try:
                os.chown(INNER, -1, group, dir_fd=private.fd, follow_symlinks=False)
            except OSError as exc:
                raise SocketError(
                    f"cannot give {path} to group {group}: {reason(exc)}; "
                    "the server's user must be root or a member of that group (--socket-group)"
                ) from exc
        try:
            os.chmod(INNER, mode, dir_fd=private.fd, follow_symlinks=False)
        except (OSError, ValueError, NotImplementedError) as exc:
            why = reason(exc) if isinstance(exc, OSError) else str(exc)
            raise SocketError(f"cannot set mode {mode:04o} on {path}: {why}") from exc
        st = private.inner_socket(path, made)
        if stat.S_IMODE(st.st_mode) != mode or (group is not None and st.st_gid != group):
            raise SocketError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o} group {st.st_gid} after setting "
                f"mode {mode:04o} group {group}; does the filesystem support it?"
            )
        sock.listen(BACKLOG)
        identity = _move_into_place(path, private, made)
    except BaseException:
        sock.close()
        raise
    return BoundSocket(sock, path, identity)


def _move_into_place(path: str, private: PrivateDir, made: os.stat_result) -> tuple[int, int, int]:
    """Rename the finished socket over ``path`` if only a dead socket or nothing is there."""
    name = os.path.basename(path)
    stale = _check_target(path, private.parent_fd)
    try:
        os.rename(INNER, name, src_dir_fd=private.fd, dst_dir_fd=private.parent_fd)
    except OSError as exc:
        raise SocketError(f"cannot move the socket into place at {path}: {reason(exc)}") from exc
    # The rename keeps the inode and changes its ctime: the identity for cleanup is taken now.
    try:
        st = os.stat(name, dir_fd=private.parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISSOCK(st.st_mode) or not os.path.samestat(st, made):
        raise replaced(path, "another program replaced the socket as soon as it appeared")
    if stale:
        logger.info("Removed stale socket %s (nothing was listening on it)", path)
    return _identity(st)


def _check_target(path: str, parent_fd: int) -> bool:
    """Refuse anything but a dead socket at ``path``; True if a dead one is there to replace."""
    try:
        st = os.stat(os.path.basename(path), dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SocketError(f"cannot inspect {path}: {reason(exc)}") from exc
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a socket")
    if kind:
        raise SocketError(
            f"cannot listen on {path}: it exists and is {kind}; left untouched. "
            "Remove it yourself or choose another --socket"
        )
    state = probe(path)
    if state == "stale":
        return True
    if state == "live":
        why = "another server is already listening on it; stop it first or choose another --socket"
    else:
        why = f"the existing socket cannot be checked ({state}); left untouched"
    raise SocketError(f"cannot listen on {path}: {why}")


_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory",
    stat.S_IFREG: "a regular file",
    stat.S_IFSOCK: "",
}


def _warn_if_shared(parent: str, st: os.stat_result, group: int | None) -> None:
    """Warn when users other than ours and the socket's group can replace entries in ``parent``."""
    euid = os.geteuid()
    # New files take the directory's group when it is setgid.
    socket_gid = group if group is not None else st.st_gid if st.st_mode & stat.S_ISGID else os.getegid()
    writers = []
    if st.st_mode & stat.S_IWOTH:
        writers.append("every user")
    if st.st_mode & stat.S_IWGRP and st.st_gid != socket_gid:
        writers.append(f"group {st.st_gid}")
    owner_other = st.st_uid not in (0, euid)
    if owner_other:
        writers.append(f"its owner uid {st.st_uid}")
    if not writers:
        return
    if st.st_mode & stat.S_ISVTX and not owner_other:
        risk = "its sticky bit stops them from renaming or removing the socket while it exists, but any"
        risk += " of them can take the path before the server starts or after it stops"
    else:
        risk = "any of them can remove the socket or replace it with their own, so clients could reach"
        risk += " another program"
    logger.warning(
        f"Socket directory {parent} can be written by {' and '.join(writers)} (mode "
        f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, group {st.st_gid}): {risk}; keep it "
        f"writable only by uid {euid} and group {socket_gid}, or mount it read-only in the other containers"
    )
