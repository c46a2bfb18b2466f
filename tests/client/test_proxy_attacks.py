"""``uds-client proxy`` under attack by another local uid: its refusals cost it (almost) nothing.

The real proxy in a subprocess, in front of the small HTTP server of :mod:`tests.client.test_proxy`
(its socket is the test's, root's, so uid 65534 is refused by uid and root admitted); the attacker
runs as uid 65534 (``setpriv``). The suite runs as root, as CI does.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.client.test_proxy import Proxy, http_get, unix_server
from tests.client.test_proxy_isolation import setpriv
from tests.support import NOBODY, PYTHON

_HOLDER = """
import socket, sys
port, keep = int(sys.argv[1]), int(sys.argv[2])
head = b"GET /messages HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\n\\r\\n" % port
held = []
while True:
    try:
        sock = socket.create_connection(("127.0.0.1", port))
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


def _hold(port: int, keep: int, started: list[subprocess.Popen[str]]) -> None:
    """Run :data:`_HOLDER` as uid 65534 until the test ends; return once it holds ``keep`` connections."""
    proc = subprocess.Popen(
        [*setpriv(NOBODY, NOBODY, []), PYTHON, "-c", _HOLDER, str(port), str(keep)],
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
    """A refused connection gives up its place at once (before: 10 of 10 of root's requests got 503)."""
    with unix_server() as upstream, Proxy(upstream.path, "--max-connections", "32", "--quiet") as proxy:
        proxy.wait_listening()
        _hold(proxy.port, 64, holder)
        statuses = [http_get(proxy.port, "/healthz")[0] for _ in range(20)]
        assert holder[0].poll() is None  # still attacking
        assert statuses.count(200) >= 18, statuses
        assert proxy.stop() == 0
    assert upstream.seen.count("GET /healthz") == statuses.count(200)
    assert "GET /messages" not in upstream.seen
