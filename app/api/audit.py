"""The audit trail (``--audit-log FILE`` or ``-``): one JSON line for every write and every refusal,
appended in batches to an ``O_APPEND`` file, bounded in memory; a full disk costs lines, never
requests. How and why: docs/internals.md, "The audit trail"."""

import errno
import json
import logging
import os
import stat
import time
from typing import Any

import orjson

from app.logs import escaped

log = logging.getLogger("app.api.audit")

FLUSH_AT = 64 * 1024
MAX_PENDING = 256 * 1024  # bytes held while the file cannot be written; past it, lines are counted as lost
ENCODE_AT = 256  # entries queued before they are encoded in a batch
MESSAGE_ID = "uds.message_id"  # the scope key where ``POST /messages`` leaves the id it stored
MAX_ROUTE = 256  # longest path recorded, in characters: a peer chooses it
DENY_BURST = 100  # refusals itemized in a row; then DENY_PER_SECOND, the rest counted ("denied")
DENY_PER_SECOND = 1.0
MAX_DENY_UIDS = 32  # distinct uids in one ``denied`` line; the others count as "other"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class AuditError(ValueError):
    """The audit log file cannot be opened; the message names it and says why."""


def open_audit_file(path: str) -> int:
    """Open (create 0600) ``path`` to append; refuse a symlink, a shared, foreign or readable file."""
    shown = f"audit log {escaped(path)}"
    try:
        fd = os.open(path, _FLAGS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AuditError(f"{shown}: is a symbolic link; give the file itself") from None
        raise AuditError(f"{shown}: cannot open it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"{shown}: not a regular file")
        if info.st_nlink > 1:  # another name for it may be a file the server keeps (its database)
            raise AuditError(f"{shown}: has {info.st_nlink} hard links; give a file of its own")
        if info.st_uid != os.geteuid():
            raise AuditError(f"{shown}: owned by uid {info.st_uid}, not this server's {os.geteuid()}")
        if info.st_mode & 0o077:
            raise AuditError(
                f"{shown}: others may open it (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
            )
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
        self.queued: list[dict[str, Any]] = []  # not yet encoded (at most ENCODE_AT)
        self.pending = bytearray()  # encoded, not yet written
        self.cut = False  # ``pending`` starts mid-line (a short write cut it): it goes first
        self.lost = 0
        self.failing = False
        self._second = -1
        self._stamp = ""
        self._tokens = float(DENY_BURST)
        self._refilled = time.monotonic()
        self.denied: dict[str, int] = {}  # refusals past the budget not yet written, by uid
        self._denied_since = 0.0

    def note(self, fields: dict[str, Any]) -> None:
        """Queue one line: ``fields`` starting with ``"time"``, a ``time.time()`` (written in UTC)."""
        queued = self.queued
        queued.append(fields)
        if len(queued) >= ENCODE_AT:
            self._encode()

    def deny(self, fields: dict[str, Any]) -> None:
        """Queue a refusal's line (as :meth:`note`) while the budget allows, else count it by uid."""
        now = time.monotonic()
        tokens = min(float(DENY_BURST), self._tokens + (now - self._refilled) * DENY_PER_SECOND)
        self._refilled = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self.note(fields)
            return
        self._tokens = tokens
        denied = self.denied
        if not denied:
            self._denied_since = fields["time"]
        key = "unknown" if fields["uid"] is None else str(fields["uid"])
        if key not in denied and len(denied) >= MAX_DENY_UIDS:
            key = "other"
        denied[key] = denied.get(key, 0) + 1

    def record(self, fields: dict[str, Any]) -> None:
        """Queue one line of other ``fields`` (after the time), encoded at once."""
        self._encode()  # in order
        self._add({"time": self._time(time.time()), **fields})

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def _encode(self) -> None:
        queued, self.queued = self.queued, []
        for fields in queued:
            fields["time"] = self._time(fields["time"])
            self._add(fields)

    def _add(self, fields: dict[str, Any]) -> None:
        """Encode one line, all but printable ASCII escaped (U+2028 and U+0085 end lines for some)."""
        try:
            line = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
            plain = line.isascii()
        except TypeError:  # a lone surrogate
            plain = False
        if not plain:
            line = json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
        if len(self.pending) + len(line) > MAX_PENDING:
            self.lost += 1
            return
        self.pending += line
        if len(self.pending) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Write what is queued; on failure keep it (up to the bound) and warn once."""
        if self.denied and time.time() - self._denied_since >= 1.0:
            self._count_denied()
        if self.queued:
            self._encode()
        pending = self.pending
        if not pending:
            return
        try:
            if self.fd is None:
                self.fd = open_audit_file(self.target)
            while pending:
                written = os.write(self.fd, pending)
                self.cut = pending[written - 1] != ord("\n")
                del pending[:written]
        except AuditError as exc:
            self._failed(str(exc))
            return
        except OSError as exc:
            self._failed(f"cannot write audit log {escaped(self.target)}: {exc.strerror or exc}")
            return
        if self.failing:
            self.failing = False
            shown = escaped(self.target)
            log.warning("Audit log %s is writable again; %d line(s) were lost", shown, self.lost)
            if self.lost:
                self.record({"event": "lost", "lines": self.lost})
                self.lost = 0

    def _failed(self, message: str) -> None:
        if not self.failing:
            self.failing = True
            kept = "keeping up to %d KiB of lines in memory, counting the rest as lost"
            log.warning("%s; " + kept, message, MAX_PENDING // 1024)

    def _count_denied(self) -> None:
        """One line for the refusals counted, not itemized, since the last such line."""
        denied, self.denied = self.denied, {}
        since = self._time(self._denied_since)
        self.record({"event": "denied", "since": since, "requests": sum(denied.values()), "by_uid": denied})

    def reopen(self) -> None:
        """Flush, then open the path again (after logrotate moved it); standard error stays."""
        self.flush()
        if self.target == "-":
            return
        if self.cut:  # the old file keeps its cut line; the new one must not start mid-line
            del self.pending[: self.pending.index(b"\n") + 1]
            self.cut = False
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
