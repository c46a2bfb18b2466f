"""Who opened a loopback TCP connection, and may that user ``connect()`` to a Unix socket?

The kernel names the owner uid of a TCP socket in this network namespace (``sock_diag``, as
``ss`` does); the groups come from a process holding that socket. :class:`SocketAccess` applies
the kernel's permission rule, never wider. Why and how: docs/internals.md, "The proxy".
Stdlib only, Linux only.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Caller", "SocketAccess", "find_caller", "tcp_owner", "traversal"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid.
_REQ = struct.Struct("=BBBBI")
# inet_diag_sockid: sport, dport (big-endian), src[16], dst[16], interface, cookie[2].
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
# inet_diag_msg after its sockid (48 bytes, 4 before it): expires, rqueue, wqueue, uid, inode.
_MSG_TAIL = struct.Struct("=IIIII")
_MSG_TAIL_AT = 4 + 48
_MAX_FDS = 1024
"""Most open files of a process searched for a caller's socket: the usual default soft limit,
which a process must raise to hold more."""
_RECENT: deque[int] = deque(maxlen=16)
"""Pids that held recent callers' sockets (threads may race on it: a miss only costs a full scan)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """The owner of a TCP connection: ``pid`` 0, ``gid`` -1 and ``groups`` None when no holding
    process was visible."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] | None
    """The fsgid and supplementary groups of the holding process; None when unknown."""
    source: str
    """Where the groups come from: ``process`` (exact), ``none`` (no process visible) or ``skipped``
    (no group would change the verdict)."""


