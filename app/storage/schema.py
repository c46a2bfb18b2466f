"""The database's schema and its preparation at start: checked, migrated and verified.

:func:`prepare_store` runs once, before the socket is bound; on a state it will not touch (a newer
or drifted schema, a corrupt or foreign file, an unsafe data directory) it raises
:class:`StoreError` (one line) and leaves the file as it was. The version is ``PRAGMA
user_version``; ``PRAGMA application_id`` marks the file as this program's.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path

from app.config import Settings
from app.storage.datadir import AGAIN, SIDE_FILES, make_logs, owned_file, prepare_directory, reason
from app.storage.store import StoreError

__all__ = [
    "APPLICATION_ID",
    "BUSY_TIMEOUT_MS",
    "DB_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "database_path",
    "prepare_store",
    "uri",
]

DB_NAME = "messages.sqlite3"
"""The database file's name inside the data directory (with its ``-wal`` and ``-shm`` beside it)."""
APPLICATION_ID = 0x75647378
"""``PRAGMA application_id`` of this program's databases ("udsx"): a file without it is not ours."""
BUSY_TIMEOUT_MS = 10_000
"""How long a transaction waits for another process's write lock before failing."""

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
"""Schema version -> the SQL that brings version ``N - 1`` to ``N``. Add a version to change the
schema; never edit a shipped one. ``messages`` holds each JSON document as answered;
``idempotency_keys`` what answering a repeat needs (``used`` orders them for LRU pruning);
``counters`` the number of keys (no ``COUNT(*)``) and the clock ``used`` is read from."""
SCHEMA_VERSION = max(MIGRATIONS)

_ASIDE = "restore it from a backup or move it aside to start afresh (it was left untouched)"
_SCHEMA_QUERY = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_stat%'"


def database_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / DB_NAME


def uri(path: Path) -> str:
    """``path`` as a percent-encoded ``file:`` URI that opens the existing file only (``mode=rw``):
    a ``?`` or ``#`` in a directory's name would otherwise end the path there."""
    return f"file://{urllib.parse.quote(os.path.abspath(path))}?mode=rw"


def prepare_store(settings: Settings) -> None:
    """Create, check and migrate the data directory and the database of ``settings`` (sqlite only)."""
    if settings.store != "sqlite":
        return
    directory = Path(settings.data_dir)
    prepare_directory(directory, settings.data_dir_private)
    path = directory / DB_NAME
    exists = owned_file(path, "database")
    for suffix in SIDE_FILES:
        owned_file(Path(f"{path}{suffix}"), "database file")
    if not exists:
        try:  # created private: messages are the peers' data
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:  # another server starting at the same instant made it first
            owned_file(path, "database")
        except OSError as exc:
            raise StoreError(f"cannot create database {path}: {reason(exc)}{AGAIN}") from exc
    made = make_logs(path)
    try:
        try:
            connection = sqlite3.connect(
                uri(path), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}{AGAIN}") from exc
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
    make_logs(path)  # the last connection's close removed them


def _prepare_schema(connection: sqlite3.Connection, path: Path) -> None:
    """Check, migrate and verify in one ``BEGIN IMMEDIATE`` (servers starting at once take turns and
    each finds the schema whole), then switch to WAL (a transaction cannot). A refusal rolls back."""
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
        raise StoreError(f"cannot prepare database {path}: {exc}{AGAIN}") from exc


def _to_wal(connection: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, retried for up to :data:`BUSY_TIMEOUT_MS`: while another server
    starts on the file, SQLite may refuse the switch at once without calling the busy handler."""
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


def _verify(connection: sqlite3.Connection, path: Path) -> None:
    """Refuse a schema that differs from what :data:`MIGRATIONS` make (a table, column, index or
    counter row dropped, changed or added): writes would fail on it with a 500."""
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
