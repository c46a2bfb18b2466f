"""The listening socket's life: check the path, bind safely, set mode and group, clean up.

Better than ``uvicorn --uds``: a live server's socket is never replaced, files that are not sockets
are never touched, the socket is never more open than the target mode, and on exit it is removed
only if it is still the one we made.

The socket is made in a private 0700 directory created beside the target (same filesystem): bound
there under a strict umask, chowned and chmodded there through a directory descriptor with calls
that do not follow symlinks, checked with ``stat(follow_symlinks=False)``, set listening, and only
then renamed over the target path. Nobody else can add or swap entries in that directory, so
whatever another user does to the target path meanwhile (a symlink renamed over it, say), the
server changes the mode and owner of its own socket and of nothing else. ``rename()`` is atomic and
replaces a symlink at the target, never what it points to. A race at the target is still lost
cleanly: the path is checked again just before the rename (a live socket, a file, a directory or a
symlink there stops the start) and just after it (the socket there must be ours, or the start fails).

A start killed between the bind and the rename (``kill -9``, an OOM kill) leaves its private
directory behind, with a dead socket inside. Each start removes such leftovers of its own socket
name before it binds, so a crash loop cannot fill a small ``emptyDir``: only directories named as
``mkdtemp`` names them, owned by the server's uid, mode 0700, holding nothing or just the dead
socket, opened without following symlinks and emptied through their descriptor. A starting server
holds an ``flock`` on its private directory, so another server's cleanup never takes one in use
(and a start whose directory was taken all the same makes a fresh one); the lock dies with the
process, so a killed start's directory is free to go.

Binding by descriptor goes through ``/proc/self/fd``, as glibc's ``fchmodat`` with
``AT_SYMLINK_NOFOLLOW`` does; without ``/proc`` the bind falls back to the private directory's path
and the check after the bind catches a directory swapped meanwhile.

Why by hand: neither the standard library nor uvicorn places a socket this way, and the plain way
loses the race. Measured (``tests/app/test_socket_race.py``), with uid 65534 renaming symlinks over
the path: binding in place, then chown and chmod by path, changed a 0600 file of the server's user
in 409 of 3,000 binds; this module, in none.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import re
import socket
import stat
import tempfile
from dataclasses import dataclass

from client.address import MAX_PATH_BYTES

__all__ = ["BACKLOG", "BoundSocket", "SocketError", "bind_tcp", "bind_unix"]

logger = logging.getLogger("app.serving.sockets")

BACKLOG = 2048
PROBE_TIMEOUT = 1.0
"""Seconds to wait for an existing socket to accept before deciding whether it is alive."""
PROC_FD = "/proc/self/fd"
_INNER = "s"
"""The socket's name inside the private directory (short: AF_UNIX paths stop at 107 bytes)."""
_RANDOM = "[a-z0-9_]{8}"
"""What ``tempfile.mkdtemp`` puts after the prefix: eight of ``[a-z0-9_]``."""
_CREATE_ATTEMPTS = 5
_OPEN_PRIVATE = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""Open a private directory itself, never a symlink's target."""


class SocketError(Exception):
    """The server cannot listen where it was told to; the message says what, where and what to do."""


@dataclass(slots=True)
class BoundSocket:
    """A listening socket plus what is needed to remove its file, and only its file, on exit."""

    sock: socket.socket
    path: str | None = None
    identity: tuple[int, int, int] = (0, 0, 0)
    """(st_dev, st_ino, st_ctime_ns) after setup: inode numbers alone are reused at once."""

    def in_place(self) -> bool | None:
        """True while ``path`` is still our socket, False if something replaced it, None if gone."""
        if self.path is None:
            return None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return _identity(st) == self.identity and stat.S_ISSOCK(st.st_mode)

    def remove(self) -> bool:
        """Unlink the socket file if it is still the inode we created; True if removed."""
        state = self.in_place()
        if state is None or self.path is None:
            return False
        if not state:
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
    """Bind and listen on ``path`` with ``mode`` and ``group``; raise :class:`SocketError` if we cannot.

    The socket is bound, given its group and mode and set listening inside a private 0700
    directory beside ``path``, then renamed into place, so it appears at ``path`` complete and
    nothing another user puts at ``path`` is ever chmodded or chowned.
    """
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise SocketError(
            f"cannot listen on {path}: the path is {size} bytes, AF_UNIX allows at most {MAX_PATH_BYTES}; "
            "use a shorter --socket"
        )
    _ensure_parent(path)
    parent = os.path.dirname(path) or "."
    try:
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SocketError(f"cannot open the socket's directory {parent}: {_reason(exc)}") from exc
    try:
        _warn_if_shared(parent, os.fstat(parent_fd), group)
        _remove_leftovers(path, parent, parent_fd)
        private = _PrivateDir.create(path, parent, parent_fd)
        try:
            return _bind_privately(path, private, mode, group, backlog)
        finally:
            private.remove()
    finally:
        os.close(parent_fd)


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
    st = os.lstat(path)
    try:
        name = f" ({grp.getgrgid(st.st_gid).gr_name})"
    except KeyError:
        name = ""
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, group {st.st_gid}{name}"


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(path) or "."
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