def _packed(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, ip.packed.ljust(16, b"\0")


def _diag(family: int, src: tuple[bytes, int], dst: tuple[bytes, int]) -> tuple[int, int] | None:
    """One exact NETLINK_SOCK_DIAG lookup of the TCP socket ``src -> dst``: ``(uid, inode)``."""
    request = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES)
        + _SOCKID.pack(src[1], dst[1], src[0], dst[0])
        + _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)
    )
    message = _NLMSG.pack(_NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + request
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(message, (0, 0))
        answer = nl.recv(8192)
    if len(answer) < _NLMSG.size:
        return None
    _, kind, _, _, _ = _NLMSG.unpack_from(answer)
    body = answer[_NLMSG.size :]
    if kind == _NLMSG_ERROR or kind != _SOCK_DIAG_BY_FAMILY or len(body) < _MSG_TAIL_AT + _MSG_TAIL.size:
        return None
    _, _, _, uid, inode = _MSG_TAIL.unpack_from(body, _MSG_TAIL_AT)
    return uid, inode


def tcp_owner(peer: tuple[str, int], local: tuple[str, int]) -> tuple[int, int] | None:
    """``(uid, inode)`` of the socket that connected from ``peer`` to our ``local`` address.

    Only sockets in this network namespace are found; None for anything else (a remote peer, a
    socket already closed, a kernel without sock_diag).
    """
    try:
        family, peer_ip = _packed(peer[0])
        local_family, local_ip = _packed(local[0])
    except ValueError:
        return None
    attempts = [(family, (peer_ip, peer[1]), (local_ip, local[1]))]
    if family == socket.AF_INET and ":" in peer[0]:
        # A dual-stack listener sees an IPv4 caller as ::ffff:a.b.c.d; an IPv6 caller may have
        # dialled that mapped address too.
        mapped = [b"\0" * 10 + b"\xff\xff" + ip[:4] for ip in (peer_ip, local_ip)]
        attempts.append((socket.AF_INET6, (mapped[0], peer[1]), (mapped[1], local[1])))
    if local_family != family:
        return None
    for fam, src, dst in attempts:
        try:
            found = _diag(fam, src, dst)
        except OSError:
            return None
        if found is not None and found[1] != 0:  # inode 0: orphaned, no process holds it any more
            return found
    return None


def _open_fds(pid: int) -> list[str] | None:
    """The fd numbers of ``pid``, or None when it cannot be read or holds over :data:`_MAX_FDS`
    (counted with an early stop: the directory is not read past that)."""
    fds: list[str] = []
    try:
        with os.scandir(f"/proc/{pid}/fd") as entries:
            for entry in entries:
                if len(fds) == _MAX_FDS:
                    return None
                fds.append(entry.name)
    except OSError:
        return None
    return fds


def _holds(pid: int, target: str) -> bool:
    """Whether ``pid`` has ``target`` open; a process holding over :data:`_MAX_FDS` files is not
    searched (False): reading its fds would cost as much as it chooses to hold."""
    fds = _open_fds(pid)
    if fds is None:
        return False
    fd_dir = f"/proc/{pid}/fd"
    for fd in reversed(fds):  # a new connection tends to have one of the highest fd numbers
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{fd}") == target:
                return True
    return False


def _process_holding(inode: int) -> int | None:
    """The pid of a process that has the socket with this inode open, if one is visible.

    The processes that held the last callers' sockets are looked at first (a browser or a script
    opens many connections), then every process, newest first (a new ``curl`` has a high pid).
    """
    target = f"socket:[{inode}]"
    for pid in list(_RECENT):
        if _holds(pid, target):
            return pid
    pids = sorted((int(name) for name in os.listdir("/proc") if name.isdigit()), reverse=True)
    for pid in pids:
        if _holds(pid, target):
            with contextlib.suppress(ValueError):
                _RECENT.remove(pid)
            _RECENT.append(pid)
            return pid
    return None


def _process_credentials(pid: int) -> tuple[int, int, frozenset[int]] | None:
    """``(fsuid, fsgid, groups)`` from ``/proc/<pid>/status``; what the kernel checks on connect()."""
    uid = gid = None
    groups: frozenset[int] = frozenset()
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key == "Uid":
                    uid = int(value.split()[3])
                elif key == "Gid":
                    gid = int(value.split()[3])
                elif key == "Groups":
                    groups = frozenset(int(g) for g in value.split())
    except (OSError, ValueError, IndexError):
        return None
    if uid is None or gid is None:
        return None
    return uid, gid, groups | {gid}


def find_caller(
    peer: tuple[str, int], local: tuple[str, int], groups_matter: Callable[[int], bool] | None = None
) -> Caller | None:
    """The owner of the TCP connection ``peer -> local`` with its groups, or None if not found.

    When ``groups_matter(uid)`` is False, no process is looked for (``source`` ``skipped``): the
    search reads every file descriptor of the caller's processes, as many as it chooses to hold.
    """
    owner = tcp_owner(peer, local)
    if owner is None:
        return None
    uid, inode = owner
    if groups_matter is not None and not groups_matter(uid):
        return Caller(uid=uid, gid=-1, pid=0, groups=None, source="skipped")
    pid = _process_holding(inode)
    if pid is not None:
        credentials = _process_credentials(pid)
        if credentials is not None and credentials[0] == uid:
            return Caller(uid=uid, gid=credentials[1], pid=pid, groups=credentials[2], source="process")
    return Caller(uid=uid, gid=-1, pid=0, groups=None, source="none")


_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_ENTRY = struct.Struct("=HHI")
"""One ``posix_acl_xattr_entry``: tag, permission bits, uid or gid."""
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 1, 2, 4, 8, 16, 32


def _acl(path: str) -> list[tuple[int, int, int]] | None:
    """The entries of the POSIX access ACL of ``path``, or None when it has none (the mode rules).

    Raises :class:`OSError` when an ACL is there but cannot be read: the caller then refuses.
    """
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise
    if len(raw) < 4 or (len(raw) - 4) % _ACL_ENTRY.size or struct.unpack_from("=I", raw)[0] != _ACL_VERSION:
        raise OSError(errno.EINVAL, "unreadable access ACL", path)
    return [_ACL_ENTRY.unpack_from(raw, offset) for offset in range(4, len(raw), _ACL_ENTRY.size)]


def _acl_may(
    entries: list[tuple[int, int, int]],
    info: os.stat_result,
    uid: int,
    groups: frozenset[int] | None,
    bit: int,
) -> bool:
    """The kernel's ``posix_acl_permission`` for one permission bit (no capabilities).

    The owner gets its entry; a named user its entry under the mask; a caller in any group that
    has an entry (the owning group's or a named one) what the best of them allows under the mask,
    and nothing else; everyone else the others' entry. With ``groups`` None, every group entry and
    the others' entry must allow.
    """
    perms = {tag: perm for tag, perm, _ in entries if tag in (_ACL_USER_OBJ, _ACL_MASK, _ACL_OTHER)}
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
    if matched:
        return any(perm & mask & bit for perm in matched)
    return other


def _may(path: str, info: os.stat_result, uid: int, groups: frozenset[int] | None, bit: int) -> bool:
    """The kernel's check (no capabilities) for one permission bit of ``path``, whose stat is ``info``.

    The file's access ACL decides when it has one (:func:`_acl_may`): its mode's group bits are
    then the ACL's mask, not what the owning group gets. Otherwise the owner, group or other
    class of the mode. With ``groups`` None (unknown), the caller may or may not be in the file's
    group, so both the group's and the others' bits must allow: never wider than the kernel.
    """
    entries = _acl(path)
    if entries is not None:
        return _acl_may(entries, info, uid, groups, bit)
    mode = info.st_mode
    if uid == info.st_uid:
        return bool(mode & (bit << 6))
    if groups is None:
        return bool(mode & (bit << 3)) and bool(mode & bit)
    if info.st_gid in groups:
        return bool(mode & (bit << 3))
    return bool(mode & bit)


def _may_some(path: str, info: os.stat_result, uid: int, bit: int) -> bool:
    """Whether :func:`_may` allows ``uid`` with no group or with one of the groups that ``path``
    names (its owning group, and an ACL's named groups)."""
    entries = _acl(path)
    gids = {info.st_gid} | {who for tag, _, who in entries or () if tag == _ACL_GROUP}
    return any(_may(path, info, uid, frozenset(groups), bit) for groups in ((), *((gid,) for gid in gids)))


_MAX_SYMLINKS = 40
"""Symbolic links the kernel follows in one path lookup before it fails with ELOOP."""


def traversal(path: str) -> tuple[list[str], str]:
    """The directories the kernel searches to open ``path``, and the file it reaches.

    The path is resolved name by name, the way the kernel's path walk does: every directory a
    name is looked up in is listed (those of the path as given, then those of each symbolic
    link's target, which restarts at ``/`` when absolute), ``..`` goes to the real parent, and a
    final link is followed too (``connect()`` follows it). ``os.path.realpath`` alone would lose
    the directories that hold the links. Raises :class:`OSError` where the kernel's walk would
    fail (a missing name, a name that is not a directory, too many links).
    """
    # A relative path is walked from / through the working directory: each caller has its own,
    # so every directory above it counts too (stricter than the kernel, never wider).
    given = path if path.startswith("/") else os.path.join(os.getcwd(), path)
    searched: list[str] = []
    current = "/"
    names = [name for name in given.split("/") if name not in ("", ".")]
    links = 0
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


class SocketAccess:
    """Who may ``connect()`` to the Unix socket at ``path``, by the file permissions in force now."""

    def __init__(self, path: str) -> None:
        self.path = path

    def allows(self, uid: int, groups: frozenset[int] | None) -> bool:
        """True if ``uid`` with ``groups`` may search every directory on the way to the socket and write it.

        ``groups`` None means unknown (see :func:`_may`). Anything that cannot be checked (a name
        gone meanwhile, a directory that cannot be read) refuses.
        """
        try:
            searched, final = traversal(self.path)
            target = os.stat(final)
            if not stat.S_ISSOCK(target.st_mode):
                return False
            for directory in dict.fromkeys(searched):
                if not _may(directory, os.stat(directory), uid, groups, 0o1):
                    return False
            return _may(final, target, uid, groups, 0o2)
        except OSError:
            return False

    def may_ever(self, uid: int) -> bool:
        """False when ``uid`` may not connect whatever groups it is in: no scan of its processes then.

        An upper bound of :meth:`allows`: each file is judged with the single group (or none) that
        serves the caller best.
        """
        try:
            searched, final = traversal(self.path)
            target = os.stat(final)
            if not stat.S_ISSOCK(target.st_mode):
                return False
            for directory in dict.fromkeys(searched):
                if not _may_some(directory, os.stat(directory), uid, 0o1):
                    return False
            return _may_some(final, target, uid, 0o2)
        except OSError:
            return False

    def describe(self) -> str:
        """``mode 0660, owner 0, group 4242`` for messages (or why it cannot be read)."""
        try:
            info = os.stat(self.path)
        except OSError as exc:
            return (exc.strerror or type(exc).__name__).lower()
        return f"mode {stat.S_IMODE(info.st_mode):04o}, owner {info.st_uid}, group {info.st_gid}"
