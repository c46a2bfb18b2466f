"""The ``--workers`` counts: each worker adds to doubles in a memory-mapped file of its own, every
process reads them all, the parent folds a dead worker's file into ``absorbed.db``. The format, and
why not ``prometheus-client``'s multiprocess mode: docs/internals.md, "Metrics"."""

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
from collections.abc import Sequence

SIZE = 64 * 1024  # bytes of a worker's file: far more than the bounded labels need
ABSORBED = "absorbed.db"
DIR_PREFIX = "uds-metrics-"
_MAGIC = b"udscell1"
_HEADER = struct.Struct("<8sqdd")  # magic, bytes used, open connections, event streams
_RECORD = struct.Struct("<II")  # label bytes (JSON, padded to 8), values; then the labels, the doubles
_NAMES_KEPT = 64  # absorbed names remembered: a reader that listed one before it went takes ms
_NAME = re.compile(r"cells-(\d+)-[0-9a-f]+\.db")

Entry = tuple[tuple[object, ...], Sequence[float]]  # a record's labels and values


def _record(labels: tuple[object, ...], values: Sequence[float]) -> bytes:
    encoded = json.dumps(labels).encode()
    encoded += b" " * (-len(encoded) % 8)  # JSON padded with spaces to 8 bytes
    return _RECORD.pack(len(encoded), len(values)) + encoded + struct.pack(f"<{len(values)}d", *values)


class CellFile:
    """This worker's file in ``directory``, allocated whole: ``OSError`` on a full disk, never later."""

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
        self._used = _HEADER.size
        _HEADER.pack_into(self._map, 0, _MAGIC, self._used, 0.0, 0.0)

    def record(self, labels: tuple[object, ...], count: int) -> memoryview[float] | None:
        """``count`` doubles, zero, kept under ``labels``; None when the file is full."""
        data = _record(labels, [0.0] * count)
        end = self._used + len(data)
        if end > SIZE:
            return None
        self._map[self._used : end] = data
        self._used = end
        struct.pack_into("<q", self._map, 8, end)  # the record is whole: readers may see it
        return memoryview(self._map)[end - 8 * count : end].cast("d")

    def set_gauges(self, connections: float, streams: float) -> None:
        struct.pack_into("<dd", self._map, 16, connections, streams)


def read_file(path: str) -> tuple[list[Entry], tuple[float, float]]:
    """A file's records and gauges (nothing from a file that is gone or is not one)."""
    data = b""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as file:
        data = file.read()
    if len(data) < _HEADER.size or data[:8] != _MAGIC:
        return [], (0.0, 0.0)
    _, used, *gauges = _HEADER.unpack_from(data)
    used = min(used, len(data))
    entries: list[Entry] = []
    offset = _HEADER.size
    while offset + _RECORD.size <= used:
        length, count = _RECORD.unpack_from(data, offset)
        start = offset + _RECORD.size + length
        if start + 8 * count > used:
            break
        labels = tuple(json.loads(data[offset + _RECORD.size : offset + _RECORD.size + length]))
        entries.append((labels, struct.unpack_from(f"<{count}d", data, start)))
        offset = start + 8 * count
    return entries, (gauges[0], gauges[1])


def worker_pids(directory: str) -> list[int]:
    """The pids of the workers with a file in ``directory`` (live or not yet absorbed)."""
    return sorted({int(m.group(1)) for p in os.listdir(directory) if (m := _NAME.fullmatch(p))})


def _absorbed(directory: str) -> tuple[list[Entry], list[str]]:
    """What dead workers counted, and the names of the files that went into it (its last record)."""
    entries = read_file(os.path.join(directory, ABSORBED))[0]
    if entries and entries[-1][0][:1] == ("names",):
        return entries[:-1], [str(name) for name in entries[-1][0][1:]]
    return entries, []


def read_all(directory: str) -> tuple[list[Entry], tuple[float, float]]:
    """Every record in ``directory``, each once (``absorbed.db`` read last, skipping the files it
    names), and the gauges summed over the live workers."""
    found = [(os.path.basename(p), read_file(p)) for p in glob.glob(os.path.join(directory, "cells-*.db"))]
    entries, taken = _absorbed(directory)
    gauges = [0.0, 0.0]
    for name, (records, each) in found:
        if name not in taken:
            entries.extend(records)
            match = _NAME.fullmatch(name)
            if match and os.path.exists(f"/proc/{match.group(1)}"):
                gauges = [a + b for a, b in zip(gauges, each, strict=True)]
    return entries, (gauges[0], gauges[1])


def absorb(directory: str, pid: int) -> None:
    """Fold dead worker ``pid``'s files into ``absorbed.db`` and remove them; on ``OSError`` (a full
    disk) they stay and count as before."""
    dead = glob.glob(os.path.join(directory, f"cells-{pid}-*.db"))  # the directory is ours alone (0700)
    if not dead:
        return
    entries, names = _absorbed(directory)
    totals: dict[tuple[object, ...], list[float]] = {}
    for labels, values in entries + [entry for path in dead for entry in read_file(path)[0]]:
        kept = totals.setdefault(labels, [0.0] * len(values))
        kept[:] = [a + b for a, b in zip(kept, values, strict=False)]
    names = [*names, *(os.path.basename(path) for path in dead)][-_NAMES_KEPT:]
    totals[("names", *names)] = []  # last
    records = b"".join(_record(labels, values) for labels, values in totals.items())
    body = _HEADER.pack(_MAGIC, _HEADER.size + len(records), 0.0, 0.0) + records
    temporary = os.path.join(directory, "absorbed.tmp")
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
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
    """Create this server's private directory (0700) under ``base``, first removing those killed
    servers left (their pid gone, or ours: a restarted container's server is pid 1 again)."""
    for old in glob.glob(os.path.join(base, f"{DIR_PREFIX}*")):
        pid = owner(old)
        gone = pid is not None and (pid == os.getpid() or not os.path.exists(f"/proc/{pid}"))
        with contextlib.suppress(OSError):
            if gone and os.stat(old).st_uid == os.getuid():
                shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=base)


def owner(directory: str) -> int | None:
    """The pid of the server that made ``directory`` (named in it), if any."""
    named = re.fullmatch(rf"{DIR_PREFIX}(\d+)-.*", os.path.basename(directory.rstrip("/")))
    return int(named.group(1)) if named else None
