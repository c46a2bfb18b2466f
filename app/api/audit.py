"""The audit trail (``--audit-log FILE`` or ``-``): one JSON object per line for every write and
every refusal.

The request path appends a tuple; entries are encoded in batches of :data:`ENCODE_AT` and written
with one ``write`` each tick of the server (0.1 s) or when :data:`FLUSH_AT` bytes are waiting. No
fsync. Each ``write`` carries whole lines and the file is opened ``O_APPEND``, so ``--workers``
processes sharing it never split each other's lines. A full disk costs lines, never requests:
one warning, and when writing works again a line in both logs with the count of lines lost.
Refusals cost the caller nothing, so they are itemized up to a budget (:data:`DENY_BURST`, then
:data:`DENY_PER_SECOND`); past it they are counted by uid into one line a second: a flood of 403s
cannot fill the disk.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from typing import Any

import orjson

from app.logs import escaped

__all__ = [
    "DENY_BURST",
    "DENY_PER_SECOND",
    "FIELDS",
    "FLUSH_AT",
    "MAX_PENDING",
    "MESSAGE_ID",
    "AuditError",
    "AuditLog",
    "open_audit_file",
]

log = logging.getLogger("app.api.audit")

FLUSH_AT = 64 * 1024
MAX_PENDING = 256 * 1024
"""Bytes of lines held while the file cannot be written; past this, new lines are counted as lost."""
ENCODE_AT = 256
"""Entries queued before they are encoded in a batch."""
FIELDS = (
    "uid",
    "gid",
    "pid",
    "method",
    "route",
    "status",
    "decision",
    "scope",
    "message_id",
    "forwarded_for",
)
"""A request's line after its time; ``forwarded_for`` only via a proxy, ``message_id`` only if allowed."""
MESSAGE_ID = "uds.message_id"
"""Scope key where ``POST /messages`` leaves the id it stored, for the audit line."""
MAX_ROUTE = 256
"""Longest path recorded, in characters: a peer chooses it."""
DENY_BURST = 100
"""Refusals itemized in a row before the budget applies."""
DENY_PER_SECOND = 1.0
"""Refusals itemized per second once the burst is spent; the rest are counted (``"event": "denied"``)."""
MAX_DENY_UIDS = 32
"""Distinct uids counted in one ``denied`` line; the others are summed under ``"other"``."""
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class AuditError(ValueError):
    """The audit log file cannot be opened; the message names it and says why."""


