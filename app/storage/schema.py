"""The database's schema, its preparation at start (checked, migrated, verified) and the connections
to it. :func:`prepare_store` refuses a state it will not touch (a newer or drifted schema, a corrupt
or foreign file, an unsafe data directory) with :class:`StoreError`, leaving the file as it was."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.config import Settings
from app.storage.datadir import AGAIN, make_logs, prepare_directory, prepare_files
from app.storage.store import StoreError

DB_NAME = "messages.sqlite3"  # in the data directory, with its -wal and -shm beside it
APPLICATION_ID = 0x75647378  # PRAGMA application_id of this program's databases ("udsx")
BUSY_TIMEOUT_MS = 10_000  # how long a transaction waits for another process's write lock

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
"""Version N -> the SQL that brings N - 1 to N (never edit a shipped one); docs/internals.md, "Start"."""
SCHEMA_VERSION = max(MIGRATIONS)

_ASIDE = "restore it from a backup or move it aside to start afresh (it was left untouched)"
_COUNTERS = "SELECT name FROM counters"


def connect(path: Path, *pragmas: str, **options: Any) -> sqlite3.Connection:
    """The existing database ``path`` (a percent-encoded ``mode=rw`` URI), autocommit, ``pragmas`` set."""
    try:
        connection: sqlite3.Connection = sqlite3.connect(
            f"file://{urllib.parse.quote(os.path.abspath(path))}?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
            **options,
        )
        for pragma in pragmas:
            connection.execute(f"PRAGMA {pragma}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}{AGAIN}") from exc
    return connection


def busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


def retry_busy(call: Callable[[], object], first: float, most: float) -> object:
    """``call()`` until not busy, pausing ``first`` s doubled up to ``most``, for BUSY_TIMEOUT_MS at most."""
    delay, deadline = first, time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, most)


def prepare_store(settings: Settings) -> None:
    """Create, check and migrate the data directory and the database of ``settings`` (sqlite only)."""
    if settings.store != "sqlite":
        return
    prepare_directory(Path(settings.data_dir), settings.data_dir_private)
    path = Path(settings.data_dir) / DB_NAME
    made = prepare_files(path)
    try:
        with contextlib.closing(connect(path)) as connection:
            _prepare_schema(connection, path)
    except BaseException:  # refused: leave the directory as it was
        for log_file in made:
            with contextlib.suppress(OSError):
                if log_file.stat().st_size == 0:
                    log_file.unlink()
        raise
    make_logs(path)  # the last connection's close removed them


def _prepare_schema(connection: sqlite3.Connection, path: Path) -> None:
    """Check, migrate and verify in one ``BEGIN IMMEDIATE``, then switch to WAL; a refusal rolls back."""
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            _migrate(connection, _check(connection, path))
            _verify(connection, path)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        retry_busy(lambda: connection.execute("PRAGMA journal_mode=WAL").fetchall(), 0.001, 0.05)
    except sqlite3.Error as exc:
        if type(exc) is sqlite3.DatabaseError:  # not a database at all, or a corrupt one
            raise StoreError(
                f"database {path} is not a SQLite database or is corrupt ({exc}); {_ASIDE}"
            ) from exc
        raise StoreError(f"cannot prepare database {path}: {exc}{AGAIN}") from exc  # locked, or no disk


def _check(connection: sqlite3.Connection, path: Path) -> int:
    """Read-only checks (nothing is written before they pass); the schema version found."""
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    application = connection.execute("PRAGMA application_id").fetchone()[0]
    tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
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


def _migrate(connection: sqlite3.Connection, version: int) -> None:
    """From ``version`` to :data:`SCHEMA_VERSION` (no ``executescript``: it would commit)."""
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[step].split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {step}")


def _layout(connection: sqlite3.Connection) -> dict[tuple[str, str], str]:
    rows = connection.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_stat%'")
    return {(kind, name): sql for kind, name, sql in rows}


def _verify(connection: sqlite3.Connection, path: Path) -> None:
    with contextlib.closing(sqlite3.connect(":memory:", isolation_level=None)) as expected:
        _migrate(expected, 0)
        wanted = _layout(expected)
        counters = {row[0] for row in expected.execute(_COUNTERS)}
    found = _layout(connection)
    problems = [f"{kind} {name} is missing" for kind, name in wanted if (kind, name) not in found]
    problems += [
        f"{kind} {name} differs"
        for (kind, name), sql in wanted.items()
        if found.get((kind, name), sql) != sql
    ]
    problems += [f"{kind} {name} is not this server's" for kind, name in found if (kind, name) not in wanted]
    if not problems:  # the counters table is as expected: its rows can be read
        present = {row[0] for row in connection.execute(_COUNTERS)}
        problems = [f"counter {name} is missing" for name in sorted(counters - present)]
    if problems:
        raise StoreError(
            f"database {path} does not have this server's schema (version {SCHEMA_VERSION}): "
            f"{', '.join(problems)}; {_ASIDE}"
        )
