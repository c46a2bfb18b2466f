"""``uds-client proxy`` keeps callers apart: no group it cannot read, no key shared, no cookie.

Each test runs the real ``uds-server`` and the real proxy, with callers (and, where it matters, the
proxy itself) dropped to other uids with ``setpriv``, as the attacks that found these holes did.
The suite runs as root, as CI does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.cli.proxy.permissions import SocketAccess
from tests.client.test_proxy import _AS_CALLER, Proxy, http_request, raw_exchange
from tests.support import NOBODY, PYTHON, ROOT, http_over_uds, require_tool, running_server, short_tmpdir

OTHER_GID = 12345
"""A gid no account has: what the account database says of a process running with it is wrong."""
PROXY_UID = 4000
"""A uid with no account, for a proxy that does not run as root."""
SOCKET_GID = 4242
JSON_TYPE = {"Content-Type": "application/json"}

_SEND_DIRECT = """
import json, socket, sys
path, key, text, forwarded = sys.argv[1:]
body = json.dumps({"text": text}).encode()
head = (
    f"POST /messages HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Type: application/json\\r\\n"
    f"Idempotency-Key: {key}\\r\\nUds-Forwarded-Peer: {forwarded}\\r\\nContent-Length: {len(body)}\\r\\n"
    "Connection: close\\r\\n\\r\\n"
)
with socket.socket(socket.AF_UNIX) as sock:
    sock.connect(path)
    sock.sendall(head.encode() + body)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
