"""Starting on a data directory: any path works, concurrent first starts all succeed, a schema that
drifted from this server's is refused, and a directory another uid can write in is refused unless
the operator declares it private. Each with a real ``uds-server`` where a start is the scenario."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from app.config import Settings
from app.storage.schema import DB_NAME, SCHEMA_VERSION, prepare_store
from app.storage.sqlite import SqliteStore
from app.storage.store import StoreError
from tests.app.test_durable import _fingerprint, _refused
from tests.support import NOBODY, PYTHON, ROOT, ServerProcess, http_over_uds, python_as_nobody

BODY = b'{"text":"kept"}'
JSON = {"content-type": "application/json"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- Any path -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a?b", "a#b", "a%3Fb", "a?mode=ro#x", "é ü"])
def test_any_data_directory_path_holds_the_database_itself(tmp: Path, name: str) -> None:
    """The path went into a ``file:`` URI unescaped: ``?`` and ``#`` cut it, and the database
    landed in another file, outside the data directory, with mode 0644."""
    os.chmod(tmp, 0o755)
    data = tmp / name / "data"
    sock = str(tmp / "s.sock")
    args = ["--socket", sock, "--data-dir", str(data)]
    with ServerProcess(args, socket_path=sock) as server:
        server.wait_ready()
        status, body = http_over_uds(sock, "POST", "/messages", BODY, JSON)
        assert status == 201, body
        message_id = json.loads(body)["id"]
        names = sorted(os.listdir(data))
        assert names == sorted([DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"]), names
        for entry in names:
            assert _mode(data / entry) == 0o600, (entry, oct(_mode(data / entry)))
        assert server.stop() == 0
    outside = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not str(p).startswith(f"{data}/"))
    assert outside == sorted([name, str(Path(name) / "data")]), outside
    with ServerProcess(args, socket_path=sock) as server:  # the same file again after a restart
        server.wait_ready()
        status, body = http_over_uds(sock, "GET", f"/messages/{message_id}")
        assert status == 200, body
        assert json.loads(body)["text"] == "kept", body
        assert server.stop() == 0


# -- Concurrent first starts --------------------------------------------------------------------------


def _prepare_and_write(data: str, start: threading.Barrier | None = None) -> str:
    """Prepare the store on ``data`` and write through it; '' when that worked, else the error."""
    try:
        if start is not None:
            start.wait(10)
        prepare_store(Settings(data_dir=data))
        store = SqliteStore(Path(data) / DB_NAME, history_size=10, key_capacity=10)
        store.open()
        store.close()
    except Exception as exc:  # collected: the test reports every failure at once
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_a_hundred_concurrent_first_starts_all_succeed(tmp: Path) -> None:
    """Each round starts 4 preparations at once on a fresh directory, in processes (as servers
    are) and in threads; 25 rounds of each. Before, about 1 in 10 failed with "table messages
    already exists" or "cannot create database ... File exists"."""
    context = multiprocessing.get_context("forkserver")
    failures: list[str] = []
    with context.Pool(4) as pool:
        for round_ in range(25):
            data = str(tmp / f"p{round_}" / "data")
            failures += [f for f in pool.map(_prepare_and_write, [data] * 4) if f]
    for round_ in range(25):
        data = str(tmp / f"t{round_}" / "data")
        start = threading.Barrier(4)
        results: list[str] = []

        def run(data: str = data, start: threading.Barrier = start, results: list[str] = results) -> None:
            results.append(_prepare_and_write(data, start))

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        failures += [f for f in results if f]
    assert failures == [], f"{len(failures)} of 200 starts failed: {failures[:3]}"
    db = sqlite3.connect(tmp / "p0" / "data" / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_pairs_of_servers_started_at_once_on_a_fresh_directory_both_serve(tmp: Path) -> None:
    for round_ in range(4):
        data = tmp / f"d{round_}"
        socks = [str(tmp / f"{round_}{side}.sock") for side in "ab"]
        servers = [ServerProcess(["--socket", s, "--data-dir", str(data)], socket_path=s) for s in socks]
        try:
            for server in servers:
                server.wait_ready()
            for sock in socks:
                status, body = http_over_uds(sock, "POST", "/messages", BODY, JSON)
                assert status == 201, body
            for server in servers:
                assert server.stop() == 0, server.output
        finally:
            for server in servers:
                server.__exit__(None, None, None)


# -- Schema drift -------------------------------------------------------------------------------------


def _drifted(data: Path, sql: str) -> Path:
    prepare_store(Settings(data_dir=str(data)))
    db = sqlite3.connect(data / DB_NAME)
    db.executescript(sql)
    db.close()
    return data / DB_NAME


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("DROP TABLE counters", "table counters is missing"),
        ("DROP INDEX idempotency_keys_used", "index idempotency_keys_used is missing"),
        ("ALTER TABLE messages ADD COLUMN note TEXT", "table messages differs"),
        ("CREATE TABLE extra (x)", "table extra is not this server's"),
        ("DELETE FROM counters WHERE name = 'clock'", "counter clock is missing"),
    ],
)
def test_a_schema_that_drifted_is_refused_at_start(tmp: Path, sql: str, named: str) -> None:
    path = _drifted(tmp / "data", sql)
    before = _fingerprint(path)
    line = _refused(tmp, tmp / "data")
    assert f"database {path} does not have this server's schema (version {SCHEMA_VERSION}): " in line, line
    assert named in line, line
    assert _fingerprint(path) == before


