"""The socket's life: bind under a strict umask, mode and group, stale/live checks, cleanup."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from app.serving import private_dir, sockets
from app.serving.private_dir import SocketError
from app.serving.sockets import BoundSocket, bind_unix
from tests.support import PYTHON, ROOT, ServerProcess, http_over_uds, wait_until


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_default_mode_is_0660_and_listening(tmp: Path) -> None:
    path = tmp / "s.sock"
    bound = bind_unix(str(path))
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert _mode(path) == 0o660
        assert st.st_gid == os.getgid()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.close()
    finally:
        bound.close()
    assert not path.exists()


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o666])
def test_custom_mode_applied(tmp: Path, mode: int) -> None:
    path = tmp / "s.sock"
    bound = bind_unix(str(path), mode)
    try:
        assert _mode(path) == mode
    finally:
        bound.close()


def test_custom_group_applied(tmp: Path) -> None:
    if os.geteuid() != 0:
        groups = [g for g in os.getgroups() if g != os.getgid()]
        assert groups, "needs root or a supplementary group to test chown"
        gid = groups[0]
    else:
        gid = 4321
    path = tmp / "s.sock"
    bound = bind_unix(str(path), 0o660, gid)
    try:
        assert os.lstat(path).st_gid == gid
        assert _mode(path) == 0o660
        assert f"group {gid}" in sockets.describe(str(path))
    finally:
        bound.close()


def test_never_more_open_than_target_while_binding(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mode and group are set on the owner-only socket in a private directory, never through a link.

    The target path stays empty until the socket is finished: it appears there by rename.
    """
    seen: list[tuple[str, int, dict[str, object], bool]] = []
    real_chown, real_chmod = os.chown, os.chmod
    target = tmp / "s.sock"

    def record(name: str, kwargs: dict[str, object]) -> None:
        fd = kwargs["dir_fd"]
        assert isinstance(fd, int)
        seen.append(
            (
                name,
                stat.S_IMODE(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode),
                {k: v for k, v in kwargs.items() if k != "dir_fd"},
                os.path.lexists(target),
            )
        )

    def chown(path: str, uid: int, gid: int, **kwargs: object) -> None:
        record(path, kwargs)
        real_chown(path, uid, gid, **kwargs)  # type: ignore[arg-type]

    def chmod(path: str, mode: int, **kwargs: object) -> None:
        record(path, kwargs)
        real_chmod(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "chown", chown)
    monkeypatch.setattr(os, "chmod", chmod)
    old = os.umask(0)  # the most permissive process umask must not leak into the socket
    try:
        bound = bind_unix(str(target), 0o660, os.getgid())
    finally:
        os.umask(old)
    try:
        nofollow = {"follow_symlinks": False}
        assert seen == [("s", 0o600, nofollow, False), ("s", 0o600, nofollow, False)]
        assert _mode(target) == 0o660
        assert os.listdir(tmp) == ["s.sock"], "the private directory is removed"
    finally:
        bound.close()
    assert os.umask(old) == old, "bind_unix must restore the process umask"


def test_describe_names_the_path_itself_not_a_link_target(tmp: Path) -> None:
    target = tmp / "target"
    target.write_text("t")
    target.chmod(0o600)
    (tmp / "link").symlink_to(target)
    assert sockets.describe(str(tmp / "link")).startswith("mode 0777, ")
    assert sockets.describe(str(target)).startswith("mode 0600, ")


def test_missing_parent_created_0755(tmp: Path) -> None:
    path = tmp / "a" / "b" / "s.sock"
    old = os.umask(0o022)
    try:
        bound = bind_unix(str(path))
    finally:
        os.umask(old)
    try:
        assert _mode(tmp / "a" / "b") == 0o755
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        bound.close()


def test_parent_cannot_be_created(tmp: Path) -> None:
    blocker = tmp / "file"
    blocker.write_text("x")
    prefix = "cannot create the socket's directory "
    with pytest.raises(SocketError, match=prefix + r".*/file: it exists and is not a directory"):
        bind_unix(str(blocker / "s.sock"))
    with pytest.raises(SocketError, match=prefix + r".*/file/sub: not a directory"):
        bind_unix(str(blocker / "sub" / "s.sock"))
    assert blocker.read_text() == "x"


