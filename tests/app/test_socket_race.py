"""Another uid races the server's start: a symlink renamed over the socket path the instant it appears.

The directory is world-writable, as an emptyDir is for every container of a Pod. The swapper runs
as uid 65534 and points its symlinks at a 0600 file of the server's user (root here). Whatever it
wins, the server must never change the mode, owner or group of anything but its own socket (the
victim's change time proves no chmod or chown reached it). Each real start must serve on the path,
or stop with one ERROR line and exit 3: when the swapper replaces the finished socket after the
server's last check (no server can prevent that in a directory others can write), the server must
have warned about the directory at start, notice the loss within a second, stop with exit 3 and
leave the replacement alone. The in-process test runs the
same race on ``bind_unix`` thousands of times.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import PYTHON, ROOT, ServerProcess, http_over_uds, short_tmpdir, wait_until

NOBODY = 65534
STARTS = 30
BINDS = 3000
SOCKET_GROUP = "daemon"

# Busy-loops on lstat (no inotify): each time a socket is at the path, renames a fresh symlink to
# the victim over it. Stops when the stop file exists or after a time limit; prints its swap count.
SWAPPER = textwrap.dedent("""
    import os, stat, sys, time
    directory, name, victim, stop, limit = sys.argv[1:6]
    path = os.path.join(directory, name)
    deadline = time.monotonic() + float(limit)
    lstat, rename, is_socket = os.lstat, os.rename, stat.S_ISSOCK
    made = swaps = 0

    def fresh():
        global made
        made += 1
        link = os.path.join(directory, f".swap{made}")
        os.symlink(victim, link)
        return link

    link = fresh()
    print("ready", flush=True)
    while not os.path.exists(stop) and time.monotonic() < deadline:
        for _ in range(4096):  # the hot loop: as few bytecodes as possible between two lstat calls
            try:
                if is_socket(lstat(path).st_mode):
                    rename(link, path)
                    swaps += 1
                    link = fresh()
            except OSError:
                pass
    os.unlink(link)
    print(swaps, flush=True)
