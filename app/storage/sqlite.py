"""The durable message store (``--store sqlite``, the default): the standard library's ``sqlite3``
in WAL mode, one database file in ``--data-dir``, shared by every worker process.

What a 201 (or the 200 of a repeated key) promises: the message and its key were committed first.
With ``--durability normal`` (``synchronous=NORMAL``) a commit is in the write-ahead log in the
kernel's page cache, so it survives a crash of the process (``kill -9``, an OOM kill); a power cut
may lose the last commits (the log is synced at checkpoints). ``--durability full``
(``synchronous=FULL``) syncs the log at every commit, so acknowledged messages survive a power cut.

Idempotency is decided inside the write transaction (``BEGIN IMMEDIATE``: the write lock is taken
before the key is looked up), so processes sharing the file store one message for one key however
their requests interleave. The key bound (``idempotency_keys``, least recently used first) is
enforced in the same transaction. The history bound (``history_size``) is the reads': each sees
only the ids above the highest minus ``history_size``, in the same statement; the rows below are
deleted every :data:`PRUNE_EVERY` ids. Ids come from ``AUTOINCREMENT``'s ``sqlite_sequence``, which
keeps the highest id ever used, so an id is never used twice, even after pruning or a restart.

Writes are batched: the ``put`` calls made within two turns of the event loop become one
transaction, and each is answered once that transaction has committed. With ``normal`` durability
the transaction runs on the event loop thread; with ``full`` (or when another process holds the
write lock) on one writer thread, so the loop keeps reading requests while the disk syncs, and
those form the next batch. Reads run on the event loop thread on a second connection; in WAL mode
they never wait for the writer, and they see every commit, other processes' included. The
measurements behind these choices are in docs/performance.md ("The durable store's design").

The schema is versioned with ``PRAGMA user_version`` (:data:`MIGRATIONS`); ``PRAGMA application_id``
marks the file as this program's. :func:`prepare_store` checks and migrates the data directory and
the database before the server binds its socket, and raises :class:`StoreError` (one line) on a
state it will not touch: a newer schema or one that drifted, a corrupt or foreign file, a data
directory that is a file, cannot be created or written, or that another uid could swap the database
in. The file is then left as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import stat
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from app.config import Settings
from app.storage.store import (
    KeyConflict,
    MessageStore,
    Remembered,
    Store,
    Stored,
    StoreError,
    StoreFull,
    text_digest,
)

__all__ = [
    "APPLICATION_ID",
    "DB_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SqliteStore",
    "build_store",
    "database_path",
    "prepare_store",
    "store_lifespan",
]

DB_NAME = "messages.sqlite3"
"""The database file's name inside the data directory (with its ``-wal`` and ``-shm`` beside it)."""
APPLICATION_ID = 0x75647378
"""``PRAGMA application_id`` of this program's databases ("udsx"): a file without it is not ours."""
BUSY_TIMEOUT_MS = 10_000
"""How long a transaction waits for another process's write lock before failing."""
WAL_SIZE_LIMIT = 1024 * 1024
"""A checkpoint starts once the log file grows past this size, and the log file is cut back to it
when it starts afresh: the log needs this much disk plus the commit that crossed it (when the
log was checkpointed by count only, it filled a 2 MiB disk)."""
CHECKPOINT_EVERY = 100
"""Commits between two checkpoints at most, whatever their size (SQLite's own automatic
checkpoint, which runs inside a commit, is off)."""
PRUNE_EVERY = 64
"""Messages past the history are deleted when a commit's ids reach a multiple of this, not in every
commit (the reads hide them meanwhile): a delete writes the oldest page of the table again, a
large share of a small commit's cost (docs/performance.md)."""

MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            document BLOB NOT NULL
        );
        CREATE TABLE idempotency_keys (
            key TEXT PRIMARY KEY,
            message_id INTEGER NOT NULL,
            digest BLOB NOT NULL,
            reply TEXT NOT NULL,
            received_at TEXT NOT NULL,
            peer BLOB NOT NULL,
            used INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX idempotency_keys_used ON idempotency_keys (used);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO counters VALUES ('keys', 0), ('clock', 0);
    """,
}
"""Schema version -> the SQL that brings version ``N - 1`` to ``N``; the steps a database needs run
in one transaction with the start's checks, which sets ``user_version`` and then verifies the whole
schema against these statements. Add a version here to change the schema; never edit a shipped one.

``messages`` holds each message's JSON document as answered. ``idempotency_keys`` holds what
answering a repeat needs (the id, a digest of the text and the other fields: the repeat carries its
text), so a key outlives its message's stay in the history, as with the memory store; ``used`` orders
keys for least-recently-used pruning. ``counters`` keeps the number of keys (so the bound costs no
``COUNT(*)``) and the clock ``used`` is read from."""
SCHEMA_VERSION = max(MIGRATIONS)


def database_path(settings: Settings) -> Path:
    """Where the database of ``settings`` lives."""
    return Path(settings.data_dir) / DB_NAME


def build_store(settings: Settings) -> Store:
    """The store ``settings`` ask for, not yet opened (``create_app`` stays free of I/O)."""
    if settings.store == "memory":
        return MessageStore(settings.history_size, settings.idempotency_keys)
    return SqliteStore(
        database_path(settings),
        history_size=settings.history_size,
        key_capacity=settings.idempotency_keys,
        durability=settings.durability,
    )


@contextlib.asynccontextmanager
async def store_lifespan(app: Any) -> AsyncIterator[None]:
    """Open the app's store when its process starts serving and close it when it stops.

    Each worker process runs this itself, so each has its own connections to the shared file.
    """
    store = getattr(app.state, "store", None)
    if isinstance(store, SqliteStore):
        store.open()
        try:
            yield
        finally:
            await store.aclose()
    else:
        yield


# -- Startup checks ---------------------------------------------------------------------------------

_AGAIN = "; fix it, or set --data-dir (UDS_DATA_DIR) to another directory"


def prepare_store(settings: Settings) -> None:
    """Create, check and migrate the data directory and the database of ``settings``.

    Runs once, before the socket is bound. Raises :class:`StoreError` (one line: what, where, what
    to do) when the state is bad; the database file is then left exactly as it was.
    """
    if settings.store != "sqlite":
        return
    directory = Path(settings.data_dir)
    _prepare_directory(directory, settings.data_dir_private)
    path = directory / DB_NAME
    exists = _owned_file(path, "database")
    for suffix in _SIDE_FILES:
        _owned_file(Path(f"{path}{suffix}"), "database file")
    if not exists:
        try:  # created private: messages are the peers' data
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:  # another server starting at the same instant made it first
            _owned_file(path, "database")
        except OSError as exc:
            raise StoreError(f"cannot create database {path}: {_reason(exc)}{_AGAIN}") from exc
    made = _make_logs(path)
    try:
        connection = _connect(path)
        try:
            _prepare_schema(connection, path)
        finally:
            connection.close()
    except BaseException:  # refused: leave the directory as it was
        for log_file in made:
            with contextlib.suppress(OSError):
                if log_file.stat().st_size == 0:
                    log_file.unlink()
        raise
    _make_logs(path)  # the last connection's close removed them


_SIDE_FILES = ("-wal", "-shm", "-journal")
"""The files SQLite opens beside the database (following symbolic links, creating them if absent)."""


def _owned_file(path: Path, what: str) -> bool:
    """Whether ``path`` exists; raises :class:`StoreError` unless it is a regular file of this uid
    (not a symbolic link: SQLite would write where it points). Ours but open to others: made 0600,
    as SQLite gives the log and the index the database's mode."""
    uid = os.geteuid()
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot reach {what} {path}: {_reason(exc)}{_AGAIN}") from exc
    aside = "move it aside (another uid may have put it there to read or rewrite the messages)"
    if stat.S_ISLNK(info.st_mode):
        raise StoreError(f"{what} {path} is a symbolic link; {aside}{_AGAIN}")
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"{what} {path} is not a regular file{_AGAIN}")
    if info.st_uid != uid:
        raise StoreError(f"{what} {path} belongs to uid {info.st_uid}, not this server's uid {uid}; {aside}")
    if info.st_mode & 0o077:
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                os.fchmod(descriptor, 0o600)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise StoreError(f"cannot make {what} {path} private (0600): {_reason(exc)}{_AGAIN}") from exc
    return True


def _make_logs(path: Path) -> list[Path]:
    """Create the database's ``-wal`` and ``-shm`` (0600, this uid's) before SQLite does, so that in
    a directory others may write in (an ``emptyDir`` is 0777) no other uid plants them first;
    return those it created."""
    made = []
    for suffix in ("-wal", "-shm"):
        log_file = Path(f"{path}{suffix}")
        try:
            os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:  # an open server's, or a crash's: checked above
            continue
        except OSError as exc:
            raise StoreError(f"cannot create {log_file}: {_reason(exc)}{_AGAIN}") from exc
        made.append(log_file)
    return made


