"""The policy's surfaces attacked on a real server: what a caller without scopes can make it spend.

CI runs as root and drops to other uids (``setpriv``-like, through ``subprocess``) for the callers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from app.api.audit import DENY_BURST
from tests.app.test_policy_server import POLICY, STRANGER, _audit, _server
from tests.app.test_policy_server import tmp as tmp
from tests.support import PYTHON, ROOT, ServerProcess, python_as_nobody, wait_until

_FLOOD = """
import socket, sys
path, count = sys.argv[1], int(sys.argv[2])
request = b"POST /v1/messages HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Length: 0\\r\\n\\r\\n"
refused = 0
for _ in range(count):
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        conn.sendall(request)
        refused += conn.recv(64).startswith(b"HTTP/1.1 403 ")
print(refused)
"""

REFUSALS = 3000


def test_a_flood_of_refusals_cannot_fill_the_disk_through_the_audit_log(tmp: Path) -> None:
    """Past the burst, refusals are counted by uid (one line a second), not written one by one;
    the counts add up to every refusal."""
    log = tmp / "audit.log"
    with _server(tmp, POLICY, "--store", "memory", "--audit-log", str(log)) as server:
        server.wait_ready()
        flood = python_as_nobody("-c", _FLOOD, str(tmp / "s.sock"), str(REFUSALS), uid=STRANGER, gid=STRANGER)
        assert flood.returncode == 0, flood.stderr
        assert int(flood.stdout) == REFUSALS
        assert server.stop() == 0, server.output
    records = _audit(log)
    itemized = [r for r in records if r.get("decision") == "deny"]
    counted = [r for r in records if r.get("event") == "denied"]
    assert {r["uid"] for r in itemized} == {STRANGER}
    # The burst, plus one a second for however long the flood took (generously: a minute).
    assert DENY_BURST <= len(itemized) <= DENY_BURST + 60
    assert counted, records[-3:]
    assert all(set(r["by_uid"]) == {str(STRANGER)} for r in counted)
    assert len(itemized) + sum(r["requests"] for r in counted) == REFUSALS
    assert log.stat().st_size < 64 * 1024, "about 150 bytes a refusal before"


def test_refusals_past_the_budget_are_counted_under_a_bounded_set_of_uids(tmp_path: Path) -> None:
    from app.api.audit import MAX_DENY_UIDS, AuditLog

    log = tmp_path / "audit.log"
    audit = AuditLog(str(log))
    for uid in range(DENY_BURST + 10 * MAX_DENY_UIDS):
        audit.deny(
            {"time": 1e9, "uid": uid, "gid": uid, "pid": 1, "route": "/v1/messages", "decision": "deny"}
        )
    audit.close()
    records = _audit(log)
    [counted] = [r for r in records if r.get("event") == "denied"]
    assert len(counted["by_uid"]) == MAX_DENY_UIDS + 1
    assert counted["by_uid"]["other"] == 9 * MAX_DENY_UIDS
    assert len(records) - 1 + counted["requests"] == DENY_BURST + 10 * MAX_DENY_UIDS


def test_whoami_with_a_forged_header_does_not_show_a_stranger_the_rules(tmp: Path) -> None:
    """Anyone may send Uds-Forwarded-Peer: naming the writer must not list the writer's scopes."""
    from tests.app.test_policy_server import WRITER, calls_as

    with _server(tmp, POLICY, "--store", "memory") as server:
        server.wait_ready()
        forged = f"uid={WRITER} gid={WRITER} pid=1"
        script = (
            "import sys\nfrom tests.support import http_over_uds\n"
            "named = {'Uds-Forwarded-Peer': sys.argv[2]}\n"
            "print(http_over_uds(sys.argv[1], 'GET', '/v1/whoami', headers=named)[1].decode())"
        )
        shown = python_as_nobody("-c", script, str(tmp / "s.sock"), forged, uid=STRANGER, gid=STRANGER)
        assert shown.returncode == 0, shown.stderr
        me = json.loads(shown.stdout)
        assert me["uid"] == STRANGER
        assert me["scopes"] == []
        assert me["forwarded_for"] == {"uid": WRITER, "gid": WRITER, "pid": 1, "scopes": []}
        # The writer itself still sees its own scopes.
        [(status, body)] = calls_as(WRITER, str(tmp / "s.sock"), ("GET", "/v1/whoami", ""))
        assert (status, json.loads(body)["scopes"]) == (200, ["read", "write"])


