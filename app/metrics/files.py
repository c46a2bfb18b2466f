"""The ``--workers`` counts in shared files: each worker adds to doubles in a memory-mapped file of
its own; every process reads them all; the parent folds a dead worker's file into ``absorbed.db``.

The file format and why not ``prometheus-client``'s multiprocess mode: docs/internals.md, "Metrics".
"""

from __future__ import annotations

import contextlib
import glob
import json
import mmap
import os
import re
import secrets
import shutil
import struct
import tempfile
from collections.abc import Iterable, Sequence

__all__ = [
    "ABSORBED",
    "SIZE",
    "CellFile",
    "Entry",
    "absorb",
    "multiprocess_dir",
    "owner",
    "read_all",
    "read_file",
    "worker_pids",
]

SIZE = 64 * 1024
"""Bytes of one worker's file: far more than the bounded labels need (about 20 KiB at most)."""
ABSORBED = "absorbed.db"
DIR_PREFIX = "uds-metrics-"
_MAGIC = b"udscell1"
_HEADER = 32  # magic, bytes used, open connections, event streams
_RECORD = struct.Struct("<II")  # label bytes, values
_NAMES_KEPT = 64
"""Absorbed file names remembered: a reader that listed one before it went takes milliseconds."""
_NAME = re.compile(r"cells-(\d+)-[0-9a-f]+\.db")

Entry = tuple[tuple[object, ...], Sequence[float]]
"""A record: its labels and its values."""


