"""The data directory against another uid: a real ``uds-server`` (run as root, like CI) never writes
messages where uid 65534 can read or rewrite them. Each attack is set up by uid 65534 itself."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
from pathlib import Path

from app.config import Settings
from app.storage.schema import DB_NAME, prepare_store
from tests.app.test_durable import _refused
from tests.support import NOBODY, http_over_uds, running_server


def _as_nobody(*command: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
        check=True,
        timeout=30,
    )


def _shared(tmp: Path) -> Path:
    """A directory every uid may write in, like /tmp (root's, sticky)."""
    assert os.geteuid() == 0, "these tests switch to uid 65534 (CI runs as root)"
    os.chmod(tmp, 0o755)
    shared = tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    return shared


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_database_symlinked_to_a_file_of_another_uid_is_refused(tmp: Path) -> None:
    shared = _shared(tmp)
    data = shared / "data"
    data.mkdir(mode=0o700)
    bait = shared / "bait"
    _as_nobody("sh", "-c", f"touch {bait} && chmod 666 {bait}")
    (data / DB_NAME).symlink_to(bait)  # e.g. left by a tool, or planted before the directory was ours
    line = _refused(tmp, data)
    assert f"{data / DB_NAME} is a symbolic link" in line, line
    assert bait.stat().st_size == 0  # before: the whole database was written into uid 65534's file


def test_a_database_file_of_another_uid_is_refused(tmp: Path) -> None:
    shared = _shared(tmp)
    data = shared / "data"
    data.mkdir()
    os.chmod(data, 0o1777)
    _as_nobody("sh", "-c", f"touch {data / DB_NAME} && chmod 666 {data / DB_NAME}")
    line = _refused(tmp, data)
    assert f"belongs to uid {NOBODY}" in line, line
    assert (data / DB_NAME).stat().st_size == 0


def test_a_log_symlink_planted_by_another_uid_is_refused(tmp: Path) -> None:
    shared = _shared(tmp)
    data = shared / "data"
    data.mkdir()
    os.chmod(data, 0o1777)
    prepare_store(Settings(data_dir=str(data)))  # a database of ours, from an earlier run
    for suffix in ("-wal", "-shm"):
        (data / f"{DB_NAME}{suffix}").unlink(missing_ok=True)
    bait = shared / "bait"
    _as_nobody("sh", "-c", f"touch {bait} && chmod 666 {bait} && ln -s {bait} {data / DB_NAME}-wal")
    line = _refused(tmp, data)
    assert f"{data / DB_NAME}-wal is a symbolic link" in line, line
    assert bait.stat().st_size == 0


def test_a_data_directory_owned_by_another_uid_is_refused(tmp: Path) -> None:
    shared = _shared(tmp)
    data = shared / "data"
    _as_nobody("sh", "-c", f"mkdir {data} && chmod 777 {data}")  # pre-created for the server to use
    line = _refused(tmp, data)
    assert f"data directory {data} belongs to uid {NOBODY}" in line, line
    assert os.listdir(data) == []


def test_in_a_directory_open_to_all_the_files_are_ours_and_private(tmp: Path) -> None:
    """A root-owned directory every uid may write in (an emptyDir is 0777), declared private by the
    operator, is used, but every file the database needs is made first, by the server, 0600."""
    shared = _shared(tmp)
    data = shared / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    with running_server("--data-dir", str(data), "--data-dir-private") as server:
        assert server.socket_path is not None
        body = b'{"text":"private"}'
        headers = {"content-type": "application/json"}
        status, _ = http_over_uds(server.socket_path, "POST", "/v1/messages", body, headers)
        assert status == 201
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            info = os.lstat(data / name)
            assert stat.S_ISREG(info.st_mode), name
            assert info.st_uid == os.geteuid(), name
            assert _mode(data / name) == 0o600, (name, oct(_mode(data / name)))


def test_a_database_open_to_others_is_made_private(tmp: Path) -> None:
    os.chmod(tmp, 0o755)
    data = tmp / "data"
    prepare_store(Settings(data_dir=str(data)))
    os.chmod(data / DB_NAME, 0o644)  # the log and the index SQLite makes copy this mode
    with running_server("--data-dir", str(data)):
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            assert _mode(data / name) == 0o600, (name, oct(_mode(data / name)))


def test_a_refused_database_leaves_no_files_beside_it(tmp: Path) -> None:
    data = tmp / "data"
    data.mkdir()
    db = sqlite3.connect(data / DB_NAME)  # another program's, in rollback-journal mode
    db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    assert "belongs to another program" in _refused(tmp, data)
    assert sorted(os.listdir(data)) == [DB_NAME]


def test_a_planted_write_check_name_does_not_stop_the_server(tmp: Path) -> None:
    """The writability probe's name was ``.write-check-PID``: in a shared directory another uid could
    plant it for the next pid (a container's server is pid 1) and the server would never start."""
    shared = _shared(tmp)
    data = shared / "data"
    data.mkdir()
    os.chmod(data, 0o1777)
    planted = data / f".write-check-{os.getpid()}"
    _as_nobody("touch", str(planted))
    prepare_store(Settings(data_dir=str(data)))
    assert (data / DB_NAME).is_file()
    assert planted.exists()  # another uid's file, left alone