def test_path_too_long() -> None:
    path = "/tmp/" + "x" * 110 + ".sock"
    with pytest.raises(SocketError, match=r"is 120 bytes, AF_UNIX allows at most 107"):
        bind_unix(path)
    assert not os.path.exists(path)


def _refused(path: Path, kind: str) -> None:
    with pytest.raises(SocketError, match=rf"exists and is {kind}; left untouched"):
        bind_unix(str(path))
    assert os.listdir(path.parent) == [path.name] or kind == "a symbolic link", "private directory removed"


def test_regular_file_refused_and_untouched(tmp: Path) -> None:
    path = tmp / "s.sock"
    path.write_text("precious")
    _refused(path, "a regular file")
    assert path.read_text() == "precious"


def test_directory_refused_and_untouched(tmp: Path) -> None:
    path = tmp / "s.sock"
    path.mkdir()
    (path / "inside").write_text("x")
    _refused(path, "a directory")
    assert (path / "inside").read_text() == "x"


def test_symlink_refused_and_untouched(tmp: Path) -> None:
    target = tmp / "target"
    target.write_text("t")
    path = tmp / "s.sock"
    path.symlink_to(target)
    _refused(path, "a symbolic link")
    assert path.is_symlink()
    assert os.readlink(path) == str(target)
    assert target.read_text() == "t"


def test_dangling_symlink_to_stale_socket_refused(tmp: Path) -> None:
    path = tmp / "s.sock"
    path.symlink_to(tmp / "elsewhere.sock")
    _refused(path, "a symbolic link")
    assert path.is_symlink()


def _stale_socket(path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # never listened: connecting is refused


def test_stale_socket_replaced_and_logged(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp / "s.sock"
    _stale_socket(path)
    with caplog.at_level(logging.INFO, logger="app.serving.sockets"):
        bound = bind_unix(str(path))
    try:
        assert _mode(path) == 0o660
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))  # the new socket listens where the dead one was
        client.close()
        assert f"Removed stale socket {path} (nothing was listening on it)" in caplog.text
    finally:
        bound.close()


def test_live_socket_refused_and_untouched(tmp: Path) -> None:
    path = tmp / "s.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        ino = os.lstat(path).st_ino
        with pytest.raises(SocketError, match="another server is already listening on it"):
            bind_unix(str(path))
        assert os.lstat(path).st_ino == ino
    finally:
        live.close()


def test_remove_only_our_inode(tmp: Path) -> None:
    path = tmp / "s.sock"
    bound = bind_unix(str(path))
    other = tmp / "other.sock"
    _stale_socket(other)
    os.rename(other, path)  # someone else's socket now lives at the path
    ino = os.lstat(path).st_ino
    bound.close()
    assert os.lstat(path).st_ino == ino, "a socket we did not create must stay"


def test_remove_checks_more_than_the_inode_number(tmp: Path) -> None:
    """Filesystems hand a freed inode number to the next file: identity includes the ctime."""
    path = tmp / "s.sock"
    bound = bind_unix(str(path))
    os.unlink(path)
    _stale_socket(path)
    dev, _, ctime = bound.identity
    st = os.lstat(path)

    def replaced_later() -> bool:
        os.chmod(path, 0o600)  # a later change, as another server's setup would make
        return os.lstat(path).st_ctime_ns != ctime

    wait_until(replaced_later, what="a ctime tick")
    bound.identity = (dev, st.st_ino, ctime)  # pretend the new file reused our inode number
    bound.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode), "a socket we did not create must stay"


def test_close_is_idempotent_and_tolerates_missing_file(tmp: Path) -> None:
    path = tmp / "s.sock"
    bound = bind_unix(str(path))
    os.unlink(path)
    bound.close()
    bound.close()
    assert not path.exists()


# Races with another user at the path, made deterministic -------------------------------------------


def _fingerprint(path: Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_ctime_ns)


@pytest.fixture
def victim(tmp: Path) -> Path:
    """A 0600 file of the server's user that a symlink at the socket path points to."""
    vault = tmp / "vault"
    vault.mkdir(mode=0o700)
    secret = vault / "secret"
    secret.write_text("owner only")
    secret.chmod(0o600)
    return secret