def test_a_dropped_counters_table_never_gives_500(tmp: Path) -> None:
    """The finding: the server started on such a database, then every keyed POST got 500."""
    data = tmp / "data"
    _drifted(data, "DROP TABLE counters")
    sock = str(tmp / "s.sock")
    with ServerProcess(["--socket", sock, "--data-dir", str(data)], socket_path=sock) as server:
        code = server.proc.wait(60)
        assert code == 3, server.output
    assert not Path(sock).exists()


# -- A data directory other uids can write in ---------------------------------------------------------


def _as_nobody(*command: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        check=True,
        timeout=30,
    )


def _post(sock: str, count: int) -> list[int]:
    ids = []
    for i in range(count):
        status, body = http_over_uds(sock, "POST", "/messages", json.dumps({"text": f"m{i}"}).encode(), JSON)
        assert status == 201, body
        ids.append(json.loads(body)["id"])
    return ids


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o2777, 0o757])
def test_a_data_directory_others_may_write_in_is_refused(tmp: Path, mode: int) -> None:
    """The finding: with the directory 0777, uid 65534 renamed the database while the server ran;
    after a restart the 10 acknowledged messages were gone and ids started at 1 again."""
    os.chmod(tmp, 0o755)
    data = tmp / "data"
    data.mkdir()
    os.chmod(data, mode)
    line = _refused(tmp, data)
    assert f"data directory {data} can be written by other uids (mode {mode:04o}, no sticky bit)" in line
    assert "--data-dir-private (UDS_DATA_DIR_PRIVATE=true)" in line, line
    assert os.listdir(data) == []


def test_declared_private_a_shared_mode_directory_is_used(tmp: Path) -> None:
    """An emptyDir is 0777 (root's) but mounted into the server's container alone: the operator
    says so with UDS_DATA_DIR_PRIVATE, and the server starts; its files are still 0600."""
    os.chmod(tmp, 0o755)
    data = tmp / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    sock = str(tmp / "s.sock")
    args = ["--socket", sock, "--data-dir", str(data)]
    with ServerProcess(args, socket_path=sock, env={"UDS_DATA_DIR_PRIVATE": "true"}) as server:
        server.wait_ready()
        assert _post(sock, 1) == [1]
        assert server.stop() == 0
    for name in os.listdir(data):
        assert _mode(data / name) == 0o600, name


def test_the_rename_attack_of_the_finding_cannot_happen(tmp: Path) -> None:
    """Replayed end to end: a 0777 directory is refused; made 0700 (as the error says), the server
    keeps its messages, and uid 65534 cannot rename the database."""
    os.chmod(tmp, 0o755)
    data = tmp / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    _refused(tmp, data)
    os.chmod(data, 0o700)
    sock = str(tmp / "s.sock")
    args = ["--socket", sock, "--data-dir", str(data)]
    with ServerProcess(args, socket_path=sock) as server:
        server.wait_ready()
        assert _post(sock, 10) == list(range(1, 11))
        renamed = python_as_nobody(
            "-c", f"import os; os.rename({str(data / DB_NAME)!r}, {str(data / 'gone')!r})"
        )
        assert renamed.returncode != 0, renamed
        assert "Permission denied" in renamed.stderr, renamed
        assert server.stop() == 0
    with ServerProcess(args, socket_path=sock) as server:
        server.wait_ready()
        assert _post(sock, 1) == [11]
        assert server.stop() == 0