class CellFile:
    """This worker's file in ``directory``. Raises ``OSError`` when it cannot be made (a full disk)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"cells-{os.getpid()}-{secrets.token_hex(4)}.db")
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(descriptor, 0, SIZE)
            self._map = mmap.mmap(descriptor, SIZE)
        except OSError:
            os.unlink(self.path)
            raise
        finally:
            os.close(descriptor)
        self._map[:8] = _MAGIC
        self._used = _HEADER
        struct.pack_into("<q", self._map, 8, self._used)

    def record(self, labels: tuple[object, ...], count: int) -> memoryview[float] | None:
        """``count`` doubles, zero, kept under ``labels``; None when the file is full."""
        encoded = json.dumps(labels).encode()
        start = self._used + _RECORD.size + -(-len(encoded) // 8) * 8
        end = start + 8 * count
        if end > SIZE:
            return None
        _RECORD.pack_into(self._map, self._used, len(encoded), count)
        self._map[self._used + _RECORD.size : self._used + _RECORD.size + len(encoded)] = encoded
        self._used = end
        struct.pack_into("<q", self._map, 8, end)  # the record is whole: readers may see it
        return memoryview(self._map)[start:end].cast("d")

    def set_gauges(self, connections: float, streams: float) -> None:
        struct.pack_into("<dd", self._map, 16, connections, streams)


def _parse(data: bytes) -> tuple[tuple[float, float], list[Entry]]:
    """A file's gauges and records (nothing from a file that is not one)."""
    if len(data) < _HEADER or data[:8] != _MAGIC:
        return (0.0, 0.0), []
    (used,) = struct.unpack_from("<q", data, 8)
    gauges = struct.unpack_from("<dd", data, 16)
    entries: list[Entry] = []
    offset = _HEADER
    used = min(used, len(data))
    while offset + _RECORD.size <= used:
        length, count = _RECORD.unpack_from(data, offset)
        start = offset + _RECORD.size + -(-length // 8) * 8
        end = start + 8 * count
        if end > used:
            break
        labels = tuple(json.loads(data[offset + _RECORD.size : offset + _RECORD.size + length]))
        entries.append((labels, struct.unpack_from(f"<{count}d", data, start)))
        offset = end
    return gauges, entries


def _read(path: str) -> bytes | None:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as file:
        return file.read()
    return None


def read_file(path: str) -> list[Entry]:
    """The records of one file (none if it is gone)."""
    data = _read(path)
    return _parse(data)[1] if data is not None else []


def worker_pids(directory: str) -> list[int]:
    """The pids of the workers with a file in ``directory`` (live or not yet absorbed)."""
    return sorted({int(m.group(1)) for p in os.listdir(directory) if (m := _NAME.fullmatch(p))})


def read_all(directory: str) -> tuple[list[Entry], tuple[float, float]]:
    """Every record in ``directory`` (dead workers' included, each once) and the gauges summed over
    the live workers."""
    entries: list[Entry] = []
    gauges = [0.0, 0.0]
    found: list[tuple[str, tuple[float, float], list[Entry]]] = []
    for path in glob.glob(os.path.join(directory, "cells-*.db")):
        data = _read(path)
        if data is not None:
            found.append((os.path.basename(path), *_parse(data)))
    absorbed = _read(os.path.join(directory, ABSORBED))  # last: see the module's docstring
    taken: set[str] = set()
    if absorbed is not None:
        _, records = _parse(absorbed)
        for labels, values in records:
            if labels[:1] == ("names",):
                taken.update(str(name) for name in labels[1:])
            else:
                entries.append((labels, values))
    for name, (connections, streams), records in found:
        if name in taken:
            continue
        entries.extend(records)
        match = _NAME.fullmatch(name)
        if match and os.path.exists(f"/proc/{match.group(1)}"):
            gauges[0] += connections
            gauges[1] += streams
    return entries, (gauges[0], gauges[1])


def _merge(totals: dict[tuple[object, ...], list[float]], entries: Iterable[Entry]) -> None:
    for labels, values in entries:
        kept = totals.setdefault(labels, [0.0] * len(values))
        for index, value in enumerate(values[: len(kept)]):
            kept[index] += value


def absorb(directory: str, pid: int) -> None:
    """Fold dead worker ``pid``'s files into ``absorbed.db`` and remove them.

    Raises ``OSError`` when ``absorbed.db`` cannot be written (a full disk); the files then stay and
    count as before.
    """
    dead = [
        p
        for p in glob.glob(os.path.join(directory, f"cells-{pid}-*.db"))
        if _NAME.fullmatch(os.path.basename(p))
    ]
    if not dead:
        return
    totals: dict[tuple[object, ...], list[float]] = {}
    names: list[str] = []
    absorbed = _read(os.path.join(directory, ABSORBED))
    if absorbed is not None:
        for labels, values in _parse(absorbed)[1]:
            if labels[:1] == ("names",):
                names.extend(str(name) for name in labels[1:])
            else:
                _merge(totals, [(labels, values)])
    for path in dead:
        data = _read(path)
        if data is not None:
            _merge(totals, _parse(data)[1])
        names.append(os.path.basename(path))
    records = [*totals.items(), (("names", *names[-_NAMES_KEPT:]), [])]
    body = bytearray(_MAGIC + bytes(_HEADER - 8))
    for labels, values in records:
        encoded = json.dumps(labels).encode()
        body += _RECORD.pack(len(encoded), len(values)) + encoded + bytes(-len(encoded) % 8)
        body += struct.pack(f"<{len(values)}d", *values)
    struct.pack_into("<q", body, 8, len(body))
    temporary = os.path.join(directory, "absorbed.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "wb") as file:
            file.write(body)
        os.rename(temporary, os.path.join(directory, ABSORBED))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    for path in dead:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def multiprocess_dir(base: str) -> str:
    """Create this server's private directory (0700) under ``base``, first removing those that
    killed servers left (their pid gone, or ours: a restarted container's server is pid 1 again)."""
    me = os.getpid()
    for old in glob.glob(os.path.join(base, f"{DIR_PREFIX}*")):
        pid = owner(old)
        with contextlib.suppress(OSError):
            mine = pid is not None and os.stat(old).st_uid == os.getuid()
            if mine and (pid == me or not os.path.exists(f"/proc/{pid}")):
                shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{me}-", dir=base)


def owner(directory: str) -> int | None:
    """The pid of the server that made ``directory`` (named in it), if any."""
    named = re.fullmatch(rf"{DIR_PREFIX}(\d+)-.*", os.path.basename(directory.rstrip("/")))
    return int(named.group(1)) if named else None
