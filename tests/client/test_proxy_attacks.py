"""``uds-client proxy`` under attack by another local uid: its refusals cost it (almost) nothing.

The real proxy in a subprocess, in front of the small HTTP server of :mod:`tests.client.test_proxy`
(its socket is the test's, root's, so uid 65534 is refused by uid and root admitted); the attacker
runs as uid 65534 (``setpriv``). The suite runs as root, as CI does.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli.proxy.permissions import SocketAccess
from tests.client.test_proxy import Proxy, http_get, http_request, raw_exchange, socket_file, unix_server
from tests.client.test_proxy_isolation import OTHER_GID, SOCKET_GID, set_acl, setpriv
from tests.support import NOBODY, PYTHON

__all__ = ["socket_file"]  # a fixture, used by name

_HOLDER = """
import os, resource, socket, sys
port, keep, send, ballast = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "head", sys.argv[4]
if ballast == "ballast":
    # Many open files make each lookup of this process's sockets slow (the proxy reads its fds,
    # the highest first).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    null = os.open("/dev/null", os.O_RDONLY)
    for fd in range(min(hard, 4096) - 1, keep + 64, -1):
        os.dup2(null, fd)
head = b"GET /messages HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\n\\r\\n" % port
held = []
while True:
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        if send:
            sock.sendall(head)  # a whole request, refused; its answer is never read, it never closes
    except OSError:
        continue
    held.append(sock)
    if len(held) > keep:
        held.pop(0).close()
    if len(held) == keep:
        print("holding", flush=True)
