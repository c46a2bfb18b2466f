"""The data directory and the database's files, checked before SQLite opens them: what another uid
could swap, rename or plant is refused (:class:`StoreError`), never repaired; docs/internals.md."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from app.storage.store import StoreError

AGAIN = "; fix it, or set --data-dir (UDS_DATA_DIR) to another directory"
_ASIDE = "move it aside (another uid may have put it there to read or rewrite the messages)"


def _cannot(action: str, exc: OSError, fix: str = AGAIN) -> StoreError:
    return StoreError(
        f"cannot {action}: {exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))}{fix}"
    )


def prepare_files(path: Path) -> list[Path]:
    """Check the database and its side files, create the missing ones (0600) first; the logs created."""
    exists = _owned_file(path, "database")
    for suffix in ("-wal", "-shm", "-journal"):  # what SQLite opens beside it, following links
        _owned_file(Path(f"{path}{suffix}"), "database file")
    if not exists and not _create(path, "database"):
        _owned_file(path, "database")  # another server starting at the same instant made it first
    return make_logs(path)


def make_logs(path: Path) -> list[Path]:
    """Create the database's ``-wal`` and ``-shm`` (0600) where absent; return those created."""
    return [log for log in (Path(f"{path}-wal"), Path(f"{path}-shm")) if _create(log, "database file")]


def _create(path: Path, what: str) -> bool:
    """Create ``path`` private (0600), never through a link; False if something is there already."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:  # an open server's, or a crash's: checked before
        return False
    except OSError as exc:
        raise _cannot(f"create {what} {path}", exc) from exc
    return True


def _owned_file(path: Path, what: str) -> bool:
    """Whether ``path`` exists; refused unless a regular file (not a link) of this uid; made 0600."""
    uid = os.geteuid()
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _cannot(f"reach {what} {path}", exc) from exc
    if stat.S_ISLNK(info.st_mode):
        raise StoreError(f"{what} {path} is a symbolic link; {_ASIDE}{AGAIN}")
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"{what} {path} is not a regular file{AGAIN}")
    if info.st_uid != uid:
        raise StoreError(f"{what} {path} belongs to uid {info.st_uid}, not this server's uid {uid}; {_ASIDE}")
    if info.st_mode & 0o077:
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                os.fchmod(descriptor, 0o600)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise _cannot(f"make {what} {path} private (0600)", exc) from exc
    return True


def prepare_directory(directory: Path, private: bool) -> None:
    """Create the data directory (0700), or refuse one another uid could swap the database in (an
    existing directory's mode is never changed)."""
    uid = os.geteuid()
    directory = Path(os.path.abspath(directory))
    try:
        is_file = directory.exists() and not directory.is_dir()
    except OSError as exc:  # a parent this uid may not search
        raise _cannot(f"reach data directory {directory} (uid {uid})", exc) from exc
    if is_file:
        raise StoreError(f"data directory {directory} is not a directory (a file is there){AGAIN}")
    _check_parents(directory, directory.parents, uid)  # before mkdir: nothing made under a bad one
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot(f"create data directory {directory} (uid {uid})", exc) from exc
    real = Path(os.path.realpath(directory))
    _check_parents(directory, [*directory.parents, *real.parents], uid)
    _check_link(directory, uid)
    info = real.stat()
    if info.st_uid not in (uid, 0):  # its owner could swap the database for another at any time
        raise StoreError(
            f"data directory {directory} belongs to uid {info.st_uid}, who could replace the database; "
            f"use a directory of uid {uid} (or root's), or set --data-dir (UDS_DATA_DIR) to another directory"
        )
    if _open_to_others(info.st_mode) and not private:
        raise StoreError(
            f"data directory {directory} can be written by other uids (mode {info.st_mode & 0o7777:04o}, "
            "no sticky bit), who could rename the database away; make it private (chmod 700), or, if only "
            "this server can reach it (an emptyDir mounted into its container alone), set --data-dir-private "
            "(UDS_DATA_DIR_PRIVATE=true)"
        )
    try:  # SQLite creates files beside the database; an unnamed file cannot be planted in advance
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        fix = f"; make it writable for uid {uid}, or set --data-dir (UDS_DATA_DIR) to another directory"
        raise _cannot(f"write in data directory {directory} (uid {uid})", exc, fix) from exc


def _open_to_others(mode: int) -> bool:
    return bool(mode & 0o022) and not mode & stat.S_ISVTX


def _check_link(path: Path, uid: int) -> None:
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(info.st_mode) and info.st_uid not in (uid, 0):
        raise StoreError(
            f"{path} is a symbolic link of uid {info.st_uid}, who could point it elsewhere; use the "
            f"data directory's real path, or set --data-dir (UDS_DATA_DIR) to another directory"
        )


def _check_parents(directory: Path, parents: Sequence[Path], uid: int) -> None:
    for parent in dict.fromkeys(parents):
        _check_link(parent, uid)
        try:
            info = parent.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _cannot(f"reach {parent} (uid {uid})", exc) from exc
        where = f"directory {parent} (a parent of data directory {directory})"
        if info.st_uid not in (uid, 0):
            raise StoreError(
                f"{where} belongs to uid {info.st_uid}, who could replace the data directory; use a "
                f"path whose directories are root's or uid {uid}'s{AGAIN}"
            )
        if _open_to_others(info.st_mode):
            raise StoreError(
                f"{where} can be written by other uids (mode {stat.S_IMODE(info.st_mode):04o}, no sticky "
                f"bit), who could replace the data directory; make it writable by its owner only "
                f"(chmod go-w){AGAIN}"
            )