class _PrivateDir:
    """A fresh 0700 directory of ours beside the target, held open by descriptor."""

    def __init__(self, parent_fd: int, entry: str, fd: int, path: str) -> None:
        self.parent_fd = parent_fd
        self.entry = entry
        self.fd = fd
        self.path = path

    @classmethod
    def create(cls, target: str, parent: str, parent_fd: int) -> _PrivateDir:
        for _ in range(_CREATE_ATTEMPTS):
            made = cls._make(target, parent)
            entry = os.path.basename(made)
            try:
                fd = os.open(entry, _OPEN_PRIVATE, dir_fd=parent_fd)
            except FileNotFoundError:
                continue  # another start removed it as a leftover (it was empty): take a fresh one
            except OSError as exc:
                raise _replaced(target, f"the private directory {made} was replaced during start") from exc
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o777 != 0o700:  # setgid may come from the parent
                os.close(fd)
                if st.st_uid == os.geteuid():  # ours after all (a strange umask): do not leave it behind
                    with contextlib.suppress(OSError):
                        os.rmdir(entry, dir_fd=parent_fd)
                raise _replaced(target, f"the private directory {made} was replaced during start")
            # Locked, another server's start leaves it alone. Not lockable: that start is removing it
            # as a leftover (it is still empty), or already has; take a fresh one.
            if _try_lock(fd) is not False and _same_entry(entry, parent_fd, st):
                return cls(parent_fd, entry, fd, made)
            os.close(fd)
        raise SocketError(
            f"cannot bind {target}: {_CREATE_ATTEMPTS} private directories beside it were removed by "
            "another program during start; make sure only this server uses its directory"
        )

    @staticmethod
    def _make(target: str, parent: str) -> str:
        try:
            return tempfile.mkdtemp(prefix=_private_prefix(target), dir=parent)
        except OSError as exc:
            hint = ""
            if isinstance(exc, PermissionError):
                hint = f"; uid {os.geteuid()} needs write access to {parent} (check its owner and mode)"
            raise SocketError(f"cannot bind {target}: {_reason(exc)}{hint}") from exc

    def bind_path(self) -> str:
        """Where to bind: through the descriptor when /proc has it, else the directory's path."""
        return _inner_path(self.fd, self.path)

    def remove(self) -> None:
        """Remove the socket if it is still inside, then the directory if it is still ours."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_INNER, dir_fd=self.fd)
            mine = os.fstat(self.fd)
            st = os.stat(self.entry, dir_fd=self.parent_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                os.rmdir(self.entry, dir_fd=self.parent_fd)
            else:
                logger.warning("Left %s in place: it is no longer the directory this server made", self.path)
        except OSError as exc:
            logger.warning("Could not remove the private directory %s: %s", self.path, _reason(exc))
        finally:
            os.close(self.fd)


def _private_prefix(target: str) -> str:
    return f".{os.path.basename(target)[:64]}."


def _inner_path(fd: int, path: str) -> str:
    """The socket inside the private directory ``fd``: through /proc when it has it, else by ``path``."""
    by_fd = f"{PROC_FD}/{fd}"
    if os.path.isdir(by_fd):
        return f"{by_fd}/{_INNER}"
    return os.path.join(path, _INNER)


def _try_lock(fd: int) -> bool | None:
    """Take the private directory's lock: True if taken, False if held elsewhere, None if unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_entry(entry: str, parent_fd: int, st: os.stat_result) -> bool:
    """True while ``entry`` in the parent is still the directory ``st`` describes."""
    try:
        now = os.stat(entry, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _remove_leftovers(path: str, parent: str, parent_fd: int) -> None:
    """Remove private directories of this socket name that killed starts left behind (best effort)."""
    pattern = re.compile(re.escape(_private_prefix(path)) + _RANDOM)
    try:
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            names = sorted(name for name in os.listdir(listing) if pattern.fullmatch(name))
        finally:
            os.close(listing)
    except OSError as exc:
        logger.debug("Did not look for leftover private directories in %s: %s", parent, _reason(exc))
        return
    for name in names:
        leftover = os.path.join(parent, name)
        try:
            held = _remove_leftover(name, leftover, parent_fd)
        except OSError as exc:
            logger.debug("Left %s in place: %s", leftover, _reason(exc))
            continue
        if held is not None:
            logger.info("Removed %s, left by a start that did not finish (%s)", leftover, held)


def _remove_leftover(name: str, leftover: str, parent_fd: int) -> str | None:
    """Remove ``name`` if it is a dead start's private directory; say what it held, or None if kept.

    Kept: anything that is not a 0700 directory of our uid (a symlink is not opened), a directory
    another start holds locked, anything inside but a single socket of ours named as we name it,
    and a socket something listens on.
    """
    fd = os.open(name, _OPEN_PRIVATE, dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_uid != os.geteuid()
            or stat.S_IMODE(st.st_mode) & ~stat.S_ISGID != 0o700
            or _try_lock(fd) is not True
        ):
            return None
        with os.scandir(fd) as entries:
            inside = [entry.name for entry in entries]
        if inside == [_INNER]:
            made = os.stat(_INNER, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISSOCK(made.st_mode) or made.st_uid != os.geteuid():
                return None
            if _probe(_inner_path(fd, leftover)) != "stale":
                return None
            os.unlink(_INNER, dir_fd=fd)
            held = "a dead socket"
        elif not inside:
            held = "nothing"
        else:
            return None
        if not _same_entry(name, parent_fd, st):
            return None
        os.rmdir(name, dir_fd=parent_fd)
        return held
    finally:
        os.close(fd)  # releases the lock


def _bind_privately(
    path: str, private: _PrivateDir, mode: int, group: int | None, backlog: int
) -> BoundSocket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Owner-only while it is bound: never more open than the target mode (which includes 0600).
        old_umask = os.umask(0o177)
        try:
            sock.bind(private.bind_path())
        finally:
            os.umask(old_umask)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot bind {path}: {_reason(exc)}") from exc
    try:
        made = _inner_stat(path, private)
        if not stat.S_ISSOCK(made.st_mode) or made.st_uid != os.geteuid():
            raise _replaced(path, f"the private directory {private.path} was replaced during start")
        _apply_owner_and_mode(path, private, (made.st_dev, made.st_ino), mode, group)
        sock.listen(backlog)
        identity = _move_into_place(path, private, (made.st_dev, made.st_ino))
    except BaseException:
        sock.close()
        raise
    return BoundSocket(sock, path, identity)


def _inner_stat(path: str, private: _PrivateDir) -> os.stat_result:
    try:
        return os.stat(_INNER, dir_fd=private.fd, follow_symlinks=False)
    except OSError as exc:
        raise _replaced(path, f"the private directory {private.path} was replaced during start") from exc


def _apply_owner_and_mode(
    path: str, private: _PrivateDir, made: tuple[int, int], mode: int, group: int | None
) -> None:
    """Set group and mode on the socket inside the private directory, without following symlinks."""
    if group is not None:
        try:
            os.chown(_INNER, -1, group, dir_fd=private.fd, follow_symlinks=False)
        except OSError as exc:
            raise SocketError(
                f"cannot give {path} to group {group}: {_reason(exc)}; "
                "the server's user must be root or a member of that group (--socket-group)"
            ) from exc
    try:
        os.chmod(_INNER, mode, dir_fd=private.fd, follow_symlinks=False)
    except (OSError, ValueError, NotImplementedError) as exc:
        reason = _reason(exc) if isinstance(exc, OSError) else str(exc)
        raise SocketError(f"cannot set mode {mode:04o} on {path}: {reason}") from exc
    st = _inner_stat(path, private)
    if (st.st_dev, st.st_ino) != made or not stat.S_ISSOCK(st.st_mode):
        raise _replaced(path, f"the private directory {private.path} was replaced during start")
    if stat.S_IMODE(st.st_mode) != mode or (group is not None and st.st_gid != group):
        raise SocketError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o} group {st.st_gid} after setting "
            f"mode {mode:04o} group {group}; does the filesystem support it?"
        )