status = int(answer.split(b" ", 2)[1])
print(json.dumps({"status": status, "body": json.loads(answer.partition(b"\\r\\n\\r\\n")[2])}))
"""


def setpriv(uid: int, gid: int, groups: list[int]) -> tuple[str, ...]:
    """The ``setpriv`` prefix that runs a command as ``uid``/``gid`` with exactly ``groups``."""
    supplementary = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return (require_tool("setpriv"), f"--reuid={uid}", f"--regid={gid}", supplementary, "--")


def run_as(uid: int, gid: int, groups: list[int], *args: str) -> subprocess.CompletedProcess[str]:
    """This Python with ``args``, as ``uid``/``gid``/``groups``, output captured."""
    return subprocess.run(
        [*setpriv(uid, gid, groups), PYTHON, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )


def call_as(
    uid: int,
    gid: int,
    groups: list[int],
    port: int,
    target: str,
    text: str,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``POST target`` with ``{"text": text}`` through the proxy as that user.

    Returns ``{"pid", "status", "body"}``.
    """
    body = json.dumps({"text": text})
    result = run_as(
        uid,
        gid,
        groups,
        "-c",
        _AS_CALLER,
        str(port),
        "POST",
        target,
        body,
        json.dumps({**JSON_TYPE, **(headers or {})}),
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests run processes as other uids and need root (CI runs them as root)")


@pytest.fixture
def searchable_dir(root_only: None) -> Iterator[Path]:
    """A short directory everyone may search, for a server's socket."""
    directory = short_tmpdir("pxi")
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Groups the proxy cannot read do not count


@pytest.mark.parametrize(
    ("mode", "allowed"),
    [(0o660, False), (0o666, True), (0o606, False), (0o066, True), (0o600, False), (0o006, False)],
)
def test_unknown_groups_admit_only_where_member_and_stranger_alike_would_be(
    root_only: None, mode: int, allowed: bool
) -> None:
    path = short_tmpdir("acu") / "s.sock"
    try:
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            path.chmod(mode)
            os.chown(path, 0, SOCKET_GID)
            path.parent.chmod(0o755)
            assert stat.S_IMODE(path.stat().st_mode) == mode
            access = SocketAccess(str(path))
            assert access.allows(NOBODY, None) is allowed
            assert access.allows(NOBODY, frozenset({NOBODY})) is bool(mode & 0o002)
            assert access.allows(NOBODY, frozenset({SOCKET_GID})) is bool(mode & 0o020)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


_UNDEFINED = 0xFFFFFFFF
_CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"


def set_acl(
    path: Path,
    user_obj: int,
    group_obj: int,
    other: int,
    mask: int,
    users: tuple[tuple[int, int], ...] = (),
    groups: tuple[tuple[int, int], ...] = (),
) -> None:
    """Give ``path`` a POSIX access ACL (what ``setfacl`` writes), entries in the kernel's order."""
    entries = [
        (1, user_obj, _UNDEFINED),
        *((2, perm, uid) for uid, perm in users),
        (4, group_obj, _UNDEFINED),
        *((8, perm, gid) for gid, perm in groups),
        (16, mask, _UNDEFINED),
        (32, other, _UNDEFINED),
    ]
    os.setxattr(
        path, "system.posix_acl_access", b"\2\0\0\0" + b"".join(struct.pack("=HHI", *e) for e in entries)
    )


# Each case: the socket's or its directory's ACL, and callers (uid, gid, supplementary groups).
_ACL_CASES: dict[str, tuple[str, dict[str, Any], list[tuple[int, int, list[int]]]]] = {
    # The mode's group bits show the mask (rw): the owning group itself gets nothing.
    "a named user widens the mask, not the owning group": (
        "socket",
        {"user_obj": 6, "users": ((4242, 6),), "group_obj": 0, "mask": 6, "other": 0},
        [(4343, SOCKET_GID, []), (4242, 4242, []), (4343, 4343, [])],
    ),
    "a named user gets less than the others": (
        "socket",
        {"user_obj": 6, "users": ((NOBODY, 0),), "group_obj": 6, "mask": 6, "other": 6},
        [(NOBODY, NOBODY, []), (4343, 4343, [])],
    ),
    "a named group": (
        "socket",
        {"user_obj": 6, "group_obj": 0, "groups": ((4343, 6),), "mask": 6, "other": 0},
        [(4343, 4343, []), (4344, 4344, [4343]), (NOBODY, NOBODY, []), (4345, SOCKET_GID, [])],
    ),
    "a directory a named user may not search": (
        "directory",
        {"user_obj": 7, "users": ((NOBODY, 0),), "group_obj": 5, "mask": 5, "other": 5},
        [(NOBODY, NOBODY, []), (4343, 4343, [])],
    ),
}


@pytest.mark.parametrize("case", list(_ACL_CASES))
def test_an_access_acl_is_read_as_the_kernel_reads_it(root_only: None, case: str) -> None:
    where, acl, callers = _ACL_CASES[case]
    directory = short_tmpdir("acl")
    path = directory / "s.sock"
    try:
        directory.chmod(0o755)
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            listener.listen(16)
            os.chown(path, 0, SOCKET_GID)
            path.chmod(0o666 if where == "directory" else 0o660)
            set_acl(directory if where == "directory" else path, **acl)
            access = SocketAccess(str(path))
            for uid, gid, groups in callers:
                kernel = run_as(uid, gid, groups, "-c", _CONNECT, str(path))
                assert kernel.returncode == 0 or "PermissionError" in kernel.stderr, kernel.stderr
                admitted = kernel.returncode == 0
                assert access.allows(uid, frozenset({gid, *groups})) is admitted, (uid, gid, groups, admitted)
                if access.allows(uid, None):  # unknown groups: never wider than the kernel
                    assert admitted, (uid, gid, groups)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_proxy_not_running_as_root_never_admits_by_a_group_the_caller_does_not_hold(
    searchable_dir: Path,
) -> None:
    # The socket's group is 65534, which the account database gives uid 65534; the caller runs
    # with gid 12345 and no supplementary groups, so the kernel refuses it.
    with running_server("--socket-mode", "660", "--socket-group", str(NOBODY), tmp=searchable_dir) as server:
        path = str(server.socket_path)
        direct = run_as(NOBODY, OTHER_GID, [], "-m", "client", "--socket", path, "send", "direct")
        assert direct.returncode == 3, direct.stderr
        assert "(permission denied)" in direct.stderr
        # The proxy runs as uid 4000 in group 65534: it may use the socket, and it cannot see the
        # processes of other uids, so it cannot read their groups.
        with Proxy(path, wrapper=setpriv(PROXY_UID, PROXY_UID, [NOBODY])) as proxy:
            proxy.wait_listening()
            answer = call_as(NOBODY, OTHER_GID, [], proxy.port, "/messages", "via the proxy")
            assert answer["status"] == 403, answer
            assert answer["body"]["message"].startswith(
                f"uid {NOBODY} may not connect to unix://{path} (mode 0660, owner 0, group {NOBODY}; "
                "groups unknown: its process is not visible to the proxy, so the group's bits do not "
                "count); open the URL with the token"
            )
            # The proxy's own uid and gid: it may read those processes' groups, and they count both
            # ways, as they do for the kernel.
            member = call_as(PROXY_UID, PROXY_UID, [NOBODY], proxy.port, "/messages", "in the group")
            assert member["status"] == 201, member
            assert member["body"]["peer"]["forwarded_for"] == {
                "uid": PROXY_UID,
                "gid": PROXY_UID,
                "pid": member["pid"],
            }
            stranger = call_as(PROXY_UID, PROXY_UID, [], proxy.port, "/messages", "not in the group")
            assert stranger["status"] == 403, stranger
            assert f"groups {PROXY_UID} of its process" in stranger["body"]["message"]
            assert proxy.stop() == 0
        status, listed = http_over_uds(path, "GET", "/messages")
        assert status == 200
        assert [m["text"] for m in json.loads(listed)["messages"]] == ["in the group"]


# ---------------------------------------------------------------------------------------------
# Idempotency keys belong to the caller behind the proxy


def test_idempotency_keys_through_the_proxy_belong_to_each_caller(searchable_dir: Path) -> None:
    with running_server(
        "--socket-mode", "660", "--socket-group", str(SOCKET_GID), tmp=searchable_dir
    ) as server:
        path = str(server.socket_path)
        first, second = (4242, SOCKET_GID, []), (4343, 4343, [SOCKET_GID])
        with Proxy(path) as proxy:
            proxy.wait_listening()

            def post(user: tuple[int, int, list[int]], key: str, text: str) -> dict[str, Any]:
                return call_as(*user, proxy.port, "/messages", text, {"Idempotency-Key": key})

            a = post(first, "k1", "from 4242")
            assert a["status"] == 201, a
            # Another caller of the same proxy, same key, another text: its own message, not a 409.
            b = post(second, "k1", "from 4343")
            assert b["status"] == 201, b
            assert b["body"]["id"] != a["body"]["id"]
            # Same key, same text: its own message, not 200 with the first caller's record.
            c = post(first, "k2", "same text")
            d = post(second, "k2", "same text")
            assert (c["status"], d["status"]) == (201, 201), (c, d)
            assert d["body"]["id"] != c["body"]["id"]
            assert d["body"]["peer"]["forwarded_for"]["uid"] == 4343
            # Each caller's retry still finds its own record.
            again = post(first, "k1", "from 4242")
            assert (again["status"], again["body"]["id"]) == (200, a["body"]["id"]), again
            again = post(second, "k2", "same text")
            assert (again["status"], again["body"]["id"]) == (200, d["body"]["id"]), again
            assert post(second, "k1", "a third text")["status"] == 409
            assert proxy.stop() == 0
        # A peer on the socket that names 4242 itself reaches only keys under its own uid.
        forged = run_as(
            4343, 4343, [SOCKET_GID], "-c", _SEND_DIRECT, path, "k1", "forged", "uid=4242 gid=4242 pid=1"
        )
        assert forged.returncode == 0, forged.stderr
        answer = json.loads(forged.stdout)
        assert answer["status"] == 201, answer
        assert answer["body"]["peer"]["uid"] == 4343
        assert answer["body"]["id"] not in (a["body"]["id"], b["body"]["id"])


# ---------------------------------------------------------------------------------------------
# The token is never a cookie


def test_the_docs_pages_send_the_header_the_proxy_reads() -> None:
    # The server's pages and the client's proxy name it apart (the client never imports app).
    from app.api.routes.docs import TOKEN_HEADER as SENT
    from client.cli.proxy.access import TOKEN_HEADER as READ

    assert SENT.lower().encode() == READ


def test_the_proxy_sets_no_cookie_and_a_cookie_with_the_token_admits_no_one(searchable_dir: Path) -> None:
    with running_server("--socket-mode", "600", tmp=searchable_dir) as server:
        path = str(server.socket_path)
        with Proxy(path, "--token-only") as proxy:
            proxy.wait_listening()
            for target in (
                f"/docs?token={proxy.token}",
                f"/messages?token={proxy.token}",
                "/docs",
                "/openapi.json",
            ):
                request = f"GET {target} HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode()
                status, headers, _ = raw_exchange(proxy.port, request)
                assert "set-cookie" not in headers, (target, status, headers)
            # Whatever name a cookie has, the token in one opens nothing (as a page on another
            # port of this host would receive it).
            for name in (f"uds-proxy-{proxy.port}", "uds-proxy", "token"):
                cookie = {"Cookie": f"{name}={proxy.token}"}
                assert http_request(proxy.port, "GET", "/messages", headers=cookie)[0] == 403
                answer = call_as(NOBODY, NOBODY, [], proxy.port, "/messages", "by cookie", cookie)
                assert answer["status"] == 403, answer
            assert proxy.stop() == 0