def _prepare_directory(directory: Path, private: bool) -> None:
    """Create the data directory (0700) and refuse one that another uid could swap the database in:
    another uid's, or writable by group or others without the sticky bit (unless the operator
    declares it ``private``), or under a parent (or a symbolic link) that such a uid could change.

    A directory the operator made keeps its mode: the server refuses rather than chmods it, as a
    mode someone chose may serve another reader, and an emptyDir is root's anyway."""
    uid = os.geteuid()
    directory = Path(os.path.abspath(directory))
    try:
        is_file = directory.exists() and not directory.is_dir()
    except OSError as exc:  # a parent this uid may not search
        raise StoreError(
            f"cannot reach data directory {directory} (uid {uid}): {_reason(exc)}{_AGAIN}"
        ) from exc
    if is_file:
        raise StoreError(f"data directory {directory} is not a directory (a file is there){_AGAIN}")
    _check_parents(directory, directory.parents, uid)  # before mkdir: nothing made under a bad one
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create data directory {directory} (uid {uid}): {_reason(exc)}{_AGAIN}"
        ) from exc
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
        mode = stat.S_IMODE(info.st_mode)
        raise StoreError(
            f"data directory {directory} can be written by other uids (mode {mode:04o}, no sticky bit)"
            ", who could rename the database away; make it private (chmod 700), or, if "
            "only this server can reach it (an emptyDir mounted into its container alone), set "
            "--data-dir-private (UDS_DATA_DIR_PRIVATE=true)"
        )
    try:  # SQLite creates its -wal and -shm files beside the database: the directory must be writable
        # A random name (mkstemp: 0600, O_EXCL): another uid cannot plant it in advance.
        descriptor, probe = tempfile.mkstemp(prefix=".write-check-", dir=directory)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as exc:
        raise StoreError(
            f"cannot write in data directory {directory} (uid {uid}): {_reason(exc)}; make it "
            f"writable for uid {uid}, or set --data-dir (UDS_DATA_DIR) to another directory"
        ) from exc


def _uri(path: Path) -> str:
    """``path`` as a ``file:`` URI that opens the existing file only (``mode=rw``, never creates).

    Percent-encoded: a ``?`` or ``#`` in a directory's name would otherwise end the path there."""
    return f"file://{urllib.parse.quote(os.path.abspath(path))}?mode=rw"


def _open_to_others(mode: int) -> bool:
    """Whether group or others may add, rename and remove names in a directory of ``mode``: with
    the sticky bit (/tmp's 1777) they may only remove their own."""
    return bool(mode & 0o022) and not mode & stat.S_ISVTX


def _check_link(path: Path, uid: int) -> None:
    """Refuse ``path`` if it is a symbolic link another uid made (they may re-point it at will)."""
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
    """Refuse the data directory if a parent that exists is another uid's (not root's), or open
    to others without the sticky bit: whoever can rename in it can swap the data directory."""
    for parent in dict.fromkeys(parents):
        _check_link(parent, uid)
        try:
            info = parent.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreError(f"cannot reach {parent} (uid {uid}): {_reason(exc)}{_AGAIN}") from exc
        where = f"directory {parent} (a parent of data directory {directory})"
        if info.st_uid not in (uid, 0):
            raise StoreError(
                f"{where} belongs to uid {info.st_uid}, who could replace the data directory; use a "
                f"path whose directories are root's or uid {uid}'s{_AGAIN}"
            )
        if _open_to_others(info.st_mode):
            raise StoreError(
                f"{where} can be written by other uids (mode {stat.S_IMODE(info.st_mode):04o}, no sticky "
                f"bit), who could replace the data directory; make it writable by its owner only "
                f"(chmod go-w){_AGAIN}"
            )


def _connect(path: Path) -> sqlite3.Connection:
    try:
        connection = sqlite3.connect(
            _uri(path), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}{_AGAIN}") from exc
    return connection


_ASIDE = "restore it from a backup or move it aside to start afresh (it was left untouched)"