""")


def _fingerprint(path: Path) -> tuple[int, int, int, int, int]:
    """Mode, owner, group, inode and change time: a chmod or chown, even to the same values, shows."""
    st = os.lstat(path)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_ino, st.st_ctime_ns)


@pytest.fixture
def arena() -> Iterator[tuple[Path, Path]]:
    """A world-writable socket directory and, apart, a root-only directory holding the victim."""
    assert os.geteuid() == 0, "the swapper runs as uid 65534: these tests need root (CI runs as root)"
    shared = short_tmpdir("race")
    shared.chmod(0o777)
    vault = short_tmpdir("vault")  # 0700, root's: the swapper can name the victim, not read it
    victim = vault / "secret"
    victim.write_text("root only\n")
    victim.chmod(0o600)
    yield shared, victim
    shutil.rmtree(shared, ignore_errors=True)
    shutil.rmtree(vault, ignore_errors=True)


class Swapper:
    """The attacking process, as uid 65534, and its stop file."""

    def __init__(self, directory: Path, name: str, victim: Path, limit: float) -> None:
        self.stop_file = directory / ".stop"
        self.proc = subprocess.Popen(
            [PYTHON, "-c", SWAPPER, str(directory), name, str(victim), str(self.stop_file), str(limit)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            env={"PATH": "/usr/bin:/bin"},
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first == "ready\n", f"the swapper did not start: {first!r} {self.proc.stderr.read()!r}"

    def finish(self) -> int:
        """Stop the loop and return how many times it swapped a symlink over the socket."""
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return int(out.split()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _clear(path: Path) -> None:
    """Remove what the swapper left at the path (its symlink), so the next start races afresh."""
    if os.path.islink(path):
        assert os.lstat(path).st_uid == NOBODY, "the swapper's symlink must keep its owner"
        os.unlink(path)


def _one_start(path: Path) -> tuple[str, list[str]]:
    """Start a server against the swapper; return its outcome and what was wrong with it."""
    args = ["--socket", str(path), "--socket-mode", "0660", "--socket-group", SOCKET_GROUP]
    with ServerProcess(args, socket_path=str(path)) as server:

        def settled() -> str | None:
            if server.proc.poll() is not None:
                return "exited"
            if "Server listening on" in server.output:
                return "listening"
            return None

        state = wait_until(settled, timeout=30, what="the server to start or exit")
        if state == "exited":
            code = server.proc.returncode
            errors = [line for line in server.output.splitlines() if line.startswith("ERROR")]
            if code == 3 and len(errors) == 1 and "Traceback" not in server.output:
                return "refused: " + errors[0].removeprefix("ERROR ").replace(str(path), "PATH"), []
            return "failed badly", [f"exit {code}, {len(errors)} ERROR lines:\n{server.output}"]
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            problems = []
            if http_over_uds(str(path))[0] != 200 or stat.S_IMODE(st.st_mode) != 0o660:
                problems.append(f"the socket at the path does not serve as set up:\n{server.output}")
            if server.stop() != 0:
                problems.append(f"a clean stop did not exit 0:\n{server.output}")
            return "served", problems
        # The swapper replaced the finished socket after the server had checked it: nothing a
        # server can prevent in a directory others can write. It must have warned at start, and on
        # stop it must leave the replacement alone.
        wait_until(lambda: server.proc.poll() is not None, timeout=10, what="the server to stop itself")
        code = server.stop()
        problems = []
        if code != 3 or "was removed or replaced by another program" not in server.output:
            problems.append(f"exit {code}, no ERROR line about the lost socket:\n{server.output}")
        if "can be written by every user" not in server.output:
            problems.append(f"no warning about the world-writable directory:\n{server.output}")
        if f"Left {path} in place: it is no longer the socket this server created" not in server.output:
            problems.append(f"no line about the replaced socket at stop:\n{server.output}")
        return f"replaced after start, exit {code}", problems


@pytest.mark.slow
def test_symlink_swapped_in_during_start_never_gets_chmodded(arena: tuple[Path, Path]) -> None:
    shared, victim = arena
    path = shared / "s.sock"
    before = _fingerprint(victim)
    vault_before = _fingerprint(victim.parent)
    shared_before = _fingerprint(shared)
    outcomes: Counter[str] = Counter()
    breaches: list[str] = []
    problems: list[str] = []
    swapper = Swapper(shared, path.name, victim, limit=240)
    try:
        for start in range(STARTS):
            _clear(path)
            outcome, wrong = _one_start(path)
            outcomes[outcome] += 1
            problems += [f"start {start}: {text}" for text in wrong]
            now = _fingerprint(victim)
            if now != before:
                breaches.append(f"start {start}: victim mode {now[0]:o} uid {now[1]} gid {now[2]}")
                os.chown(victim, 0, 0)  # restore, so that every start is judged on its own
                os.chmod(victim, 0o600)
                before = _fingerprint(victim)
        swaps = swapper.finish()
    finally:
        swapper.kill()
    summary = f"{STARTS} starts, {swaps} swaps, {len(breaches)} changed the victim: {dict(outcomes)}"
    print(summary)
    assert not breaches, f"{summary}; {breaches}"
    assert not problems, f"{summary}; {len(problems)} problems, the first: {problems[0]}"
    assert swaps > 0, f"the swapper never caught a socket: the race was not run; {summary}"
    assert _fingerprint(victim.parent) == vault_before
    assert _fingerprint(shared)[:3] == shared_before[:3], "the shared directory's mode and owner stay"
    leftovers = [p.name for p in shared.iterdir() if p.name.startswith(f".{path.name}.")]
    assert not leftovers, f"private directories left behind: {leftovers}"


def test_many_binds_against_the_swapper_never_touch_the_victim(arena: tuple[Path, Path]) -> None:
    """The same race on ``bind_unix`` alone, in-process: thousands of tries in a few seconds."""
    import time

    from app.serving.private_dir import SocketError
    from app.serving.sockets import bind_unix

    shared, victim = arena
    path = shared / "s.sock"
    gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    before = _fingerprint(victim)
    outcomes: Counter[str] = Counter()
    breaches = 0
    swapper = Swapper(shared, path.name, victim, limit=120)
    try:
        deadline = time.monotonic() + 6
        tries = 0
        while tries < BINDS and time.monotonic() < deadline:
            tries += 1
            _clear(path)
            try:
                bound = bind_unix(str(path), 0o660, gid)
            except SocketError as exc:
                outcomes["refused: " + str(exc).replace(str(path), "PATH").split(";")[0]] += 1
            else:
                held = os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode)
                outcomes["bound" if held else "bound, then replaced"] += 1
                bound.close()
            if _fingerprint(victim) != before:
                breaches += 1
                os.chown(victim, 0, 0)
                os.chmod(victim, 0o600)
                before = _fingerprint(victim)
        swaps = swapper.finish()
    finally:
        swapper.kill()
    summary = f"{tries} binds, {swaps} swaps, {breaches} changed the victim: {dict(outcomes)}"
    print(summary)
    assert breaches == 0, summary
    assert swaps > tries // 10, f"the swapper hardly ran: {summary}"
    leftovers = [p.name for p in shared.iterdir() if p.name.startswith(f".{path.name}.")]
    assert not leftovers, f"private directories left behind: {leftovers}"


def test_swapper_can_write_the_directory(arena: tuple[Path, Path]) -> None:
    """The attack above is real: uid 65534 can rename its symlink over a socket of root's there."""
    import socket

    shared, victim = arena
    path = shared / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    try:
        code = (
            "import os, sys; os.symlink(sys.argv[2], sys.argv[1] + '.l'); "
            "os.rename(sys.argv[1] + '.l', sys.argv[1])"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(path), str(victim)],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert os.readlink(path) == str(victim)
    finally:
        sock.close()
