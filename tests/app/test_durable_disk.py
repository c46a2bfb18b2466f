"""A full disk while serving: 507 with the JSON error, nothing half-written, reads keep working,
and writes resume once there is room. The data directory is on a real, small tmpfs (CI runs as
root; a machine where it cannot be mounted fails this test rather than skipping it)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from app.storage.schema import DB_NAME
from app.storage.sqlite import WAL_SIZE_LIMIT
from tests.support import ServerProcess, http_over_uds, small_tmpfs

DISK = "4m"
TEXT = "x" * 4000


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    with open(path, "wb", buffering=0) as out:
        for size in (1 << 16, 1 << 12, 1):
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    out.write(block)


def _post(sock: str, text: str, key: str) -> tuple[int, bytes]:
    return http_over_uds(
        sock,
        "POST",
        "/messages",
        json.dumps({"text": text}).encode(),
        {"Content-Type": "application/json", "Idempotency-Key": key},
    )


def test_a_full_disk_answers_507_stores_nothing_and_keeps_reads_working(tmp: Path) -> None:
    sock = str(tmp / "s.sock")
    with small_tmpfs(tmp / "disk", DISK, 0o700) as disk:
        data = disk / "data"
        args = ["--socket", sock, "--data-dir", str(data), "--history-size", "5000", "--log-level", "warning"]
        with ServerProcess(args, socket_path=sock) as server:
            server.wait_ready()
            stored = {}
            for i in range(5):
                status, body = _post(sock, f"before {i}", f"before-{i}")
                assert status == 201, body
                stored[json.loads(body)["id"]] = body
            filler = disk / "filler"
            fill(filler)
            with pytest.raises(OSError, match="No space left on device"):
                (disk / "probe").write_bytes(b"\0")

            refused: tuple[str, bytes] | None = None
            for i in range(2000):  # the first few may still fit in pages SQLite already holds
                key = f"full-{i}"
                status, body = _post(sock, f"{TEXT} {i}", key)
                if status == 507:
                    refused = (key, body)
                    break
                assert status == 201, body
                stored[json.loads(body)["id"]] = body
            assert refused is not None, "the full disk never refused a write"
            key, body = refused
            error = json.loads(body)
            assert set(error) == {"error", "message", "status"}
            assert (error["error"], error["status"]) == ("insufficient_storage", 507)
            assert f"the disk holding {data} is full; nothing was stored" in error["message"]

            for message_id, document in stored.items():  # reads keep working
                assert http_over_uds(sock, "GET", f"/messages/{message_id}") == (200, document)
            status, listing = http_over_uds(sock, "GET", "/messages?limit=5000")
            assert status == 200
            texts = [m["text"] for m in json.loads(listing)["messages"]]
            assert len(texts) == len(stored)
            assert f"{TEXT} {key.split('-')[1]}" not in texts, "the refused message was not half-written"

            filler.unlink()
            status, body = _post(sock, f"{TEXT} {key.split('-')[1]}", key)
            assert status == 201, "the refused key was not stored: the retry stores its message now"
            stored[json.loads(body)["id"]] = body
            assert server.stop() == 0

        with ServerProcess(args, socket_path=sock) as server:
            server.wait_ready()
            for message_id, document in stored.items():
                assert http_over_uds(sock, "GET", f"/messages/{message_id}") == (200, document)
            assert server.stop() == 0
        db = sqlite3.connect(data / DB_NAME)
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            db.close()


def test_a_small_disk_keeps_taking_messages_and_refuses_only_when_full(tmp: Path) -> None:
    """The write-ahead log is checkpointed by size as well as by count: before, it reached about
    2 MB before its first checkpoint, so 68 messages of 4 KB filled a 2 MiB disk. With the history
    and the keys bounded, the store now stays within the disk whatever the number of messages; once
    the disk is full, the answer is 507 and every acknowledged message survives a restart."""
    sock = str(tmp / "s.sock")
    with small_tmpfs(tmp / "disk", "2m", 0o700) as disk:
        data = disk / "data"
        args = ["--socket", sock, "--data-dir", str(data), "--history-size", "40", "--log-level", "warning"]
        stored: dict[int, bytes] = {}
        with ServerProcess(args, socket_path=sock) as server:
            server.wait_ready()
            largest_log = 0
            for i in range(600):
                status, body = _post(sock, f"{TEXT} {i}", f"small-{i}")
                assert status == 201, f"message {i}: {status} {body!r}"
                stored[json.loads(body)["id"]] = body
                largest_log = max(largest_log, (data / f"{DB_NAME}-wal").stat().st_size)
            # Past the limit by at most the commit that crossed it (one that prunes 64 messages of
            # 4 KB writes about 200 KB): before, 100 commits of 29 KB, about 3 MB.
            assert largest_log <= WAL_SIZE_LIMIT + 512 * 1024, largest_log

            fill(disk / "filler")
            refused = None
            for i in range(2000):
                status, body = _post(sock, f"{TEXT} late {i}", f"late-{i}")
                if status == 507:
                    refused = i
                    break
                assert status == 201, body
                stored[json.loads(body)["id"]] = body
            assert refused is not None, "the full disk never refused a write"
            assert server.stop() == 0
        kept = sorted(stored)[-40:]  # the history: the last 40 acknowledged
        with ServerProcess(args, socket_path=sock) as server:
            server.wait_ready()
            for message_id in kept:
                assert http_over_uds(sock, "GET", f"/messages/{message_id}") == (200, stored[message_id])
            status, listing = http_over_uds(sock, "GET", "/messages?limit=40")
            assert status == 200, listing
            assert [m["id"] for m in json.loads(listing)["messages"]] == kept
            assert server.stop() == 0
