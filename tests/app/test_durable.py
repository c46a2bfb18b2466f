"""The SQLite store (app.storage.sqlite): what it keeps, its bounds, its ids, its schema, and the bad states
a real ``uds-server`` refuses to start on (one line, exit 3, the file untouched)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

import orjson
import pytest

from app.config import Settings
from app.storage import schema
from app.storage.schema import APPLICATION_ID, DB_NAME, SCHEMA_VERSION, prepare_store
from app.storage.sqlite import CHECKPOINT_EVERY, PRUNE_EVERY, WAL_SIZE_LIMIT, SqliteStore
from app.storage.store import KeyConflict, Stored, StoreError
from tests.support import NOBODY, PYTHON, ROOT, ServerProcess, http_over_uds, python_as_nobody

PEER = {"pid": 1, "uid": 1000, "gid": 1000}


def _settings(directory: Path, **values: object) -> Settings:
    return Settings(data_dir=str(directory), **values)  # type: ignore[arg-type]


def _store(directory: Path, history_size: int = 1000, key_capacity: int = 10_000) -> SqliteStore:
    prepare_store(_settings(directory))
    store = SqliteStore(directory / DB_NAME, history_size=history_size, key_capacity=key_capacity)
    store.open()
    return store


async def _put(store: SqliteStore, text: str, key: str | None = None) -> Stored:
    return await store.put(text, "r", "t", PEER, key)


def _texts(rows: list[tuple[int, bytes]]) -> list[str]:
    return [orjson.loads(document)["text"] for _, document in rows]


@pytest.fixture
def data(tmp: Path) -> Path:
    return tmp / "data"


# -- The store ---------------------------------------------------------------------------------------


def test_messages_survive_reopening_and_ids_never_repeat_after_pruning(data: Path) -> None:
    store = _store(data, history_size=3)
    ids = [asyncio.run(_put(store, f"m{i}")).id for i in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert _texts(store.since(0, 10)) == ["m2", "m3", "m4"]
    assert store.first_id() == 3
    assert store.get(2) is None
    store.close()
    again = _store(data, history_size=3)
    for _ in range(3):  # prune everything stored before: the next id still follows the last one
        asyncio.run(_put(again, "later"))
    assert [i for i, _ in again.since(0, 10)] == [6, 7, 8]
    assert again.last_id() == 8
    assert orjson.loads(again.get(6) or b"") == {
        "id": 6,
        "text": "later",
        "reply": "r",
        "received_at": "t",
        "peer": PEER,
    }
    again.close()


def test_rows_past_the_history_are_deleted_every_prune_every_ids_and_never_read(data: Path) -> None:
    store = _store(data, history_size=3)
    rows = "SELECT count(*), min(id) FROM messages"

    async def put_many(count: int) -> None:
        await asyncio.gather(*(_put(store, f"m{i}") for i in range(count)))  # one batch

    asyncio.run(put_many(PRUNE_EVERY - 2))
    assert sqlite3.connect(data / DB_NAME).execute(rows).fetchone() == (PRUNE_EVERY - 2, 1)
    last = PRUNE_EVERY - 2
    assert [i for i, _ in store.since(0, 100)] == [last - 2, last - 1, last]
    assert list(store.recent_ids(100)) == [last - 2, last - 1, last]
    assert store.first_id() == last - 2
    assert store.get(last - 3) is None
    assert store.get(last - 2) is not None
    asyncio.run(put_many(4))  # ids reach a multiple of PRUNE_EVERY: the rows below the history go
    last += 4
    assert sqlite3.connect(data / DB_NAME).execute(rows).fetchone() == (3, last - 2)
    assert [i for i, _ in store.since(last - 5, 100)] == [last - 2, last - 1, last]
    store.close()
    smaller = _store(data, history_size=1)  # a smaller bound holds at once, before any write
    assert (smaller.first_id(), list(smaller.recent_ids(5)), smaller.get(last - 1)) == (last, [last], None)
    smaller.close()


def test_one_turn_is_one_transaction_and_a_key_repeated_in_it_stores_once(data: Path) -> None:
    store = _store(data)
    commits: list[int] = []
    store.on_commit = commits.append

    async def burst() -> list[Stored | BaseException]:
        puts = [_put(store, "same", "k") for _ in range(10)] + [_put(store, f"other {i}") for i in range(5)]
        puts.append(_put(store, "not the same", "k"))
        return await asyncio.gather(*puts, return_exceptions=True)

    results = asyncio.run(burst())
    first = results[0]
    assert isinstance(first, Stored)
    assert first.created
    for repeat in results[1:10]:
        assert repeat == Stored(first.id, first.document, False)
    assert [r.created for r in results[10:15] if isinstance(r, Stored)] == [True] * 5
    assert isinstance(results[15], KeyConflict)
    assert len(store.since(0, 100)) == 6
    assert commits == [6], "one commit for the whole turn, its listeners told once with the last id"
    store.close()


def test_ids_past_sqlites_integers_are_simply_absent(data: Path) -> None:
    store = _store(data)
    asyncio.run(_put(store, "one"))
    assert store.get(10**30) is None
    assert store.get(-(10**30)) is None
    assert store.since(10**30, 5) == []
    assert [i for i, _ in store.since(-(10**30), 10**30)] == [1]
    store.close()


def test_keys_outlive_the_history_and_are_bounded_least_recently_used(data: Path) -> None:
    store = _store(data, history_size=1, key_capacity=2)

    async def steps() -> list[bool]:
        created = []
        for text, key in [("a", "a"), ("b", "b"), ("a", "a"), ("c", "c"), ("a", "a"), ("b", "b")]:
            created.append((await _put(store, text, key)).created)
        return created

    # "a" touched before "c" arrives, so "b" is the least recently used key and is forgotten.
    assert asyncio.run(steps()) == [True, True, False, True, False, True]
    count = sqlite3.connect(data / DB_NAME).execute("SELECT count(*) FROM idempotency_keys").fetchone()[0]
    assert count == 2
    repeat = asyncio.run(_put(store, "a", "a"))
    assert repeat.id == 1
    assert store.get(1) is None, "the message left the history; its key still answers"
    assert orjson.loads(repeat.document)["text"] == "a"
    store.close()


def test_the_log_stays_bounded_under_steady_writes(data: Path) -> None:
    """Checkpoints run on the writer thread once the log file reaches WAL_SIZE_LIMIT (or after
    CHECKPOINT_EVERY commits) and empty it, so it does not grow with the number of messages written."""
    store = _store(data, history_size=100)

    turns = 3000
    assert turns > 20 * CHECKPOINT_EVERY

    async def load() -> None:
        for turn in range(turns):
            await asyncio.gather(*(_put(store, f"{turn}.{i} " + "x" * 2000) for i in range(8)))

    asyncio.run(load())
    written = turns * 8 * 2000
    wal = (data / f"{DB_NAME}-wal").stat().st_size
    assert written > 4 * WAL_SIZE_LIMIT
    # Between two checkpoints the log holds about WAL_SIZE_LIMIT (each commit of 16 KB of texts
    # writes 21 pages), against 48 MB written; unbounded, it would hold them all.
    assert wal <= 2 * WAL_SIZE_LIMIT, f"the log grew to {wal} bytes"
    store.close()


def test_reads_see_what_another_connection_committed(data: Path) -> None:
    """Worker processes share the file: each one's reads (and last_id, which streams poll) see the
    others' commits."""
    mine, theirs = _store(data), _store(data)
    assert mine.last_id() == 0
    assert mine.first_id() is None
    stored = asyncio.run(_put(theirs, "from the other worker"))
    assert mine.last_id() == stored.id
    assert mine.get(stored.id) == stored.document
    assert mine.recent_ids(5) == [stored.id]
    mine.close()
    theirs.close()