"""


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen[str]]]:
    """Started attacker processes, killed after the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _hold(port: int, keep: int, send: str, started: list[subprocess.Popen[str]], ballast: str = "no") -> None:
    """Run :data:`_HOLDER` as uid 65534 until the test ends; return once it holds ``keep`` connections
    (``send`` is ``head``: each sends a whole request; ``nothing``: none sends a byte; ``ballast``
    is ``ballast``: it holds 4,000 open files)."""
    proc = subprocess.Popen(
        [*setpriv(NOBODY, NOBODY, []), PYTHON, "-c", _HOLDER, str(port), str(keep), send, ballast],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    started.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "holding\n", proc.poll()


def test_refused_requests_that_are_never_read_do_not_hold_the_proxys_connections(
    holder: list[subprocess.Popen[str]],
) -> None:
    """A refused connection gives up its place at once (before: 1 of 20 of root's requests answered),
    and one uid's connections awaiting their lookup yield to another uid's newcomer once they hold
    over half the places (the attacker's 4,000 open files make each lookup slow; before: 1 or 16
    of 20 answered, from run to run)."""
    with unix_server() as upstream, Proxy(upstream.path, "--max-connections", "32", "--quiet") as proxy:
        proxy.wait_listening()
        _hold(proxy.port, 64, "head", holder, "ballast")
        statuses = [http_get(proxy.port, "/healthz")[0] for _ in range(20)]
        assert all(proc.poll() is None for proc in holder)  # still attacking
        assert statuses.count(200) >= 18, statuses
        assert proxy.stop() == 0
    assert upstream.seen.count("GET /healthz") == statuses.count(200)
    assert "GET /messages" not in upstream.seen


def test_a_flood_of_silent_connections_does_not_lock_out_a_request(
    holder: list[subprocess.Popen[str]],
) -> None:
    """uid 65534 opening connections faster than one a second per place, none sending a byte: once
    they fill half the places, a newcomer closes the oldest, whatever its age (before: 20 of 20
    of root's requests got 503 while it ran)."""
    with unix_server() as upstream, Proxy(upstream.path, "--max-connections", "32", "--quiet") as proxy:
        proxy.wait_listening()
        _hold(proxy.port, 64, "nothing", holder)
        statuses = [http_get(proxy.port, "/healthz")[0] for _ in range(20)]
        assert holder[0].poll() is None  # still attacking
        assert statuses.count(200) >= 18, statuses
        assert proxy.stop() == 0
    assert upstream.seen.count("GET /healthz") == statuses.count(200)


def test_silent_connections_and_refused_requests_together_do_not_lock_out_a_request(
    holder: list[subprocess.Popen[str]],
) -> None:
    """Both floods at once: the silent connections cost no lookup of their caller, so the refused
    requests' lookups are not queued behind theirs (before: 10 of 20 of root's requests got 503
    with the default cap, the rest waited for lookups of connections long closed)."""
    with unix_server() as upstream, Proxy(upstream.path, "--quiet") as proxy:
        proxy.wait_listening()
        _hold(proxy.port, 600, "nothing", holder)
        _hold(proxy.port, 400, "head", holder)
        statuses = [http_get(proxy.port, "/healthz")[0] for _ in range(20)]
        assert all(proc.poll() is None for proc in holder)  # still attacking
        assert statuses.count(200) >= 18, statuses
        assert proxy.stop() == 0
    assert upstream.seen.count("GET /healthz") == statuses.count(200)


_REFUSED = """
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
for _ in range(count):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /messages HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\n\\r\\n" % port)
        while sock.recv(65536):
            pass
"""


def test_refusals_are_logged_once_per_period_and_caller_with_a_count() -> None:
    """300 refused requests from uid 65534: its first refusal at once, the others in a line per
    period with their count (before: 300 lines of 261 bytes; one peer wrote about 480 KB/s to the log)."""
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        started = time.monotonic()
        attack = subprocess.run(
            [*setpriv(NOBODY, NOBODY, []), PYTHON, "-c", _REFUSED, str(proxy.port), "300"],
            capture_output=True,
            text=True,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            timeout=120,
            check=False,
        )
        assert attack.returncode == 0, attack.stderr
        assert http_get(proxy.port, "/healthz")[0] == 200  # root is admitted, and logged as before
        assert proxy.stop() == 0
        periods = int((time.monotonic() - started) // 10) + 1
    lines = [line for line in proxy.output.splitlines() if "refused" in line]
    assert re.fullmatch(
        rf"proxy #1 127\.0\.0\.1:\d+ \(uid={NOBODY} gid=-1 pid=0\): refused 403 GET /messages: "
        rf"uid {NOBODY} may not connect to .*",
        lines[0],
    ), lines[0]
    # The others: the last of each period, with how many more it stands for.
    summary = re.compile(
        rf"proxy #\d+ 127\.0\.0\.1:\d+ \(uid={NOBODY} gid=-1 pid=0\): refused 403 GET /messages: "
        rf".*?(?: \(and (\d+) more like it in the last \d+s\))?"
    )
    counted = [int(found.group(1) or 0) for line in lines[1:] if (found := summary.fullmatch(line))]
    assert len(counted) == len(lines) - 1, lines
    # One line per period after the first (and one when the proxy stops), and every refusal is counted.
    assert 2 <= len(lines) <= periods + 2, lines
    assert len(lines) + sum(counted) == 300, lines
    assert "GET /healthz -> " in proxy.output
    assert upstream.seen == ["GET /healthz"]


def test_the_token_in_the_url_is_found_and_removed_however_it_is_spelled() -> None:
    """``%74oken=`` is ``token=`` to the docs page (URLSearchParams decodes names): the proxy reads it
    the same way and removes it; the other parameters reach the socket byte for byte (before: a
    ``%74oken=`` token was refused, and through the uid check it reached the socket, a ``307``'s
    ``Location`` and the proxy's log; ``a=%FF`` arrived as ``a=%EF%BF%BD``, ``c`` as ``c=``)."""
    with unix_server() as upstream, Proxy(upstream.path, "--token-only") as proxy:
        proxy.wait_listening()
        token = proxy.token
        for target, seen in (
            (f"/headers?a=%FF&%74oken={token}&b=x+y&c", "/headers?a=%FF&b=x+y&c"),
            (f"/headers?tok%65n={token}&d=%2F%20", "/headers?d=%2F%20"),
            (f"/headers?token={token}&token={token}", "/headers"),
            (f"/headers?x=1&%74%6F%6B%65%6E={token}", "/headers?x=1"),
        ):
            status, _, body = http_request(proxy.port, "GET", target)
            assert status == 200, (target, body)
            assert body["head"][0] == f"GET {seen} HTTP/1.1"
        # A wrong token in any spelling is refused.
        assert http_request(proxy.port, "GET", "/headers?%74oken=wrong")[0] == 403
        assert proxy.stop() == 0
    assert token not in "".join(upstream.seen)
    assert proxy.output.count(token) == 1  # the Docs: line


_BALLAST_REFUSED = """
import os, resource, socket, sys
port, count, ballast = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if ballast:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    null = os.open("/dev/null", os.O_RDONLY)
    for fd in range(min(hard, ballast) - 1, 64, -1):
        os.dup2(null, fd)
for _ in range(count):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /messages HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\n\\r\\n" % port)
        while sock.recv(65536):
            pass
"""


def _refusal_costs(proxy: Proxy, ballasts: tuple[int, ...]) -> dict[int, float]:
    """The proxy's CPU seconds for 100 refused requests by uid 65534 holding each count of open files."""
    import psutil

    process = psutil.Process(proxy.proc.pid)
    cost = {}
    for ballast in ballasts:
        before = sum(process.cpu_times()[:2])
        attack = subprocess.run(
            [
                *setpriv(NOBODY, NOBODY, []),
                PYTHON,
                "-c",
                _BALLAST_REFUSED,
                str(proxy.port),
                "100",
                str(ballast),
            ],
            capture_output=True,
            text=True,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            timeout=300,
            check=False,
        )
        assert attack.returncode == 0, attack.stderr
        cost[ballast] = sum(process.cpu_times()[:2]) - before
    return cost


def test_a_caller_no_group_would_admit_costs_no_scan_of_its_open_files() -> None:
    """uid 65534 holding 16,000 open files, on a socket no group's bits open (0755): its refusals
    cost the proxy about what anyone's do (before: 52.8 ms of the proxy's CPU each against 0.55 ms,
    as the proxy read every one of its file descriptors looking for the socket's process)."""
    with unix_server() as upstream, Proxy(upstream.path, "--quiet") as proxy:
        proxy.wait_listening()
        cost = _refusal_costs(proxy, (0, 16000))
        assert proxy.stop() == 0
    assert cost[16000] < 4 * cost[0] + 0.05, cost
    assert upstream.seen == []


_MEMBER_GET = """
import os, resource, socket, sys
port, ballast = int(sys.argv[1]), int(sys.argv[2])
if ballast:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    null = os.open("/dev/null", os.O_RDONLY)
    for fd in range(min(hard, ballast) - 1, 64, -1):
        os.dup2(null, fd)
with socket.create_connection(("127.0.0.1", port)) as sock:
    sock.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\nConnection: close\\r\\n\\r\\n" % port)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
print(answer.split(b" ", 2)[1].decode())
"""


def test_a_caller_holding_over_1024_open_files_costs_no_scan_of_them() -> None:
    """uid 65534 holding 16,000 open files, on a 0660 socket whose group could admit it: the proxy
    does not search a process holding over 1,024 open files (its groups count as unknown), so its
    refusals cost a few times what anyone's do, the rest of the processes being still searched
    (before: 39.8 ms of the proxy's CPU each against 0.5 ms, reading all 16,000 descriptors; after:
    2.3 ms). A member of the group with few files is admitted; with 16,000, refused (fail closed)."""
    with unix_server() as upstream:
        os.chown(upstream.path, 0, SOCKET_GID)
        os.chmod(upstream.path, 0o660)
        os.chmod(os.path.dirname(upstream.path), 0o755)
        assert SocketAccess(upstream.path).may_ever(NOBODY)  # the earlier skip does not apply
        with Proxy(upstream.path, "--quiet") as proxy:
            proxy.wait_listening()
            cost = _refusal_costs(proxy, (0, 16000))
            member = {}
            for ballast in (0, 16000):
                answer = subprocess.run(
                    [
                        *setpriv(4343, 4343, [SOCKET_GID]),
                        PYTHON,
                        "-c",
                        _MEMBER_GET,
                        str(proxy.port),
                        str(ballast),
                    ],
                    capture_output=True,
                    text=True,
                    cwd="/",
                    env={"PATH": "/usr/bin:/bin"},
                    timeout=60,
                    check=False,
                )
                assert answer.returncode == 0, answer.stderr
                member[ballast] = answer.stdout.strip()
            assert proxy.stop() == 0
    assert cost[16000] < 10 * cost[0] + 0.1, cost  # before: 80 times
    assert member == {0: "200", 16000: "403"}, member
    assert upstream.seen == ["GET /healthz"]


def test_may_ever_is_true_wherever_some_groups_are_let_in(socket_file: Path) -> None:
    """The skip never refuses a caller that its real groups would admit: over every mode of the
    socket and of its directory (group and others' bits), ``may_ever`` is True exactly where
    some set of the groups involved passes :meth:`SocketAccess.allows`, and with a named-group
    ACL too."""
    access = SocketAccess(str(socket_file))
    os.chown(socket_file, 0, SOCKET_GID)
    os.chown(socket_file.parent, 0, 0)
    candidates = [frozenset(g) for g in ((), (SOCKET_GID,), (0,), (0, SOCKET_GID), (OTHER_GID,))]
    for mode in range(0o100):  # the group and others bits (uid 65534 owns nothing)
        for dir_mode in (0o700, 0o710, 0o701, 0o711):
            os.chmod(socket_file, mode)
            os.chmod(socket_file.parent, dir_mode)
            some = any(access.allows(NOBODY, groups) for groups in candidates)
            assert access.may_ever(NOBODY) is some, (oct(mode), oct(dir_mode))
    os.chmod(socket_file.parent, 0o755)
    os.chmod(socket_file, 0o600)
    set_acl(socket_file, user_obj=6, group_obj=0, other=0, mask=6, groups=((OTHER_GID, 6),))
    assert access.allows(NOBODY, frozenset({OTHER_GID}))
    assert access.may_ever(NOBODY)
    set_acl(socket_file, user_obj=6, group_obj=0, other=0, mask=4, groups=((OTHER_GID, 6),))
    assert not access.allows(NOBODY, frozenset({OTHER_GID}))  # the mask takes write away
    assert not access.may_ever(NOBODY)


def test_the_token_stays_out_of_the_log_in_a_request_line_h11_rejects() -> None:
    """h11 quotes a bad request line in its error; the proxy logs it with the token hidden (before:
    the token went into the log line, and into the period's summary line)."""
    with unix_server() as upstream, Proxy(upstream.path, "--token-only") as proxy:
        proxy.wait_listening()
        data = f"GET /headers?token={proxy.token} x HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode()
        for _ in range(2):
            status, _, body = raw_exchange(proxy.port, data)
            assert status == 400, body
            assert proxy.token not in body.decode()
        assert proxy.stop() == 0
    assert proxy.output.count(proxy.token) == 1, proxy.output  # the Docs: line
    assert "illegal request line" in proxy.output
    assert upstream.seen == []