def _prepare_schema(connection: sqlite3.Connection, path: Path) -> None:
    """Check, migrate and verify the schema in one write transaction (``BEGIN IMMEDIATE``), so
    servers starting at once take turns and each finds the schema whole; then switch to WAL mode
    (which a transaction cannot do). A refusal rolls back: the file is left as it was."""
    try:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            raise  # locked past BUSY_TIMEOUT_MS, or no disk: "cannot prepare" below
        except sqlite3.DatabaseError as exc:  # not a database at all
            raise StoreError(
                f"database {path} is not a SQLite database or is corrupt ({exc}); {_ASIDE}"
            ) from exc
        try:
            version = _check(connection, path)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _statements(MIGRATIONS[step]):
                    connection.execute(statement)
                connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version = {step}")
            _verify(connection, path)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        _to_wal(connection)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot prepare database {path}: {exc}{_AGAIN}") from exc


def _to_wal(connection: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, retried for up to :data:`BUSY_TIMEOUT_MS`: while another server
    starts on the same file, SQLite may refuse the switch's exclusive lock at once (``SQLITE_BUSY``
    without calling the busy handler, to avoid a deadlock)."""
    delay, deadline = 0.001, time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _check(connection: sqlite3.Connection, path: Path) -> int:
    """Read-only checks (nothing is written before they pass); the schema version found."""
    try:
        version: int = connection.execute("PRAGMA user_version").fetchone()[0]
        application = connection.execute("PRAGMA application_id").fetchone()[0]
        tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"database {path} is not a SQLite database or is corrupt ({exc}); {_ASIDE}") from exc
    if application not in (0, APPLICATION_ID) or (application == 0 and (version or tables)):
        raise StoreError(f"database {path} belongs to another program; {_ASIDE}")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database {path} has schema version {version}, newer than this server's {SCHEMA_VERSION}; "
            "run the newer uds-server that wrote it, or move the file aside to start afresh "
            "(it was left untouched)"
        )
    if version:
        try:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if problems != ["ok"]:
            detail = "; ".join(problems).replace("\n", " ")
            raise StoreError(f"database {path} is corrupt ({detail}); {_ASIDE}")
    return version


_SCHEMA_QUERY = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_stat%'"


def _verify(connection: sqlite3.Connection, path: Path) -> None:
    """Refuse a schema that differs from what :data:`MIGRATIONS` make (a table, column or index
    dropped, changed or added, a counter row gone): the writes would fail on it with a 500."""
    expected = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for step in range(1, SCHEMA_VERSION + 1):
            for statement in _statements(MIGRATIONS[step]):
                expected.execute(statement)
        wanted = {(kind, name): sql for kind, name, sql in expected.execute(_SCHEMA_QUERY)}
        counters = set()
        if ("table", "counters") in wanted:
            counters = {row[0] for row in expected.execute("SELECT name FROM counters")}
    finally:
        expected.close()
    found = {(kind, name): sql for kind, name, sql in connection.execute(_SCHEMA_QUERY)}
    problems = [f"{kind} {name} is missing" for kind, name in wanted if (kind, name) not in found]
    problems += [
        f"{kind} {name} differs"
        for (kind, name), sql in wanted.items()
        if found.get((kind, name), sql) != sql
    ]
    problems += [f"{kind} {name} is not this server's" for kind, name in found if (kind, name) not in wanted]
    if not problems and counters:
        present = {row[0] for row in connection.execute("SELECT name FROM counters")}
        problems = [f"counter {name} is missing" for name in sorted(counters - present)]
    if problems:
        raise StoreError(
            f"database {path} does not have this server's schema (version {SCHEMA_VERSION}): "
            f"{', '.join(problems)}; {_ASIDE}"
        )


def _statements(script: str) -> list[str]:
    """``script`` split into statements (``executescript`` would commit the open transaction)."""
    return [part.strip() for part in script.split(";") if part.strip()]


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def _full(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL


# -- The store -------------------------------------------------------------------------------------


_MAX_ID = 2**63 - 1


class _Busy(Exception):
    """Another process holds the write lock (the inline attempt gives way to the writer thread)."""


_Item = tuple[str, str, str, "dict[str, Any] | None", "str | None", "asyncio.Future[Stored]"]


class SqliteStore:
    """The :class:`~app.storage.store.Store` on one SQLite file; see the module's docstring.

    ``open()`` connects (once the process serves); until then nothing touches the disk.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        history_size: int,
        key_capacity: int,
        durability: str = "normal",
        inline: bool | None = None,
    ) -> None:
        """``inline``: commit on the event loop thread first (default: with ``normal`` durability
        only: with ``full`` the loop reads requests during the writer thread's fsync)."""
        if history_size < 1 or key_capacity < 1:
            raise ValueError("history_size and key_capacity must be at least 1")
        if durability not in ("normal", "full"):
            raise ValueError("durability is normal or full")
        self.path = Path(path)
        self.history_size = history_size
        self.key_capacity = key_capacity
        self.durability = durability
        self.inline = durability == "normal" if inline is None else inline
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._commits = 0
        self._checkpointing = False
        self._log_path = f"{self.path}-wal"
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Item] = []
        self._scheduled = False
        self._writing = False
        self._idle: asyncio.Event | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._seen_version = -1
        self._last_id = 0

    # -- life --

    def open(self) -> None:
        """Connect (a reader for this thread, a writer for the writer thread); check the schema."""
        if self._reader is not None:
            return
        # The writer never waits inside SQLite (whose busy handler sleeps a whole millisecond first):
        # a lock held by another process sends the batch to the writer thread, which waits there.
        self._writer = self._connection(check_same_thread=False, busy_timeout=0)
        self._reader = self._connection(check_same_thread=True)
        # Checkpoints (the only fsyncs with ``normal``) run on the writer thread, never on the loop.
        self._writer.execute("PRAGMA wal_autocheckpoint=0")
        self._writer.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._checkpointer = self._connection(check_same_thread=False)
        version = self._reader.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            self._close_connections()
            raise StoreError(
                f"database {self.path} has schema version {version}, not {SCHEMA_VERSION}; "
                "start the server with uds-server, which prepares it"
            )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="uds-store-writer")

    def _connection(
        self, *, check_same_thread: bool, busy_timeout: int = BUSY_TIMEOUT_MS
    ) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(
                _uri(self.path),
                uri=True,
                isolation_level=None,
                timeout=BUSY_TIMEOUT_MS / 1000,  # opening waits: another process may be checkpointing
                check_same_thread=check_same_thread,
                cached_statements=32,
            )
            connection.execute(f"PRAGMA synchronous={self.durability.upper()}")
            connection.execute(f"PRAGMA busy_timeout={busy_timeout}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        return connection

    async def aclose(self) -> None:
        """Wait for the writes in progress, then close the connections."""
        if self._idle is not None and (self._writing or self._pending):
            self._idle.clear()
            await self._idle.wait()
        self.close()

    def close(self) -> None:
        """Close at once (nothing may be pending)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._close_connections()

    def _close_connections(self) -> None:
        for connection in (self._reader, self._writer, self._checkpointer):
            if connection is not None:
                connection.close()
        self._reader = self._writer = self._checkpointer = None

    # -- writes --

    async def put(
        self, text: str, reply: str, received_at: str, peer: dict[str, Any] | None, key: str | None
    ) -> Stored:
        """Queue the message for the next transaction; answer once that has committed."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._idle = asyncio.Event()
        future: asyncio.Future[Stored] = loop.create_future()
        self._pending.append((text, reply, received_at, peer, key, future))
        if not self._scheduled and not self._writing:
            self._scheduled = True
            loop.call_soon(loop.call_soon, self._flush)  # two turns: the next poll's requests join
        return await future

    def _flush(self) -> None:
        """Start the transaction of every ``put`` queued so far (on the writer thread, or here)."""
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._writing = True
        if self.inline and not self._checkpointing:  # during a checkpoint, batches queue behind it
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
        if self._executor is None:
            self._finish(batch, StoreError(f"the store {self.path} is not open"))
            return
        done = self._loop.run_in_executor(self._executor, self._write, batch, True)
        done.add_done_callback(lambda fut: self._finish(batch, fut.exception() or fut.result()))

    def _finish(self, batch: list[_Item], results: list[Stored | BaseException] | BaseException) -> None:
        self._writing = False
        for index, item in enumerate(batch):
            future = item[5]
            outcome = results if isinstance(results, BaseException) else results[index]
            if future.done():  # the request was cancelled (client gone): its row stays committed
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if not isinstance(results, BaseException):
            last = max((r.id for r in results if isinstance(r, Stored) and r.created), default=0)
            if last:
                for listener in self._listeners:
                    listener(last)
            self._commits += 1
            if not self._checkpointing and (
                self._commits >= CHECKPOINT_EVERY or self._log_size() > WAL_SIZE_LIMIT
            ):
                self._start_checkpoint()
        if self._pending:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        elif self._idle is not None:
            self._idle.set()

    def _log_size(self) -> int:
        """The log file's size: one ``stat`` a commit, which sees every process's commits. The file
        is cut back to WAL_SIZE_LIMIT when the log restarts, so it grows past that only when the log
        holds more (``journal_size_limit``)."""
        try:
            return os.stat(self._log_path).st_size
        except OSError:
            return 0

    def _start_checkpoint(self) -> None:
        """Copy the log into the database on the writer thread, off the event loop."""
        assert self._loop is not None
        assert self._executor is not None
        self._commits = 0
        self._checkpointing = True
        done = self._loop.run_in_executor(self._executor, self._checkpoint)
        done.add_done_callback(lambda _: setattr(self, "_checkpointing", False))

    def _checkpoint(self) -> None:
        connection = self._checkpointer
        if connection is not None:
            # RESTART, not PASSIVE: it waits (here, off the loop) for writers and then makes the
            # next commit start the log afresh; this process's batches queue behind it meanwhile.
            # TRUNCATE would empty the file, but growing it again costs CPU (docs/performance.md).
            # PASSIVE checkpoints racing with commits let the log grow to 100 MB in 20 s of load.
            # Busy for 10 s, or a full disk: the log keeps the commits; the next one tries again.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()

    def _write(self, batch: list[_Item], wait: bool) -> list[Stored | BaseException]:
        """One transaction for ``batch``: keys decided, messages inserted, bounds enforced.

        Another process's write lock raises :class:`_Busy` at once unless ``wait`` (on the writer
        thread), which retries for up to :data:`BUSY_TIMEOUT_MS`, sleeping 0.1 ms and more."""
        connection = self._writer
        if connection is None:
            raise StoreError("the store is closed")
        execute = connection.execute
        delay, deadline = 0.0001, time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                    raise self._mapped(exc) from exc
                if not wait:
                    raise _Busy from exc
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"database {self.path} stayed locked by another process for "
                        f"{BUSY_TIMEOUT_MS / 1000:g} s; nothing was stored"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.005)
            except sqlite3.Error as exc:
                raise self._mapped(exc) from exc
        try:
            row = execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
            next_id = (row[0] if row else 0) + 1
            clock = 0  # the clock is read (a page of its own) only for a batch with keys
            if any(item[4] is not None for item in batch):
                clock = self._counter(execute("SELECT value FROM counters WHERE name = 'clock'"), "clock")
            results: list[Stored | BaseException] = []
            messages: list[tuple[int, bytes]] = []
            keys: list[tuple[str, int, bytes, str, str, bytes, int]] = []
            batch_keys: dict[str, tuple[int, bytes, str, str, bytes]] = {}
            touched: list[tuple[int, str]] = []
            for text, reply, received_at, peer, key, _ in batch:
                if key is not None:
                    found = batch_keys.get(key)
                    if found is None:
                        found = execute(
                            "SELECT message_id, digest, reply, received_at, peer FROM idempotency_keys "
                            "WHERE key = ?",
                            (key,),
                        ).fetchone()
                    if found is not None:
                        message_id, digest, first_reply, first_received, first_peer = found
                        if digest != text_digest(text):
                            results.append(
                                KeyConflict("this Idempotency-Key was already used with a different text")
                            )
                            continue
                        clock += 1
                        touched.append((clock, key))
                        earlier = Remembered(
                            message_id, digest, first_reply, first_received, orjson.loads(first_peer)
                        )
                        results.append(Stored(message_id, orjson.dumps(earlier.record(text)), False))
                        continue
                message_id = next_id
                next_id += 1
                document = orjson.dumps(
                    {"id": message_id, "text": text, "reply": reply, "received_at": received_at, "peer": peer}
                )
                messages.append((message_id, document))
                if key is not None:
                    clock += 1
                    peer_json = orjson.dumps(peer)
                    digest = text_digest(text)
                    batch_keys[key] = (message_id, digest, reply, received_at, peer_json)
                    keys.append((key, message_id, digest, reply, received_at, peer_json, clock))
                results.append(Stored(message_id, document, True))
            if messages:
                connection.executemany("INSERT INTO messages (id, document) VALUES (?, ?)", messages)
                if (next_id - 1) // PRUNE_EVERY != (messages[0][0] - 1) // PRUNE_EVERY:
                    execute("DELETE FROM messages WHERE id <= ?", (next_id - 1 - self.history_size,))
            if keys:
                connection.executemany("INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?, ?, ?)", keys)
                count = self._counter(
                    execute(
                        "UPDATE counters SET value = value + ? WHERE name = 'keys' RETURNING value",
                        (len(keys),),
                    ),
                    "keys",
                )
                if count > self.key_capacity:
                    execute(
                        "DELETE FROM idempotency_keys WHERE key IN "
                        "(SELECT key FROM idempotency_keys ORDER BY used LIMIT ?)",
                        (count - self.key_capacity,),
                    )
                    execute("UPDATE counters SET value = ? WHERE name = 'keys'", (self.key_capacity,))
            if touched:
                connection.executemany("UPDATE idempotency_keys SET used = ? WHERE key = ?", touched)
            if keys or touched:
                execute("UPDATE counters SET value = ? WHERE name = 'clock'", (clock,))
            execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                if connection.in_transaction:
                    execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._mapped(exc) from exc
            raise
        return results

    def _counter(self, cursor: sqlite3.Cursor, name: str) -> int:
        row = cursor.fetchone()
        if row is None:  # the start checks the rows; another program may have deleted one since
            raise StoreError(f"database {self.path}: counter {name} is missing")
        value: int = row[0]
        return value

    def _mapped(self, exc: sqlite3.Error) -> StoreError:
        if _full(exc):
            return StoreFull(
                f"the disk holding {self.path.parent} is full; nothing was stored; retry once space is freed"
            )
        return StoreError(f"database {self.path}: {exc}")

    # -- reads (event loop thread) --

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StoreError("the store is not open")
        return self._reader

    def get(self, message_id: int) -> bytes | None:
        if not 0 < message_id <= _MAX_ID:  # SQLite's integers stop at 2**63 - 1
            return None
        # Each read sees only the ids above the highest less history_size (see PRUNE_EVERY).
        row = (
            self._read()
            .execute(
                "SELECT document FROM messages WHERE id = ? "
                "AND id > (SELECT seq FROM sqlite_sequence WHERE name = 'messages') - ?",
                (message_id, self.history_size),
            )
            .fetchone()
        )
        return row[0] if row else None

    def recent_ids(self, limit: int) -> Sequence[int]:
        rows = (
            self._read()
            .execute(
                "SELECT id FROM messages "
                "WHERE id > (SELECT seq FROM sqlite_sequence WHERE name = 'messages') - ? "
                "ORDER BY id DESC LIMIT ?",
                (self.history_size, limit),
            )
            .fetchall()
        )
        return [row[0] for row in reversed(rows)]

    def since(self, after_id: int, limit: int, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        if after_id >= _MAX_ID or limit < 1:
            return []
        cursor = self._read().execute(
            "SELECT id, document FROM messages "
            "WHERE id > max(?, (SELECT seq FROM sqlite_sequence WHERE name = 'messages') - ?) "
            "ORDER BY id LIMIT ?",
            (max(after_id, 0), self.history_size, min(limit, _MAX_ID)),
        )
        if max_bytes is None:
            return cursor.fetchall()
        rows: list[tuple[int, bytes]] = []
        size = 0
        for row in cursor:  # SQLite steps one row at a time: the rest is never read
            rows.append(row)
            size += len(row[1])
            if size >= max_bytes:
                break
        cursor.close()
        return rows

    def first_id(self) -> int | None:
        first: int | None = (
            self._read()
            .execute(
                "SELECT min(id) FROM messages "
                "WHERE id > (SELECT seq FROM sqlite_sequence WHERE name = 'messages') - ?",
                (self.history_size,),
            )
            .fetchone()[0]
        )
        return first

    def last_id(self) -> int:
        """The highest id any process has stored. ``PRAGMA data_version`` changes only when another
        connection (this process's writer or another process) commits, so an unchanged database
        costs one pragma, not a query."""
        reader = self._read()
        version = reader.execute("PRAGMA data_version").fetchone()[0]
        if version != self._seen_version:
            row = reader.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
            self._last_id = row[0] if row else 0
            self._seen_version = version
        return self._last_id

    def add_listener(self, callback: Callable[[int], None]) -> None:
        self._listeners.append(callback)