def test_a_write_lock_held_by_another_process_is_waited_for_off_the_event_loop(data: Path) -> None:
    """While another process holds the write lock, the put waits on the writer thread: the event
    loop goes on (here it releases that lock itself, which a loop blocked in SQLite never would)."""
    store = _store(data)
    other = sqlite3.connect(data / DB_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def scenario() -> Stored:
        put = asyncio.ensure_future(_put(store, "waited"))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not put.done(), "the lock is held: nothing can be committed yet"
        assert store.last_id() == 0, "reads go on meanwhile"
        other.execute("COMMIT")
        return await asyncio.wait_for(put, 30)

    stored = asyncio.run(scenario())
    assert stored.created
    assert store.last_id() == stored.id == 1
    other.close()
    store.close()


def test_processes_sharing_the_file_store_one_message_per_key(data: Path) -> None:
    """Two processes, each 25 concurrent puts of one key, started together: one message."""
    prepare_store(_settings(data))
    script = (
        "import asyncio, sys\n"
        "from app.storage.sqlite import SqliteStore\n"
        "s = SqliteStore(sys.argv[1], history_size=100, key_capacity=100)\n"
        "s.open()\n"
        "async def main():\n"
        "    rs = await asyncio.gather(*(s.put('once', 'r', 't', None, 'k') for _ in range(25)))\n"
        "    print(sorted({r.id for r in rs}), sum(r.created for r in rs))\n"
        "asyncio.run(main())\n"
        "s.close()\n"
    )
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", script, str(data / DB_NAME)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    texts = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), texts
    outputs = [text.split() for text in texts]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(outputs) == [["[1]", "0"], ["[1]", "1"]], "one process created it, the other found it"
    reader = _store(data)
    assert len(reader.since(0, 10)) == 1
    reader.close()


def test_a_fresh_database_is_private_marked_and_at_the_current_version(data: Path) -> None:
    prepare_store(_settings(data))
    path = data / DB_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert data.stat().st_mode & 0o777 == 0o700
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    prepare_store(_settings(data))  # again: nothing to migrate, nothing refused


def test_an_older_schema_is_migrated_in_one_transaction(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for the next schema: version N's SQL runs on a database at N - 1, data kept; a
    migration that fails anywhere leaves the database at its version (check, every step and the
    verification share one transaction, so servers starting at once never see half of it)."""
    store = _store(data)
    first = asyncio.run(_put(store, "kept", "k"))
    store.close()
    later = {**schema.MIGRATIONS, SCHEMA_VERSION + 1: "ALTER TABLE messages ADD COLUMN note TEXT"}
    broken = {**later, SCHEMA_VERSION + 2: "ALTER TABLE no_such_table ADD COLUMN x TEXT"}
    monkeypatch.setattr(schema, "MIGRATIONS", broken)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
    with pytest.raises(StoreError, match=r"cannot prepare database .*no such table: no_such_table"):
        prepare_store(_settings(data))
    db = sqlite3.connect(data / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION, "the good step was rolled back"
    assert [row[1] for row in db.execute("PRAGMA table_info(messages)")] == ["id", "document"]
    db.close()

    monkeypatch.setattr(schema, "MIGRATIONS", later)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    prepare_store(_settings(data))
    again = _store(data)
    assert again.get(first.id) == first.document
    assert asyncio.run(_put(again, "kept", "k")).created is False
    assert again._reader is not None
    columns = [row[1] for row in again._reader.execute("PRAGMA table_info(messages)")]
    assert columns == ["id", "document", "note"]
    again.close()


def test_durability_levels_set_synchronous(data: Path) -> None:
    prepare_store(_settings(data))
    for level, expected in (("normal", 1), ("full", 2)):
        store = SqliteStore(data / DB_NAME, history_size=5, key_capacity=5, durability=level)
        store.open()
        assert store._reader is not None
        assert store._reader.execute("PRAGMA synchronous").fetchone()[0] == expected
        store.close()


def test_a_store_not_prepared_refuses_to_open(data: Path) -> None:
    data.mkdir()
    sqlite3.connect(data / DB_NAME).close()
    store = SqliteStore(data / DB_NAME, history_size=5, key_capacity=5)
    with pytest.raises(StoreError, match="schema version 0, not 1"):
        store.open()


# -- Bad state at startup: a real uds-server, one line, exit 3, the file untouched --------------------


def _fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def _refused(tmp: Path, data: Path, *, as_nobody: bool = False) -> str:
    """Start uds-server on ``data``; assert exit 3, one ERROR line, no socket; return the line."""
    sock = tmp / "s.sock"
    args = ["--socket", str(sock), "--data-dir", str(data)]
    if as_nobody:
        result = python_as_nobody("-m", "app", *args)
        code, output = result.returncode, result.stdout + result.stderr
    else:
        with ServerProcess(args) as server:
            code = server.proc.wait(60)
            output = server.output
    lines = output.splitlines()
    assert code == 3, output
    assert len(lines) == 1, output
    assert lines[0].startswith("ERROR "), output
    assert not sock.exists()
    return lines[0]


def test_a_newer_schema_is_refused_untouched(tmp: Path, data: Path) -> None:
    prepare_store(_settings(data))
    db = sqlite3.connect(data / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = _fingerprint(data / DB_NAME)
    line = _refused(tmp, data)
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this server's {SCHEMA_VERSION}" in line
    assert str(data / DB_NAME) in line
    assert _fingerprint(data / DB_NAME) == before
    assert sorted(os.listdir(data)) == [DB_NAME]


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp: Path, data: Path) -> None:
    data.mkdir()
    (data / DB_NAME).write_bytes(b"this is not SQLite\n" * 300)
    before = _fingerprint(data / DB_NAME)
    line = _refused(tmp, data)
    assert "is not a SQLite database or is corrupt (file is not a database)" in line
    assert "move it aside" in line
    assert _fingerprint(data / DB_NAME) == before


def test_a_damaged_database_is_refused_untouched(tmp: Path, data: Path) -> None:
    """A valid header over damaged pages: the integrity check finds it before anything is written."""
    store = _store(data)
    for i in range(200):
        asyncio.run(_put(store, f"message {i} " + "x" * 500))
    store.close()  # the last connection checkpoints the log into the file
    path = data / DB_NAME
    page = 4096
    raw = bytearray(path.read_bytes())
    assert len(raw) > 4 * page
    raw[2 * page : 2 * page + 64] = b"\xff" * 64  # an interior page of the messages table
    path.write_bytes(bytes(raw))
    before = _fingerprint(path)
    line = _refused(tmp, data)
    assert "is corrupt" in line or "is not a SQLite database or is corrupt" in line, line
    assert _fingerprint(path) == before


def test_a_database_of_another_program_is_refused_untouched(tmp: Path, data: Path) -> None:
    data.mkdir()
    db = sqlite3.connect(data / DB_NAME)
    db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    before = _fingerprint(data / DB_NAME)
    assert "belongs to another program" in _refused(tmp, data)
    assert _fingerprint(data / DB_NAME) == before


def test_a_data_directory_that_is_a_file_is_refused_untouched(tmp: Path) -> None:
    data = tmp / "data"
    data.write_text("not a directory")
    before = _fingerprint(data)
    line = _refused(tmp, data)
    assert line == (
        f"ERROR data directory {data} is not a directory (a file is there); fix it, or set "
        "--data-dir (UDS_DATA_DIR) to another directory"
    )
    assert _fingerprint(data) == before


def test_a_data_directory_that_cannot_be_created_is_refused(tmp: Path) -> None:
    assert os.geteuid() == 0, "this test switches to uid 65534 (CI runs as root)"
    parent = tmp / "parent"
    parent.mkdir(mode=0o755)  # uid 65534 may enter, not create
    os.chmod(tmp, 0o755)
    line = _refused(tmp, parent / "data", as_nobody=True)
    assert line.startswith(f"ERROR cannot create data directory {parent / 'data'} (uid {NOBODY}): "), line
    assert "Permission denied" in line
    assert not (parent / "data").exists()


def test_a_data_directory_that_cannot_be_written_is_refused(tmp: Path) -> None:
    assert os.geteuid() == 0, "this test switches to uid 65534 (CI runs as root)"
    os.chmod(tmp, 0o755)
    data = tmp / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    os.chmod(data, 0o500)  # its owner may read and enter, not write
    line = _refused(tmp, data, as_nobody=True)
    assert line.startswith(
        f"ERROR cannot write in data directory {data} (uid {NOBODY}): Permission denied"
    ), line
    assert f"make it writable for uid {NOBODY}" in line
    assert os.listdir(data) == []


def test_a_data_directory_that_cannot_be_reached_is_refused(tmp: Path) -> None:
    assert os.geteuid() == 0, "this test switches to uid 65534 (CI runs as root)"
    os.chmod(tmp, 0o755)
    private = tmp / "private"
    private.mkdir(mode=0o700)  # root's: uid 65534 may not even look inside
    line = _refused(tmp, private / "data", as_nobody=True)
    assert line.startswith(f"ERROR cannot reach data directory {private / 'data'} (uid {NOBODY}): "), line
    assert "Permission denied" in line


def test_the_memory_store_needs_no_data_directory(tmp: Path) -> None:
    data = tmp / "never"
    sock = tmp / "s.sock"
    with ServerProcess(
        ["--socket", str(sock), "--store", "memory", "--data-dir", str(data)], socket_path=str(sock)
    ) as server:
        server.wait_ready()
        assert http_over_uds(str(sock))[0] == 200
        assert server.stop() == 0
    assert not data.exists()
