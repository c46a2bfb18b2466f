"""May a user, with given groups, ``connect()`` to a Unix socket? The kernel's rule, never wider: search
on each directory walked, write on the socket, by POSIX ACL or mode; root as any uid. Linux only."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

Groups = frozenset[int] | None  # None: unknown
Entries = list[tuple[int, int, int]]  # an access ACL's (tag, permission bits, uid or gid)

_ACL_ENTRY = struct.Struct("=HHI")  # posix_acl_xattr_entry, after a 4-byte version (2)
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 1, 2, 4, 8, 16, 32
_MINIMAL_ACL = ((_ACL_USER_OBJ, 6), (_ACL_GROUP_OBJ, 3), (_ACL_OTHER, 0))  # the mode's bits as an ACL
_MAX_SYMLINKS = 40  # followed in one path lookup before the kernel fails with ELOOP


def _acl(path: str, mode: int) -> Entries:
    """The access ACL of ``path``, or ``mode`` as the minimal ACL; OSError if unreadable."""
    try:
        raw = os.getxattr(path, "system.posix_acl_access")
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        return [(tag, mode >> shift & 7, 0) for tag, shift in _MINIMAL_ACL]
    if len(raw) < 4 or (len(raw) - 4) % _ACL_ENTRY.size or struct.unpack_from("=I", raw)[0] != 2:
        raise OSError(errno.EINVAL, "unreadable access ACL", path)
    return [_ACL_ENTRY.unpack_from(raw, offset) for offset in range(4, len(raw), _ACL_ENTRY.size)]


def _may(path: str, info: os.stat_result, uid: int, groups: Groups, bit: int) -> bool:
    """The kernel's ``posix_acl_permission`` (the mode as the minimal ACL); groups None: all must allow."""
    entries = _acl(path, info.st_mode)
    perms = {tag: perm for tag, perm, _ in entries}  # read for the tags that occur once
    mask = perms.get(_ACL_MASK, 0o7)
    if uid == info.st_uid:
        return bool(perms.get(_ACL_USER_OBJ, 0) & bit)
    for tag, perm, who in entries:
        if tag == _ACL_USER and who == uid:
            return bool(perm & mask & bit)
    group_entries = [
        (perm, info.st_gid if tag == _ACL_GROUP_OBJ else who)
        for tag, perm, who in entries
        if tag in (_ACL_GROUP_OBJ, _ACL_GROUP)
    ]
    other = bool(perms.get(_ACL_OTHER, 0) & bit)
    if groups is None:
        return other and all(perm & mask & bit for perm, _ in group_entries)
    matched = [perm for perm, gid in group_entries if gid in groups]
    return any(perm & mask & bit for perm in matched) if matched else other


def traversal(path: str) -> tuple[list[str], str]:
    """The directories searched to open ``path`` (links too) and the file reached; OSError as the kernel."""
    searched: list[str] = []
    current, links = "/", 0
    given = path if path.startswith("/") else os.path.join(os.getcwd(), path)  # a cwd may be gone
    names = [name for name in given.split("/") if name not in ("", ".")]
    while names:
        name = names.pop(0)
        searched.append(current)
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        info = os.lstat(candidate)
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            names[:0] = [part for part in target.split("/") if part not in ("", ".")]
            continue
        if names and not stat.S_ISDIR(info.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        current = candidate
    return searched, current


@dataclass(frozen=True, slots=True)
class SocketAccess:
    """Who may ``connect()`` to the socket at ``path`` now; what cannot be checked refuses."""

    path: str

    def allows(self, uid: int, groups: Groups) -> bool:
        return self._walk(lambda path, info, bit: _may(path, info, uid, groups, bit))

    def may_ever(self, uid: int) -> bool:
        """False when ``uid`` may not connect whatever its groups (each file's best group tried)."""

        def may_some(path: str, info: os.stat_result, bit: int) -> bool:
            gids = {info.st_gid} | {who for tag, _, who in _acl(path, info.st_mode) if tag == _ACL_GROUP}
            return any(_may(path, info, uid, frozenset(g), bit) for g in ((), *((gid,) for gid in gids)))

        return self._walk(may_some)

    def _walk(self, may: Callable[[str, os.stat_result, int], bool]) -> bool:
        try:
            searched, final = traversal(self.path)
            target = os.stat(final)
            if not stat.S_ISSOCK(target.st_mode):
                return False
            for directory in dict.fromkeys(searched):
                if not may(directory, os.stat(directory), 0o1):
                    return False
            return may(final, target, 0o2)
        except OSError:
            return False

    def describe(self) -> str:
        """``mode 0660, owner 0, group 4242`` for messages (or why it cannot be read)."""
        try:
            info = os.stat(self.path)
        except OSError as exc:
            return (exc.strerror or type(exc).__name__).lower()
        return f"mode {stat.S_IMODE(info.st_mode):04o}, owner {info.st_uid}, group {info.st_gid}"
