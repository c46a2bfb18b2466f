"""The private 0700 directory a Unix socket is bound in before it is renamed into place, and the
removal of those that killed starts left behind. Why and how: docs/internals.md, "Serving"."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import stat
import tempfile
from dataclasses import dataclass

logger = logging.getLogger("app.serving.sockets")

PROBE_TIMEOUT = 1.0  # seconds an existing socket has to accept before it is judged
PROC_FD = "/proc/self/fd"
INNER = "s"  # the socket's name inside the private directory (AF_UNIX paths stop at 107 bytes)
_RANDOM = "[a-z0-9_]{8}"  # what tempfile.mkdtemp puts after the prefix
_CREATE_ATTEMPTS = 5
_OPEN_PRIVATE = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # never a symlink's target


class SocketError(Exception):
    """The server cannot listen where it was told to; the message says what, where and what to do."""


def ours(st: os.stat_result, kind: int, mode: int | None = None) -> bool:
    """``st`` is a ``kind`` (``stat.S_IFDIR``...) of our uid, with ``mode`` if given (setgid aside)."""
    return (
        stat.S_IFMT(st.st_mode) == kind
        and st.st_uid == os.geteuid()
        and (mode is None or stat.S_IMODE(st.st_mode) & ~stat.S_ISGID == mode)
    )


@dataclass(slots=True)
class PrivateDir:
    """A fresh 0700 directory of ours beside the target, held open by descriptor."""

    parent_fd: int
    entry: str
    fd: int
    path: str

    @classmethod
    def create(cls, target: str, parent: str, parent_fd: int) -> PrivateDir:
        """Made after removing the private directories of ``target`` that killed starts left."""
        remove_leftovers(target, parent, parent_fd)
        for _ in range(_CREATE_ATTEMPTS):
            try:
                made = tempfile.mkdtemp(prefix=_private_prefix(target), dir=parent)
            except OSError as exc:
                fix = f"; uid {os.geteuid()} needs write access to {parent} (check its owner and mode)"
                hint = fix if isinstance(exc, PermissionError) else ""
                raise SocketError(f"cannot bind {target}: {reason(exc)}{hint}") from exc
            entry = os.path.basename(made)
            try:
                fd = os.open(entry, _OPEN_PRIVATE, dir_fd=parent_fd)
            except FileNotFoundError:
                continue  # another start removed it as a leftover (it was empty): take a fresh one
            except OSError as exc:
                raise swapped(target, made) from exc
            st = os.fstat(fd)
            if not ours(st, stat.S_IFDIR, 0o700):
                os.close(fd)
                if st.st_uid == os.geteuid():  # ours after all (a strange umask): do not leave it behind
                    with contextlib.suppress(OSError):
                        os.rmdir(entry, dir_fd=parent_fd)
                raise swapped(target, made)
            # Locked, another server's start leaves it alone. Not lockable: that start is removing it
            # as a leftover (it is still empty), or already has; take a fresh one.
            if try_lock(fd) is not False and same_entry(entry, parent_fd, st):
                return cls(parent_fd, entry, fd, made)
            os.close(fd)
        raise SocketError(
            f"cannot bind {target}: {_CREATE_ATTEMPTS} private directories beside it were removed by "
            "another program during start; make sure only this server uses its directory"
        )

    def inner_socket(self, target: str, made: os.stat_result | None = None) -> os.stat_result:
        """The socket inside; :class:`SocketError` unless it is still ours (``made``)."""
        try:
            st = os.stat(INNER, dir_fd=self.fd, follow_symlinks=False)
        except OSError as exc:
            raise swapped(target, self.path) from exc
        if not ours(st, stat.S_IFSOCK) or (made is not None and not os.path.samestat(st, made)):
            raise swapped(target, self.path)
        return st

    def remove(self) -> None:
        """Remove the socket if it is still inside, then the directory if it is still ours."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(INNER, dir_fd=self.fd)
            if same_entry(self.entry, self.parent_fd, os.fstat(self.fd)):
                os.rmdir(self.entry, dir_fd=self.parent_fd)
            else:
                logger.warning("Left %s in place: it is no longer the directory this server made", self.path)
        except OSError as exc:
            logger.warning("Could not remove the private directory %s: %s", self.path, reason(exc))
        finally:
            os.close(self.fd)


def _private_prefix(target: str) -> str:
    return f".{os.path.basename(target)[:64]}."


def inner_path(fd: int, path: str) -> str:
    """The socket inside the private directory ``fd``: through /proc when it has it, else by ``path``."""
    by_fd = f"{PROC_FD}/{fd}"
    return os.path.join(by_fd if os.path.isdir(by_fd) else path, INNER)


def try_lock(fd: int) -> bool | None:
    """Lock a private directory: True if taken, False if held elsewhere, None if unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def same_entry(entry: str, parent_fd: int, st: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(entry, dir_fd=parent_fd, follow_symlinks=False), st)
    except FileNotFoundError:
        return False


def remove_leftovers(path: str, parent: str, parent_fd: int) -> None:
    """Remove private directories of this socket name that killed starts left behind (best effort)."""
    pattern = re.compile(re.escape(_private_prefix(path)) + _RANDOM)
    try:  # names only: each is opened through ``parent_fd``, never following a symlink
        names = sorted(name for name in os.listdir(parent) if pattern.fullmatch(name))
    except OSError as exc:
        logger.debug("Did not look for leftover private directories in %s: %s", parent, reason(exc))
        return
    for name in names:
        leftover = os.path.join(parent, name)
        try:
            held = _remove_leftover(name, leftover, parent_fd)
        except OSError as exc:
            logger.debug("Left %s in place: %s", leftover, reason(exc))
            continue
        if held is not None:
            logger.info("Removed %s, left by a start that did not finish (%s)", leftover, held)


def _remove_leftover(name: str, leftover: str, parent_fd: int) -> str | None:
    """Remove ``name`` if it is a dead start's private directory; what it held, or None if kept."""
    fd = os.open(name, _OPEN_PRIVATE, dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        if not ours(st, stat.S_IFDIR, 0o700) or try_lock(fd) is not True:
            return None
        with os.scandir(fd) as entries:
            inside = [entry.name for entry in entries]
        if inside == [INNER]:
            made = os.stat(INNER, dir_fd=fd, follow_symlinks=False)
            if not ours(made, stat.S_IFSOCK) or probe(inner_path(fd, leftover)) != "stale":
                return None
            os.unlink(INNER, dir_fd=fd)
        elif inside:
            return None
        if not same_entry(name, parent_fd, st):
            return None
        os.rmdir(name, dir_fd=parent_fd)
        return "a dead socket" if inside else "nothing"
    finally:
        os.close(fd)  # releases the lock


def swapped(path: str, directory: str) -> SocketError:
    return replaced(path, f"the private directory {directory} was replaced during start")


def replaced(path: str, what: str) -> SocketError:
    return SocketError(
        f"cannot listen on {path}: {what}; another user can write its directory "
        f"{os.path.dirname(path) or '.'}: make it writable only by the server's user and the socket's group"
    )


def probe(path: str) -> str:
    """``live`` if something accepts on ``path``, ``stale`` if refused, else a reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return "stale"
        except TimeoutError:  # a full backlog or a stuck server: something owns it, do not steal it
            return "live"
        except OSError as exc:
            return reason(exc)
    return "live"


def reason(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__