def open_audit_file(path: str) -> int:
    """Open (create 0600) ``path`` for appending; refuse a symlink, a non-regular file, one with
    other hard links, a file of another owner or one others may read. Returns the descriptor."""
    shown = escaped(path)
    try:
        fd = os.open(path, _FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AuditError(f"audit log {shown}: is a symbolic link; give the file itself") from None
        raise AuditError(f"audit log {shown}: cannot open it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"audit log {shown}: not a regular file")
        if info.st_nlink > 1:  # another name for it may be a file the server keeps (its database)
            raise AuditError(f"audit log {shown}: has {info.st_nlink} hard links; give a file of its own")
        if info.st_uid != os.geteuid():
            owner = f"owned by uid {info.st_uid}, not this server's {os.geteuid()}"
            raise AuditError(f"audit log {shown}: {owner}")
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise AuditError(f"audit log {shown}: others may open it (mode {mode:04o}); chmod 600 it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class AuditLog:
    """Buffered JSON lines to a file (reopened by :meth:`reopen`) or to standard error (``-``)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.fd: int | None = 2 if target == "-" else None
        self.queued: list[tuple[Any, ...]] = []
        """Entries not yet encoded (at most :data:`ENCODE_AT`)."""
        self.lines: list[bytes] = []
        self.size = 0
        self.tail = b""
        """The unwritten end of a line a short write cut: written first, so no line is ever broken."""
        self.lost = 0
        self.failing = False
        self._second = -1
        self._stamp = ""
        self._tokens = float(DENY_BURST)
        self._refilled = time.monotonic()
        self.denied: dict[str, int] = {}
        """Refusals past the budget not yet written, by uid (``"other"`` past :data:`MAX_DENY_UIDS`)."""
        self._denied_since = 0.0

    def note(self, entry: tuple[Any, ...]) -> None:
        """Queue one request's line: ``entry`` holds ``time.time()`` and then the :data:`FIELDS`.

        The request path only appends a tuple; lines are encoded in batches, off the request."""
        queued = self.queued
        queued.append(entry)
        if len(queued) >= ENCODE_AT:
            self._encode()

    def deny(self, entry: tuple[Any, ...]) -> None:
        """Queue a refusal's line (as :meth:`note`) while the budget allows, else count it by uid."""
        now = time.monotonic()
        tokens = min(float(DENY_BURST), self._tokens + (now - self._refilled) * DENY_PER_SECOND)
        self._refilled = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self.note(entry)
            return
        self._tokens = tokens
        denied = self.denied
        if not denied:
            self._denied_since = entry[0]
        uid = entry[1]
        key = "unknown" if uid is None else str(uid)
        if key not in denied and len(denied) >= MAX_DENY_UIDS:
            key = "other"
        denied[key] = denied.get(key, 0) + 1

    def _count_denied(self) -> None:
        """One line for the refusals counted, not itemized, since the last such line."""
        denied, self.denied = self.denied, {}
        since = self._time(self._denied_since)
        self.record({"event": "denied", "since": since, "requests": sum(denied.values()), "by_uid": denied})

    def record(self, fields: dict[str, Any]) -> None:
        """Queue one line of other ``fields`` (after the time), encoded at once."""
        self._encode()  # in order
        self._add(self._line({"time": self._time(time.time()), **fields}))

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def _encode(self) -> None:
        queued, self.queued = self.queued, []
        for now, uid, gid, pid, method, route, status, decision, scope, message_id, user in queued:
            fields = {
                "time": self._time(now),
                "uid": uid,
                "gid": gid,
                "pid": pid,
                "method": method,
                "route": route,
                "status": status,
                "decision": decision,
                "scope": scope,
            }
            if decision == "allow":
                fields["message_id"] = message_id
            if user is not None:
                fields["forwarded_for"] = user
            self._add(self._line(fields))

    @staticmethod
    def _line(fields: dict[str, Any]) -> bytes:
        """One JSON line. Control characters and anything not ASCII are escaped, so no text from a
        peer can end a line or look like one."""
        try:
            line = orjson.dumps(fields)
            plain = line.isascii()  # else U+2028, U+0085...: some readers split lines at them too
        except TypeError:  # a lone surrogate
            plain = False
        if not plain:
            line = json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode()
        return line + b"\n"

    def _add(self, line: bytes) -> None:
        if self.size + len(line) > MAX_PENDING:
            self.lost += 1
            return
        self.lines.append(line)
        self.size += len(line)
        if self.size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Write what is queued; on failure keep it (up to the bound) and warn once."""
        if self.denied and time.time() - self._denied_since >= 1.0:
            self._count_denied()
        if self.queued:
            self._encode()
        if not self.lines and not self.tail:
            return
        if self.fd is None:
            try:
                self.fd = open_audit_file(self.target)
            except AuditError as exc:
                self._failed(str(exc))
                return
        data = self.tail + b"".join(self.lines)
        lines, self.lines, self.size = self.lines, [], 0
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, data[written:])
        except OSError as exc:
            self._keep(data, written, lines)
            self._failed(f"cannot write audit log {escaped(self.target)}: {exc.strerror or exc}")
            return
        self.tail = b""
        if self.failing:
            self.failing = False
            shown = escaped(self.target)
            log.warning("Audit log %s is writable again; %d line(s) were lost", shown, self.lost)
            if self.lost:
                self.record({"event": "lost", "lines": self.lost})
                self.lost = 0

    def _keep(self, data: bytes, written: int, lines: list[bytes]) -> None:
        """After a failed write of ``data`` (``written`` bytes went out): the rest of the line it
        cut becomes the tail, the whole lines after it stay queued."""
        done = written - len(self.tail)
        if done < 0:
            self.tail = self.tail[written:]
            self.lines, self.size = lines, sum(map(len, lines))
            return
        for index, line in enumerate(lines):
            if done < len(line):
                self.tail = line[done:] if done else b""
                kept = lines[index + 1 :] if done else lines[index:]
                self.lines, self.size = kept, sum(map(len, kept))
                return
            done -= len(line)
        self.tail, self.lines, self.size = b"", [], 0

    def _failed(self, message: str) -> None:
        if not self.failing:
            self.failing = True
            log.warning(
                "%s; keeping up to %d KiB of lines in memory, counting the rest as lost",
                message,
                MAX_PENDING // 1024,
            )

    def reopen(self) -> None:
        """Flush, then open the path again (after logrotate moved it); standard error stays."""
        self.flush()
        if self.target == "-":
            return
        if self.tail:  # the old file keeps its cut line; the new one must not start mid-line
            self.tail = b""
            self.lost += 1
        try:
            fd = open_audit_file(self.target)
        except AuditError as exc:
            log.warning("%s; still writing to the file opened before", exc)
            return
        old, self.fd = self.fd, fd
        if old is not None:
            os.close(old)

    def close(self) -> None:
        """Write what is queued (and the count of refusals not itemized); close the file."""
        if self.denied:
            self._count_denied()
        self.flush()
        if self.fd is not None and self.target != "-":  # standard error stays, and stays the target
            os.close(self.fd)
            self.fd = None
