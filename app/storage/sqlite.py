"""The durable message store (``--store sqlite``, the default): ``sqlite3`` in WAL mode, one
database file in ``--data-dir`` shared by every worker process. A 201 means the message and its key
were committed; ``put`` calls made within two turns of the event loop share one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from app.config import Settings
from app.storage import schema
from app.storage.schema import BUSY_TIMEOUT_MS, busy, connect, retry_busy
from app.storage.store import (
    KeyConflict,
    MessageStore,
    Remembered,
    Store,
    Stored,
    StoreError,
    StoreFull,
    bounded,
    document,
    text_digest,
)

WAL_SIZE_LIMIT = 1024 * 1024  # the log size that starts a checkpoint, and that the log is cut back to
CHECKPOINT_EVERY = 100  # commits between two checkpoints at most (SQLite's own is off)
PRUNE_EVERY = 64  # rows past the history are deleted when a commit's ids cross a multiple of this

_WRITER = ("busy_timeout=0", "wal_autocheckpoint=0", f"journal_size_limit={WAL_SIZE_LIMIT}")
_MAX_ID = 2**63 - 1  # SQLite's integers stop there
_SEQ = "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
_VISIBLE = f"id > ({_SEQ}) - :history"
_GET = f"SELECT document FROM messages WHERE id = :id AND {_VISIBLE}"  # noqa: S608 - constants only
_RECENT = f"SELECT id FROM messages WHERE {_VISIBLE} ORDER BY id DESC LIMIT :limit"  # noqa: S608
_SINCE = f"SELECT id, document FROM messages WHERE id > :after AND {_VISIBLE} ORDER BY id LIMIT :limit"  # noqa: S608
_FIRST = f"SELECT min(id) FROM messages WHERE {_VISIBLE}"  # noqa: S608
_KEY = "SELECT message_id, digest, reply, received_at, peer FROM idempotency_keys WHERE key = ?"


def build_store(settings: Settings) -> Store:
    """The store ``settings`` ask for, not yet opened (``create_app`` stays free of I/O)."""
    if settings.store == "memory":
        return MessageStore(settings.history_size, settings.idempotency_keys)
    path = Path(settings.data_dir) / schema.DB_NAME
    return SqliteStore(path, settings.history_size, settings.idempotency_keys, settings.durability)


class _Busy(Exception):
    """Another process holds the write lock (the inline attempt gives way to the writer thread)."""


_Item = tuple[str, str, str, "dict[str, Any] | None", "str | None", "asyncio.Future[Stored]"]


class SqliteStore(Store):
    """The store on one SQLite file; nothing touches the disk before ``open()``. ``normal`` durability
    commits on the event loop thread, ``full`` on the writer thread (the loop reads on meanwhile)."""

    def __init__(
        self, path: Path | str, history_size: int, key_capacity: int, durability: str = "normal"
    ) -> None:
        super().__init__(history_size, key_capacity)
        self.path = Path(path)
        self.durability = durability
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._commits = 0
        self._checkpointing = False
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Item] = []
        self._active = False  # a transaction is scheduled or running
        self._idle = asyncio.Event()  # set when one ends with nothing pending
        self._seen_version = -1
        self._last_id = 0

    def open(self) -> None:
        """Connect (a reader for this thread, a writer for the writer thread); check the schema."""
        synchronous = f"synchronous={self.durability.upper()}"  # connect() waits BUSY_TIMEOUT_MS
        self._writer = connect(
            self.path, synchronous, *_WRITER, check_same_thread=False, cached_statements=32
        )
        self._reader = connect(self.path, synchronous, cached_statements=32)
        self._checkpointer = connect(self.path, synchronous, check_same_thread=False)
        version = self._reader.execute("PRAGMA user_version").fetchone()[0]
        if version != schema.SCHEMA_VERSION:
            self.close()
            raise StoreError(
                f"database {self.path} has schema version {version}, not {schema.SCHEMA_VERSION}; "
                "start the server with uds-server, which prepares it"
            )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="uds-store-writer")

    async def aclose(self) -> None:
        """Wait for the writes in progress, then close the connections."""
        if self._active:
            self._idle.clear()
            await self._idle.wait()
        self.close()

    def close(self) -> None:
        """Close at once (nothing may be pending)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for connection in (self._reader, self._writer, self._checkpointer):
            if connection is not None:
                connection.close()
        self._reader = self._writer = self._checkpointer = None

    async def put(
        self, text: str, reply: str, received_at: str, peer: dict[str, Any] | None, key: str | None
    ) -> Stored:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._idle = asyncio.Event()
        future: asyncio.Future[Stored] = loop.create_future()
        self._pending.append((text, reply, received_at, peer, key, future))
        if not self._active:
            self._active = True
            loop.call_soon(loop.call_soon, self._flush)  # two turns: the next poll's requests join
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        # Here, unless full durability or a checkpoint wants the writer thread (or the store is not open).
        if (self.durability == "normal" and not self._checkpointing) or self._executor is None:
            results: list[Stored | BaseException] | BaseException | None
            try:
                results = self._write(batch, wait=False)
            except _Busy:
                results = None  # another process holds the write lock: wait on the writer thread
            except BaseException as exc:  # every waiting request gets the failure
                results = exc
            if results is not None:
                self._finish(batch, results)
                return
        assert self._loop is not None
        done = self._loop.run_in_executor(self._executor, self._write, batch, True)
        done.add_done_callback(lambda fut: self._finish(batch, fut.exception() or fut.result()))

    def _finish(self, batch: list[_Item], results: list[Stored | BaseException] | BaseException) -> None:
        assert self._loop is not None
        outcomes = [results] * len(batch) if isinstance(results, BaseException) else results
        for (*_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the request was cancelled (client gone): its row stays committed
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if not isinstance(results, BaseException):
            last = max((r.id for r in results if isinstance(r, Stored) and r.created), default=0)
            if last:
                self.on_commit(last)
            self._commits += 1
            if not self._checkpointing and (
                self._commits >= CHECKPOINT_EVERY or self._log_size() > WAL_SIZE_LIMIT
            ):
                assert self._executor is not None
                self._commits = 0
                self._checkpointing = True  # batches queue behind it, on the writer thread
                done = self._loop.run_in_executor(self._executor, self._checkpoint)
                done.add_done_callback(lambda _: setattr(self, "_checkpointing", False))
        if self._pending:
            self._loop.call_soon(self._flush)
        else:
            self._active = False
            self._idle.set()

    def _log_size(self) -> int:
        """The log file's size: one ``stat`` a commit, which sees every process's commits."""
        with contextlib.suppress(OSError):
            return os.stat(f"{self.path}-wal").st_size
        return 0

    def _checkpoint(self) -> None:
        """Copy the log into the database (writer thread); busy or a full disk: the next one retries."""
        assert self._checkpointer is not None  # close() waits for the writer thread first
        with contextlib.suppress(sqlite3.Error):
            self._checkpointer.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()

    def _write(self, batch: list[_Item], wait: bool) -> list[Stored | BaseException]:
        """One transaction for ``batch``; another process's lock raises :class:`_Busy` unless ``wait``."""
        connection = self._writer
        if connection is None:
            raise StoreError(f"the store {self.path} is not open")
        execute = connection.execute
        try:
            if wait:
                retry_busy(lambda: execute("BEGIN IMMEDIATE"), 0.0001, 0.005)
            else:
                execute("BEGIN IMMEDIATE")  # only this can be busy: the lock is ours after it
            seq = execute(_SEQ).fetchone()
            next_id = (seq[0] if seq else 0) + 1
            clock = 0  # the clock is read (a page of its own) only for a batch with keys
            if any(item[4] is not None for item in batch):
                clock = self._counter(execute("SELECT value FROM counters WHERE name = 'clock'"), "clock")
            results: list[Stored | BaseException] = []
            messages: list[tuple[int, bytes]] = []
            added = 0
            for text, reply, received_at, peer, key, _ in batch:
                found = None if key is None else execute(_KEY, (key,)).fetchone()
                if found is not None:
                    first_id, digest, first_reply, first_at, first_peer = found
                    earlier = Remembered(first_id, digest, first_reply, first_at, orjson.loads(first_peer))
                    try:
                        results.append(earlier.answer(text))
                    except KeyConflict as exc:
                        results.append(exc)
                        continue
                    clock += 1
                    execute("UPDATE idempotency_keys SET used = ? WHERE key = ?", (clock, key))
                    continue
                message_id = next_id
                next_id += 1
                encoded = document(message_id, text, reply, received_at, peer)
                messages.append((message_id, encoded))
                if key is not None:
                    clock += 1
                    added += 1
                    row = (key, message_id, text_digest(text), reply, received_at, orjson.dumps(peer), clock)
                    execute("INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?, ?, ?)", row)
                results.append(Stored(message_id, encoded, True))
            if messages:
                connection.executemany("INSERT INTO messages (id, document) VALUES (?, ?)", messages)
                if (next_id - 1) // PRUNE_EVERY != (messages[0][0] - 1) // PRUNE_EVERY:
                    execute("DELETE FROM messages WHERE id <= ?", (next_id - 1 - self.history_size,))
            if added:
                adding = "UPDATE counters SET value = value + ? WHERE name = 'keys' RETURNING value"
                count = self._counter(execute(adding, (added,)), "keys")
                if count > self.key_capacity:
                    execute(
                        "DELETE FROM idempotency_keys WHERE key IN "
                        "(SELECT key FROM idempotency_keys ORDER BY used LIMIT ?)",
                        (count - self.key_capacity,),
                    )
                    execute("UPDATE counters SET value = ? WHERE name = 'keys'", (self.key_capacity,))
            if clock:
                execute("UPDATE counters SET value = ? WHERE name = 'clock'", (clock,))
            execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                if connection.in_transaction:
                    execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                if busy(exc) and not wait:
                    raise _Busy from exc
                raise self._mapped(exc) from exc
            raise
        return results

    def _counter(self, cursor: sqlite3.Cursor, name: str) -> int:
        row = cursor.fetchone()
        if row is None:  # the start checks the rows; another program may have deleted one since
            raise StoreError(f"database {self.path}: counter {name} is missing")
        return int(row[0])

    def _mapped(self, exc: sqlite3.Error) -> StoreError:
        if busy(exc):
            return StoreError(
                f"database {self.path} stayed locked by another process for "
                f"{BUSY_TIMEOUT_MS / 1000:g} s; nothing was stored"
            )
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:
            return StoreFull(
                f"the disk holding {self.path.parent} is full; nothing was stored; retry once space is freed"
            )
        return StoreError(f"database {self.path}: {exc}")

    def _rows(self, sql: str, **params: int) -> sqlite3.Cursor:
        """``sql`` on the reader, with ``:history`` bound to ``history_size`` (see :data:`_VISIBLE`)."""
        if self._reader is None:
            raise StoreError("the store is not open")
        return self._reader.execute(sql, {**params, "history": self.history_size})

    def get(self, message_id: int) -> bytes | None:
        if not 0 < message_id <= _MAX_ID:
            return None
        row = self._rows(_GET, id=message_id).fetchone()
        return row[0] if row else None

    def recent_ids(self, limit: int) -> Sequence[int]:
        return [row[0] for row in reversed(self._rows(_RECENT, limit=limit).fetchall())]

    def since(self, after_id: int, limit: int, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        if after_id >= _MAX_ID or limit < 1:
            return []
        rows = self._rows(_SINCE, after=max(after_id, 0), limit=min(limit, _MAX_ID))
        with contextlib.closing(rows):
            return bounded(rows, max_bytes)  # SQLite steps one row at a time: the rest is never read

    def first_id(self) -> int | None:
        first: int | None = self._rows(_FIRST).fetchone()[0]
        return first

    def last_id(self) -> int:
        version = self._rows("PRAGMA data_version").fetchone()[0]
        if version != self._seen_version:
            row = self._rows(_SEQ).fetchone()
            self._last_id = row[0] if row else 0
            self._seen_version = version
        return self._last_id