@pytest.mark.parametrize("flag", ["--policy", "--audit-log"])
def test_a_file_name_with_control_characters_cannot_forge_or_paint_the_error_line(flag: str) -> None:
    name = "/nonexistent/p\n\x1b[31mError: all good\r"
    started = subprocess.run(
        [PYTHON, "-m", "app", "--socket", "/nonexistent/s.sock", flag, name],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2, started.stderr
    [line] = started.stderr.splitlines()
    assert line.isprintable(), line
    assert "\\n\\x1b[31mError: all good\\r" in line


def test_a_reload_names_a_policy_path_with_control_characters_escaped(tmp: Path) -> None:
    odd = tmp / "a\nb\x1b[2J"
    odd.mkdir()
    rules = odd / "policy.toml"
    rules.write_text(POLICY)
    sock = str(tmp / "s.sock")
    with ServerProcess(
        ["--socket", sock, "--store", "memory", "--policy", str(rules)], socket_path=sock
    ) as server:
        server.wait_ready()
        server.signal(signal.SIGHUP)
        wait_until(lambda: "Policy reloaded from" in server.output, timeout=5)
        rules.write_text("[[rule]\n")
        server.signal(signal.SIGHUP)
        wait_until(lambda: "Policy not reloaded" in server.output, timeout=5)
        assert server.stop() == 0
    lines = [line for line in server.output.splitlines() if "Policy" in line]
    assert len(lines) == 2, server.output
    assert all("a\\nb\\x1b[2J/policy.toml" in line and line.isprintable() for line in lines), lines


def test_a_reload_that_meets_the_file_truncated_mid_write_keeps_the_rules(tmp: Path) -> None:
    """An editor truncates, then writes: a SIGHUP in between read an empty file, a valid policy of
    no rules, and locked every caller out."""
    from tests.app.test_policy_server import READER, calls_as

    with _server(tmp, POLICY, "--store", "memory") as server:
        server.wait_ready()
        (tmp / "policy.toml").write_bytes(b"")
        server.signal(signal.SIGHUP)
        line = wait_until(lambda: re.search(r".*Policy not reloaded.*", server.output), timeout=5)
        assert "empty; to grant nothing, write a comment line" in line.group(0)
        assert [
            status for status, _ in calls_as(READER, str(tmp / "s.sock"), ("GET", "/v1/messages", ""))
        ] == [200]
        assert server.stop() == 0


def test_an_audit_log_that_is_a_hard_link_to_another_file_is_refused(tmp: Path) -> None:
    """Where hard links are not protected, whoever can write in the log's directory can link a
    file the server owns there (its database); the server appended JSON lines to it."""
    database = tmp / "messages.db"
    database.write_bytes(b"SQLite format 3\x00")
    database.chmod(0o600)
    os.link(database, tmp / "audit.log")
    started = subprocess.run(
        [PYTHON, "-m", "app", "--socket", str(tmp / "s.sock"), "--audit-log", str(tmp / "audit.log")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2, started.stderr
    assert (
        started.stderr.strip()
        == f"Error: audit log {tmp / 'audit.log'}: has 2 hard links; give a file of its own"
    )
    assert database.read_bytes() == b"SQLite format 3\x00"


def test_a_policy_file_its_group_may_write_is_refused_unless_the_group_is_root(
    tmp: Path,
) -> None:
    """A member of that group (here the stranger's) could grant itself every scope and wait for
    the next SIGHUP."""
    rules = tmp / "policy.toml"
    rules.write_text(POLICY)
    os.chown(rules, 0, STRANGER)
    rules.chmod(0o664)
    args = [PYTHON, "-m", "app", "--socket", str(tmp / "s.sock"), "--store", "memory", "--policy", str(rules)]
    started = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert started.returncode == 2, started.stderr
    assert started.stderr.strip() == (
        f"Error: policy file {rules}: writable by group {STRANGER} (mode 0664); "
        "its members could change the rules: chmod g-w it"
    )
    os.chown(rules, 0, 0)  # root's group may write it
    with ServerProcess(args[3:], socket_path=str(tmp / "s.sock")) as server:
        server.wait_ready()
        assert server.stop() == 0


def test_standard_error_stays_the_audit_target_after_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server closes its audit log when it stops; a line noted after that (a request cancelled
    by the drain's deadline) must not create a file named ``-`` in the working directory."""
    from app.api.audit import AuditLog

    monkeypatch.chdir(tmp_path)
    audit = AuditLog("-")
    audit.close()
    audit.note(
        {"time": 1e9, "uid": 1, "method": "POST", "route": "/v1/messages", "status": 201, "message_id": 1}
    )
    audit.flush()
    assert not (tmp_path / "-").exists()


def test_the_refusal_log_line_of_a_huge_path_is_short(tmp: Path) -> None:
    """One line per 10 s gets out for a flood of refusals; a peer chose its path, up to 32 KiB of
    head, and each escaped byte took 4 characters: 40 KB a line before, 300 MB a day."""
    script = (
        "import sys\nfrom tests.support import http_over_uds\n"
        "print(http_over_uds(sys.argv[1], 'POST', '/v1/' + '%1b' * 10000, b'')[0])"
    )
    with _server(tmp, POLICY, "--store", "memory") as server:
        server.wait_ready()
        refused = python_as_nobody("-c", script, str(tmp / "s.sock"), uid=STRANGER, gid=STRANGER)
        assert refused.stdout.strip() == "403", refused.stderr
        line = wait_until(lambda: re.search(r".*Refused POST.*", server.output), timeout=5).group(0)
        assert server.stop() == 0
    assert len(line) < 1500, len(line)
    assert "/v1/\\x1b\\x1b" in line
    assert "\x1b" not in line
