"""Who opened a loopback TCP connection: its owner uid (``sock_diag``, as ``ss`` asks), and the fsgid
and groups of a process holding it, which ``connect()`` checks. Linux only (docs/internals.md)."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
# nlmsghdr (length, type, flags, seq, pid), inet_diag_req_v2 (family, protocol, ext, pad, states),
# inet_diag_sockid (sport, dport in network order, src[16], dst[16], interface, cookie[2]: all-ones).
_REQUEST = struct.Struct("=IHHIIBBBBIHH16s16sIII")
# nlmsghdr's type; after inet_diag_msg's 4 bytes, sockid, expires, rqueue and wqueue: uid, inode.
_ANSWER = struct.Struct("=4xH74xII")
_MAX_FDS = 1024  # most open files of a process searched: the usual soft limit
_RECENT: deque[int] = deque(maxlen=16)  # pids of recent callers (a race only costs a full scan)


@dataclass(frozen=True, slots=True)
class Caller:
    """A connection's owner, with a holding process's fsgid and groups (``source`` ``process``)."""

    uid: int
    gid: int = -1  # -1, pid 0 and groups None when no process was visible or searched for
    pid: int = 0
    groups: frozenset[int] | None = None
    source: str = "none"  # "process", "none" (not visible), "skipped" (no group would change the verdict)


def _packed(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, ip.packed.ljust(16, b"\0")


def _diag(family: int, src: tuple[bytes, int], dst: tuple[bytes, int]) -> tuple[int, int] | None:
    """One exact NETLINK_SOCK_DIAG lookup of the TCP socket ``src -> dst``: ``(uid, inode)``."""
    ports = socket.htons(src[1]), socket.htons(dst[1])
    head = (_REQUEST.size, _SOCK_DIAG_BY_FAMILY, 1, 1, 0, family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    request = _REQUEST.pack(*head, *ports, src[0], dst[0], 0, 0xFFFFFFFF, 0xFFFFFFFF)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(request, (0, 0))
        answer = nl.recv(8192)
    # Anything but one inet_diag_msg (NLMSG_ERROR among others) finds nothing.
    if len(answer) < _ANSWER.size:
        return None
    kind, uid, inode = _ANSWER.unpack_from(answer)
    return (uid, inode) if kind == _SOCK_DIAG_BY_FAMILY else None


def tcp_owner(peer: tuple[str, int], local: tuple[str, int]) -> tuple[int, int] | None:
    """``(uid, inode)`` of the live socket of this network namespace connected from ``peer`` to ``local``."""
    try:
        (family, peer_ip), (local_family, local_ip) = _packed(peer[0]), _packed(local[0])
    except ValueError:
        return None
    if local_family != family:
        return None
    attempts = [(family, (peer_ip, peer[1]), (local_ip, local[1]))]
    if family == socket.AF_INET and ":" in peer[0]:
        # A dual-stack listener sees an IPv4 caller as ::ffff:a.b.c.d, which an IPv6 one may dial too.
        mapped = [b"\0" * 10 + b"\xff\xff" + ip[:4] for ip in (peer_ip, local_ip)]
        attempts.append((socket.AF_INET6, (mapped[0], peer[1]), (mapped[1], local[1])))
    for fam, src, dst in attempts:
        try:
            found = _diag(fam, src, dst)
        except OSError:
            return None
        if found is not None and found[1] != 0:  # inode 0: orphaned, no process holds it any more
            return found
    return None


def _holds(pid: int, target: str) -> bool:
    """Whether ``pid`` has ``target`` open; not searched past :data:`_MAX_FDS` files (the caller's choice)."""
    fd_dir, fds = f"/proc/{pid}/fd", []
    with contextlib.suppress(OSError), os.scandir(fd_dir) as entries:
        fds = [entry.name for entry in itertools.islice(entries, _MAX_FDS + 1)]
    # A new connection tends to have one of the highest fd numbers.
    for fd in reversed(fds if len(fds) <= _MAX_FDS else []):
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{fd}") == target:
                return True
    return False


def _process_holding(inode: int) -> int | None:
    """The pid of a visible process holding the socket ``inode``: recent callers' first, then all."""
    target = f"socket:[{inode}]"
    for pid in list(_RECENT):
        if _holds(pid, target):
            return pid
    for pid in sorted((int(name) for name in os.listdir("/proc") if name.isdigit()), reverse=True):
        if _holds(pid, target):  # not among the recent ones, but for a race: a repeat costs a check
            _RECENT.append(pid)
            return pid
    return None


def find_caller(owner: tuple[int, int], groups_matter: Callable[[int], bool] | None = None) -> Caller:
    """The caller owning ``owner`` (from :func:`tcp_owner`); none searched if not ``groups_matter(uid)``."""
    uid, inode = owner
    if groups_matter is not None and not groups_matter(uid):
        return Caller(uid, source="skipped")
    pid = _process_holding(inode)
    if pid is not None:  # its fsuid, fsgid and groups: what the kernel checks on connect()
        with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                fields = dict(line.partition(":")[::2] for line in status)
            fsuid, fsgid = int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3])
            if fsuid == uid:
                groups = frozenset(int(g) for g in fields.get("Groups", "").split()) | {fsgid}
                return Caller(uid, fsgid, pid, groups, "process")
    return Caller(uid)