def _swap_in_symlink(path: Path, target: Path) -> None:
    """What another uid does: rename a fresh symlink over the path (atomic, whatever is there)."""
    link = path.with_name(".swap")
    link.symlink_to(target)
    os.rename(link, path)


def _other_gid() -> int:
    return 4321 if os.geteuid() == 0 else os.getgid()


def test_symlink_swapped_in_before_the_rename_is_replaced_not_followed(
    tmp: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp / "s.sock"
    before = _fingerprint(victim)
    real_check = sockets._check_target

    def check_then_swap(target: str, parent_fd: int) -> bool:
        stale = real_check(target, parent_fd)
        _swap_in_symlink(path, victim)  # after the last check, before the rename
        return stale

    monkeypatch.setattr(sockets, "_check_target", check_then_swap)
    bound = bind_unix(str(path), 0o660, _other_gid())
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode), "the rename replaces the symlink itself"
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, _other_gid())
        assert _fingerprint(victim) == before
    finally:
        bound.close()
    assert not path.exists()


def test_socket_replaced_right_after_the_rename_fails_the_start(
    tmp: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp / "s.sock"
    before = _fingerprint(victim)
    real_rename = os.rename

    def rename_then_swap(src: str, dst: str, **kwargs: int) -> None:
        real_rename(src, dst, **kwargs)
        if dst == path.name:
            _swap_in_symlink(path, victim)

    monkeypatch.setattr(os, "rename", rename_then_swap)
    with pytest.raises(SocketError) as caught:
        bind_unix(str(path), 0o660, _other_gid())
    monkeypatch.undo()
    assert str(caught.value) == (
        f"cannot listen on {path}: another program replaced the socket as soon as it appeared; another user "
        f"can write its directory {tmp}: make it writable only by the server's user and the socket's group"
    )
    assert os.readlink(path) == str(victim), "the replacement is left alone"
    assert _fingerprint(victim) == before
    assert sorted(os.listdir(tmp)) == ["s.sock", "vault"], "no private directory left behind"


def test_private_directory_swapped_for_a_symlink_is_refused(
    tmp: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another uid renames the private directory away and puts a symlink to a directory there."""
    path = tmp / "s.sock"
    decoy = victim.parent
    before = (_fingerprint(decoy), sorted(os.listdir(decoy)))
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_then_swap(prefix: str, dir: str) -> str:
        made = real_mkdtemp(prefix=prefix, dir=dir)
        os.rename(made, made + ".moved")
        os.symlink(decoy, made)
        return made

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_swap)
    with pytest.raises(SocketError, match=r"the private directory .* was replaced during start"):
        bind_unix(str(path), 0o660, _other_gid())
    assert (_fingerprint(decoy), sorted(os.listdir(decoy))) == before
    assert not os.path.lexists(path)


def test_setgid_directory_like_an_emptydir_with_fsgroup(tmp: Path) -> None:
    """Kubernetes makes an emptyDir 2777 with fsGroup: the private directory inherits the setgid bit."""
    shared = tmp / "csi"
    shared.mkdir()
    os.chown(shared, -1, _other_gid())
    shared.chmod(0o2777)
    bound = bind_unix(str(shared / "csi.sock"))
    try:
        st = os.lstat(shared / "csi.sock")
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, _other_gid()), "the directory's group"
        assert os.listdir(shared) == ["csi.sock"]
    finally:
        bound.close()


def test_bind_without_proc_uses_the_private_path(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(private_dir, "PROC_FD", str(tmp / "no-proc"))
    bound = bind_unix(str(tmp / "s.sock"), 0o640)
    try:
        assert _mode(tmp / "s.sock") == 0o640
        assert os.listdir(tmp) == ["s.sock"]
    finally:
        bound.close()


def test_longest_path_binds_although_the_private_one_is_longer(tmp: Path) -> None:
    name = "x" * (107 - len(str(tmp)) - 1)
    path = tmp / name
    assert len(os.fsencode(str(path))) == 107
    bound = bind_unix(str(path))
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert _mode(path) == 0o660
    finally:
        bound.close()


# The warning about who else can write the directory ----------------------------------------------------


def _warnings(directory: Path, caplog: pytest.LogCaptureFixture, group: int | None = None) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.serving.sockets"):
        bound = bind_unix(str(directory / "s.sock"), 0o660, group)
    bound.close()
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_warns_when_every_user_can_write_the_directory(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    tmp.chmod(0o777)
    gid = os.getegid()
    assert _warnings(tmp, caplog) == [
        f"Socket directory {tmp} can be written by every user (mode 0777, owner uid {os.geteuid()}, "
        f"group {gid}): any of them can remove the socket or replace it with their own, so clients could "
        f"reach another program; keep it writable only by uid {os.geteuid()} and group {gid}, or mount it "
        "read-only in the other containers"
    ]


def test_sticky_bit_is_described_as_a_partial_guard(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    tmp.chmod(0o1777)
    (line,) = _warnings(tmp, caplog)
    assert "can be written by every user (mode 1777" in line
    assert (
        "its sticky bit stops them from renaming or removing the socket while it exists, but any of "
        "them can take the path before the server starts or after it stops"
    ) in line


def test_warns_when_another_group_can_write_it(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert os.geteuid() == 0, "needs root to give the directory to another group"
    os.chown(tmp, -1, 4242)
    tmp.chmod(0o770)
    (line,) = _warnings(tmp, caplog, group=4321)
    assert f"Socket directory {tmp} can be written by group 4242 (mode 0770" in line
    assert _warnings(tmp, caplog, group=4242) == [], "the socket's own group may write it"


def test_warns_when_another_user_owns_the_directory(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert os.geteuid() == 0, "needs root to give the directory to another user"
    os.chown(tmp, 65534, -1)
    tmp.chmod(0o755)
    (line,) = _warnings(tmp, caplog)
    assert f"Socket directory {tmp} can be written by its owner uid 65534 (mode 0755" in line


@pytest.mark.parametrize("mode", [0o750, 0o700, 0o755])
def test_no_warning_for_a_private_directory(tmp: Path, caplog: pytest.LogCaptureFixture, mode: int) -> None:
    tmp.chmod(mode)
    assert _warnings(tmp, caplog) == []


def test_tcp_port_zero_picks_a_port() -> None:
    bound: BoundSocket = sockets.bind_tcp("127.0.0.1", 0)
    try:
        assert bound.sock.getsockname()[1] > 0
        assert bound.in_place() is None  # no file to remove
    finally:
        bound.close()


# Real processes -----------------------------------------------------------------------------------


def test_second_server_refused_first_keeps_serving(tmp: Path) -> None:
    path = str(tmp / "s.sock")
    with ServerProcess(["--socket", path], socket_path=path) as first:
        first.wait_ready()
        ino = os.lstat(path).st_ino
        with ServerProcess(["--socket", path]) as second:
            assert second.proc.wait(30) == 3
            errors = [line for line in second.output.splitlines() if "ERROR" in line]
            assert errors == [
                f"ERROR cannot listen on {path}: another server is already listening on it; "
                "stop it first or choose another --socket"
            ], second.output
            assert "Traceback" not in second.output
        assert os.lstat(path).st_ino == ino
        assert http_over_uds(path)[0] == 200
        assert first.stop() == 0
    assert not os.path.exists(path)


def test_restart_after_kill_9_over_stale_socket(tmp: Path) -> None:
    path = str(tmp / "s.sock")
    with ServerProcess(["--socket", path], socket_path=path) as first:
        first.wait_ready()
        first.stop(signal.SIGKILL)
    assert stat.S_ISSOCK(os.lstat(path).st_mode), "SIGKILL leaves the socket behind"
    with ServerProcess(["--socket", path], socket_path=path) as second:
        second.wait_ready()
        assert f"Removed stale socket {path} (nothing was listening on it)" in second.output.splitlines()
        assert _mode(Path(path)) == 0o660
        assert second.stop() == 0
    assert not os.path.exists(path)


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_server_refuses_non_socket_path(tmp: Path, kind: str) -> None:
    path = tmp / "s.sock"
    if kind == "file":
        path.write_text("keep")
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to(tmp / "nowhere")
    with ServerProcess(["--socket", str(path)]) as server:
        assert server.proc.wait(30) == 3
        lines = [line for line in server.output.splitlines() if line.startswith("ERROR")]
        assert len(lines) == 1, server.output
        assert "left untouched" in lines[0]
    assert os.path.lexists(path)
    if kind == "file":
        assert path.read_text() == "keep"


def test_server_applies_mode_and_group(tmp: Path) -> None:
    assert os.geteuid() == 0, "chown to another group needs root here"
    path = str(tmp / "s.sock")
    with ServerProcess(
        ["--socket", path, "--socket-mode", "0640", "--socket-group", "daemon"], socket_path=path
    ) as server:
        server.wait_ready()
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o640
        import grp

        daemon = grp.getgrnam("daemon")
        assert st.st_gid == daemon.gr_gid
        assert f"Socket {path}: mode 0640, owner uid 0, group {daemon.gr_gid} (daemon)" in server.output
        assert server.stop() == 0


def test_server_creates_missing_parent(tmp: Path) -> None:
    path = str(tmp / "new" / "s.sock")
    with ServerProcess(["--socket", path], socket_path=path) as server:
        server.wait_ready()
        assert _mode(tmp / "new") == 0o755
        assert f"Created directory {tmp / 'new'} for the socket" in server.output
        assert server.stop() == 0
    wait_until(lambda: not os.path.exists(path), what="socket removed")


# Leftover private directories of starts killed between the bind and the rename -------------------------


def _leftover(directory: Path, *, listen: bool = False) -> tuple[Path, socket.socket]:
    """A private directory with a socket inside, made as ``bind_unix`` makes them for ``s.sock``."""
    made = Path(tempfile.mkdtemp(prefix=".s.sock.", dir=directory))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(made / "s"))
    if listen:
        sock.listen(1)
    else:
        sock.close()  # what a kill leaves: nothing listens, connecting is refused
    return made, sock


def _bind_and_log(path: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.serving.sockets"):
        bound = bind_unix(str(path))
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        bound.close()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Removed ")]


def test_leftover_of_a_start_killed_before_the_rename_is_removed_at_the_next_start(tmp: Path) -> None:
    path = tmp / "s.sock"
    killed = subprocess.run(
        [
            PYTHON,
            "-c",
            "import os, signal, sys\n"
            "from app.serving import sockets\n"
            "sockets._move_into_place = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "sockets.bind_unix(sys.argv[1])\n",
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (leftover,) = [entry for entry in tmp.iterdir() if entry.name.startswith(".s.sock.")]
    assert [entry.name for entry in leftover.iterdir()] == ["s"]
    assert stat.S_ISSOCK(os.lstat(leftover / "s").st_mode)
    with ServerProcess(["--socket", str(path)], socket_path=str(path)) as server:
        server.wait_ready()
        line = f"Removed {leftover}, left by a start that did not finish (a dead socket)"
        assert line in server.output.splitlines()
        assert os.listdir(tmp) == ["s.sock"]
        assert server.stop() == 0


def test_empty_leftover_is_removed(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A start killed after making its directory and before binding leaves it empty."""
    made = Path(tempfile.mkdtemp(prefix=".s.sock.", dir=tmp))
    assert _bind_and_log(tmp / "s.sock", caplog) == [
        f"Removed {made}, left by a start that did not finish (nothing)"
    ]
    assert os.listdir(tmp) == []


def test_leftover_removed_without_proc(
    tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without /proc the probe reaches the dead socket through the leftover's path."""
    monkeypatch.setattr(private_dir, "PROC_FD", str(tmp / "no-proc"))
    made, _ = _leftover(tmp)
    assert _bind_and_log(tmp / "s.sock", caplog) == [
        f"Removed {made}, left by a start that did not finish (a dead socket)"
    ]
    assert os.listdir(tmp) == []


def test_leftovers_of_other_socket_names_are_not_touched(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    made = Path(tempfile.mkdtemp(prefix=".other.sock.", dir=tmp))
    assert _bind_and_log(tmp / "s.sock", caplog) == []
    assert os.listdir(tmp) == [made.name]


def test_leftover_of_another_uid_is_left_alone(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert os.geteuid() == 0, "chown to another uid needs root here"
    made, _ = _leftover(tmp)
    os.chown(made / "s", 65534, 65534)
    os.chown(made, 65534, 65534)
    assert _bind_and_log(tmp / "s.sock", caplog) == []
    assert os.lstat(made).st_uid == 65534
    assert os.listdir(made) == ["s"]


def test_socket_of_another_uid_inside_our_leftover_is_left_alone(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert os.geteuid() == 0, "chown to another uid needs root here"
    made, _ = _leftover(tmp)
    os.chown(made / "s", 65534, 65534, follow_symlinks=False)
    assert _bind_and_log(tmp / "s.sock", caplog) == []
    assert os.listdir(made) == ["s"]


def test_symlink_named_like_a_leftover_is_left_alone(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The link points at a directory shaped exactly like a leftover: neither is touched."""
    shaped, _ = _leftover(tmp)
    target = tmp / "elsewhere"
    os.rename(shaped, target)
    link = tmp / ".s.sock.abcd1234"
    link.symlink_to(target)
    assert _bind_and_log(tmp / "s.sock", caplog) == []
    assert link.is_symlink()
    assert os.listdir(target) == ["s"]
    assert stat.S_ISSOCK(os.lstat(target / "s").st_mode)


def test_leftover_with_a_live_socket_is_left_alone(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Something listens inside: another server's start, not a dead one."""
    made, live = _leftover(tmp, listen=True)
    try:
        assert _bind_and_log(tmp / "s.sock", caplog) == []
        assert os.listdir(made) == ["s"]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(made / "s"))  # still the same listener
        client.close()
    finally:
        live.close()


def test_leftover_with_an_extra_file_is_left_alone(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    made, _ = _leftover(tmp)
    (made / "notes").write_text("keep")
    assert _bind_and_log(tmp / "s.sock", caplog) == []
    assert sorted(os.listdir(made)) == ["notes", "s"]
    assert (made / "notes").read_text() == "keep"


@pytest.mark.parametrize("mode", [0o750, 0o755, 0o1700])
def test_leftover_of_another_mode_is_left_alone(
    tmp: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    made, _ = _leftover(tmp)
    made.chmod(mode)
    assert _bind_and_log(tmp / "s.sock", caplog) == []
    assert os.listdir(made) == ["s"]


def test_leftover_locked_by_a_starting_server_is_left_alone(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A start holds a lock on its directory from creation to removal; another start skips it."""
    made = Path(tempfile.mkdtemp(prefix=".s.sock.", dir=tmp))
    fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert _bind_and_log(tmp / "s.sock", caplog) == []
        assert made.is_dir()
    finally:
        os.close(fd)


def test_start_whose_directory_is_removed_before_it_opens_it_makes_a_fresh_one(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another start took the new, still empty directory for a leftover and removed it."""
    real_mkdtemp = tempfile.mkdtemp
    made: list[str] = []

    def mkdtemp_removed_once(prefix: str, dir: str) -> str:
        made.append(real_mkdtemp(prefix=prefix, dir=dir))
        if len(made) == 1:
            os.rmdir(made[0])
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_removed_once)
    bound = bind_unix(str(tmp / "s.sock"))
    try:
        assert len(made) == 2
        assert os.listdir(tmp) == ["s.sock"]
    finally:
        bound.close()


@pytest.mark.parametrize("when", ["before the lock", "while another start holds the lock"])
def test_start_whose_directory_is_taken_as_a_leftover_makes_a_fresh_one(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Another start's cleanup got to the new directory after this start opened it."""
    real_try_lock = private_dir.try_lock
    calls: list[int] = []

    def cleanup_first(fd: int) -> bool | None:
        calls.append(fd)
        if len(calls) > 1:
            return real_try_lock(fd)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if when == "before the lock":
            os.rmdir(name)  # the other start locked, removed it, and let go
            return real_try_lock(fd)
        other = os.open(name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            return real_try_lock(fd)
        finally:
            os.close(other)
            os.rmdir(name)  # it goes on to remove it

    monkeypatch.setattr(private_dir, "try_lock", cleanup_first)
    bound = bind_unix(str(tmp / "s.sock"))
    try:
        assert len(calls) == 2, "a fresh private directory was made and locked"
        assert os.listdir(tmp) == ["s.sock"]
    finally:
        bound.close()