def _move_into_place(path: str, private: _PrivateDir, made: tuple[int, int]) -> tuple[int, int, int]:
    """Rename the finished socket over ``path`` if only a dead socket or nothing is there."""
    name = os.path.basename(path)
    stale = _check_target(path, private.parent_fd)
    try:
        os.rename(_INNER, name, src_dir_fd=private.fd, dst_dir_fd=private.parent_fd)
    except OSError as exc:
        raise SocketError(f"cannot move the socket into place at {path}: {_reason(exc)}") from exc
    # The rename keeps the inode and changes its ctime: the identity for cleanup is taken now.
    try:
        st = os.stat(name, dir_fd=private.parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != made:
        raise _replaced(path, "another program replaced the socket as soon as it appeared")
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
    return True


def _replaced(path: str, what: str) -> SocketError:
    return SocketError(
        f"cannot listen on {path}: {what}; another user can write its directory "
        f"{os.path.dirname(path) or '.'}: make it writable only by the server's user and the socket's group"
    )


def _warn_if_shared(parent: str, st: os.stat_result, group: int | None) -> None:
    """Warn when users other than ours and the socket's group can replace entries in ``parent``."""
    euid = os.geteuid()
    if group is not None:
        socket_gid = group
    elif st.st_mode & stat.S_ISGID:
        socket_gid = st.st_gid  # new files take the directory's group
    else:
        socket_gid = os.getegid()
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
        risk = (
            "its sticky bit stops them from renaming or removing the socket while it exists, but any of "
            "them can take the path before the server starts or after it stops"
        )
    else:
        risk = (
            "any of them can remove the socket or replace it with their own, so clients could reach "
            "another program"
        )
    logger.warning(
        "Socket directory %s can be written by %s (mode %04o, owner uid %d, group %d): %s; "
        "keep it writable only by uid %d and group %d, or mount it read-only in the other containers",
        parent,
        " and ".join(writers),
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        risk,
        euid,
        socket_gid,
    )


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


def _reason(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__