def test_a_parent_directory_others_may_write_in_is_refused(tmp: Path) -> None:
    """Another uid that can rename a parent can swap the whole data directory."""
    os.chmod(tmp, 0o755)
    parent = tmp / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    data = parent / "data"
    line = _refused(tmp, data)
    assert f"directory {parent} (a parent of data directory {data}) can be written by other uids" in line, (
        line
    )
    assert not data.exists()
    line = _refused_with_private(tmp, data)  # declaring the data directory private does not cover it
    assert f"directory {parent} (a parent of" in line, line


def _refused_with_private(tmp: Path, data: Path) -> str:
    sock = tmp / "s.sock"
    args = ["--socket", str(sock), "--data-dir", str(data), "--data-dir-private"]
    with ServerProcess(args) as server:
        code = server.proc.wait(60)
        output = server.output
    assert code == 3, output
    assert len(output.splitlines()) == 1, output
    return output.strip()


def test_a_parent_of_another_uid_is_refused(tmp: Path) -> None:
    os.chmod(tmp, 0o755)
    parent = tmp / "theirs"
    parent.mkdir()
    os.chown(parent, NOBODY, NOBODY)
    os.chmod(parent, 0o755)
    data = parent / "data"
    data.mkdir(mode=0o700)
    line = _refused(tmp, data)
    assert f"directory {parent} (a parent of data directory {data}) belongs to uid {NOBODY}" in line, line


def test_a_data_directory_symlink_of_another_uid_is_refused(tmp: Path) -> None:
    """In a sticky directory another uid may plant ``data`` as a symbolic link to a directory that
    passes every check (here root's own), and re-point it whenever it likes."""
    os.chmod(tmp, 0o755)
    shared = tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    target = tmp / "target"
    target.mkdir(mode=0o700)
    link = shared / "data"
    _as_nobody("ln", "-s", str(target), str(link))
    line = _refused(tmp, link)
    assert f"{link} is a symbolic link of uid {NOBODY}" in line, line
    assert os.listdir(target) == []


def test_a_sticky_shared_directory_and_parents_are_accepted(tmp: Path) -> None:
    """/tmp's mode (1777, root's): others may add names but not rename ours."""
    os.chmod(tmp, 0o755)
    shared = tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    prepare_store(Settings(data_dir=str(shared / "data")))
    prepare_store(Settings(data_dir=str(shared)))


def test_the_setting_is_declared_once() -> None:
    assert Settings.from_env({"UDS_DATA_DIR_PRIVATE": "true"}).data_dir_private is True
    assert Settings.from_env({}).data_dir_private is False
    result = subprocess.run(
        [PYTHON, "-m", "app", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True
    )
    assert "--data-dir-private" in result.stdout, result.stdout
    assert "UDS_DATA_DIR_PRIVATE" in result.stdout, result.stdout


def test_private_does_not_accept_a_directory_of_another_uid(tmp: Path) -> None:
    os.chmod(tmp, 0o755)
    data = tmp / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    with pytest.raises(StoreError, match=f"belongs to uid {NOBODY}"):
        prepare_store(Settings(data_dir=str(data), data_dir_private=True))


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("DROP TABLE counters", "no such table: counters"),
        ("DELETE FROM counters", "counter clock is missing"),
    ],
)
def test_a_schema_changed_while_serving_gives_503_and_one_line_not_500(
    tmp: Path, sql: str, reason: str
) -> None:
    """The start check cannot see what another program does to the file later; then the write
    fails, nothing is stored, and the answer says so (503), not an internal error."""
    data = tmp / "data"
    sock = str(tmp / "s.sock")
    with ServerProcess(["--socket", sock, "--data-dir", str(data)], socket_path=sock) as server:
        server.wait_ready()
        db = sqlite3.connect(data / DB_NAME)
        db.execute(sql)
        db.commit()
        db.close()
        for i in range(3):
            headers = {**JSON, "Idempotency-Key": f"k{i}"}
            status, body = http_over_uds(sock, "POST", "/messages", BODY, headers)
            assert status == 503, body
            error = json.loads(body)
            assert error["error"] == "unavailable", error
            assert f"{reason}; nothing was stored" in error["message"], error
        status, body = http_over_uds(sock, "GET", "/messages")
        assert status == 200, body
        assert json.loads(body)["messages"] == []
        assert server.stop() == 0
        logged = [line for line in server.output.splitlines() if reason in line]
        assert len(logged) == 1, server.output  # throttled: one line, not one per request
        assert "Traceback" not in server.output
