"""The policy, its reload and the audit log on a real server, called by real uids (CI runs as root
and drops to other uids for the callers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app.test_durable_disk import fill
from tests.support import (
    PYTHON,
    ROOT,
    ServerProcess,
    http_over_uds,
    python_as_nobody,
    running_server,
    short_tmpdir,
    small_tmpfs,
    wait_until,
)

WRITER, READER, STRANGER, WATCHER_GROUP = 10001, 10002, 10003, 10010
JSON_TYPE = {"Content-Type": "application/json"}
POLICY = f"""
[[rule]]
uid = {WRITER}
allow = ["read", "write"]

[[rule]]
uid = {READER}
allow = ["read"]

[[rule]]
gid = {WATCHER_GROUP}   # a supplementary group: read from the socket (SO_PEERGROUPS)
allow = ["metrics"]

[[rule]]
uid = 0                 # the test itself reads what was stored
allow = ["read"]
"""

_CALLS = """
import json, sys
from tests.support import http_over_uds
path, calls = sys.argv[1], json.loads(sys.argv[2])
out = []
for method, target, body in calls:
    headers = {"Content-Type": "application/json"} if body else {}
    status, data = http_over_uds(path, method, target, body.encode() if body else None, headers)
    out.append([status, data.decode("utf-8", "replace")])
print(json.dumps(out))
"""


@pytest.fixture
def tmp() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("these tests call the server as other uids and need root (CI runs them as root)")
    directory = short_tmpdir("pol")
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def calls_as(uid: int, path: str, *calls: tuple[str, str, str], groups: list[int] | None = None) -> list[Any]:
    """Make ``calls`` (method, target, body) over the socket as ``uid``: ``[[status, body], ...]``."""
    result = python_as_nobody("-c", _CALLS, path, json.dumps(calls), uid=uid, gid=uid, extra_groups=groups)
    assert result.returncode == 0, result.stderr
    answers: list[Any] = json.loads(result.stdout)
    return answers


def _write(path: Path, text: str) -> None:
    """Replace ``path`` whole, as a ConfigMap update does (a new file, then a rename)."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    fresh.chmod(0o644)
    os.replace(fresh, path)


def _server(tmp: Path, policy: str, *extra: str) -> ServerProcess:
    rules = tmp / "policy.toml"
    _write(rules, policy)
    sock = str(tmp / "s.sock")
    args = ["--socket", sock, "--socket-mode", "666", "--policy", str(rules), *extra]
    return ServerProcess(args, socket_path=sock)


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


POST = ("POST", "/v1/messages", '{"text": "hello"}')


def test_reader_writer_stranger_and_everyone_gets_the_probes(tmp: Path) -> None:
    with _server(tmp, POLICY, "--store", "memory") as server:
        server.wait_ready()
        path = str(tmp / "s.sock")
        probes = [("GET", "/healthz", ""), ("GET", "/readyz", ""), ("GET", "/_ping", "")]
        writer = calls_as(WRITER, path, POST, ("GET", "/v1/messages", ""), ("GET", "/metrics", ""), *probes)
        assert [status for status, _ in writer] == [201, 200, 403, 200, 200, 200]
        reader = calls_as(READER, path, ("GET", "/v1/messages", ""), POST, ("GET", "/v1/events", ""), *probes)
        assert [status for status, _ in reader] == [200, 403, 403, 200, 200, 200]
        assert "'write' scope" in json.loads(reader[1][1])["message"]
        assert "'events' scope" in json.loads(reader[2][1])["message"]
        stranger = calls_as(STRANGER, path, ("GET", "/v1/messages", ""), POST, ("GET", "/docs", ""), *probes)
        assert [status for status, _ in stranger] == [403, 403, 403, 200, 200, 200]
        assert all(str(WRITER) not in body for _, body in stranger)  # the rules stay unsaid
        # A stranger in the watchers' group (supplementary, as the kernel reports it) scrapes metrics.
        watcher = calls_as(
            STRANGER, path, ("GET", "/metrics", ""), ("GET", "/v1/whoami", ""), groups=[WATCHER_GROUP]
        )
        assert watcher[0][0] == 200
        me = json.loads(watcher[1][1])
        assert (me["uid"], me["groups"], me["scopes"]) == (STRANGER, [WATCHER_GROUP], ["metrics"])
        _, body = http_over_uds(path, "GET", "/v1/messages")
        assert [m["text"] for m in json.loads(body)["messages"]] == ["hello"]  # the writer's alone


def test_an_encoded_path_is_judged_as_the_route_it_reaches(tmp: Path) -> None:
    with _server(tmp, POLICY, "--store", "memory") as server:
        server.wait_ready()
        path = str(tmp / "s.sock")
        body = '{"text": "encoded"}'
        forms = ["/v1%2fmessages", "/v1%2Fmessages", "/%761/messages", "/%6dessages"]
        reader = calls_as(
            READER, path, *(("POST", form, body) for form in forms), ("GET", "/v1%2fwhoami", "")
        )
        assert [status for status, _ in reader] == [403, 403, 403, 403, 200]
        writer = calls_as(WRITER, path, *(("POST", form, body) for form in forms))
        assert [status for status, _ in writer] == [201, 201, 201, 201]
        stranger = calls_as(STRANGER, path, ("GET", "/%68ealthz", ""), ("GET", "/v1%2fevents", ""))
        assert [status for status, _ in stranger] == [200, 403]
        _, listed = http_over_uds(path, "GET", "/v1/messages")
        assert len(json.loads(listed)["messages"]) == 4


def test_bad_policy_at_start_is_one_line_and_exit_2(tmp: Path) -> None:
    sock = str(tmp / "s.sock")
    cases = {
        '[[rule]]\nuid = 1\nallow = ["read"]\n\n[[rule]]\nuid = 2\nallow = ["red"]\n': (
            r"line 5 \(rule 2\): unknown scope 'red'"
        ),
        '[[rule]]\nallow = ["read"]\n': r"line 1 \(rule 1\): no selector",
        '[[rule]]\nuser = "no-such-user-x"\nallow = ["read"]\n': r"no user named 'no-such-user-x'",
        "[[rule]\n": r"line 1: ",
    }
    for text, pattern in cases.items():
        _write(tmp / "policy.toml", text)
        result = subprocess.run(
            [PYTHON, "-m", "app", "--socket", sock, "--policy", str(tmp / "policy.toml")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"Error: policy file {tmp / 'policy.toml'}"), lines[0]
        assert re.search(pattern, lines[0]), lines[0]
        assert not os.path.exists(sock)
    missing = subprocess.run(
        [PYTHON, "-m", "app", "--socket", sock],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
        env={**os.environ, "UDS_POLICY": str(tmp / "nope.toml")},
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == f"Error: policy file {tmp / 'nope.toml'}: cannot read it (No such file or directory)"
    )
    (tmp / "planted.log").symlink_to("/etc/passwd")
    planted = subprocess.run(
        [PYTHON, "-m", "app", "--socket", sock, "--audit-log", str(tmp / "planted.log")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert planted.returncode == 2
    assert (
        planted.stderr.strip()
        == f"Error: audit log {tmp / 'planted.log'}: is a symbolic link; give the file itself"
    )


def test_a_broken_file_on_sighup_keeps_the_rules_in_force(tmp: Path) -> None:
    with _server(tmp, POLICY, "--store", "memory") as server:
        server.wait_ready()
        path = str(tmp / "s.sock")
        _write(
            tmp / "policy.toml", f'[[rule]]\nuid = {READER}\nallow = ["read", "write"]\n[[rule]]\nuid = x\n'
        )
        server.signal(signal.SIGHUP)
        line = wait_until(
            lambda: re.search(r".*Policy not reloaded.*", server.output), timeout=5, what="the refusal line"
        )
        assert "the rules in force stay" in line.group(0)
        assert f"policy file {tmp / 'policy.toml'}, line 5: Invalid value" in line.group(0)
        assert [s for s, _ in calls_as(READER, path, POST)] == [403]
        assert [s for s, _ in calls_as(WRITER, path, POST)] == [201]
        _write(tmp / "policy.toml", f'[[rule]]\nuid = {READER}\nallow = ["read", "write"]\n')
        server.signal(signal.SIGHUP)
        reloaded = wait_until(
            lambda: re.search(
                r"Policy reloaded from \S+ in pid \d+: 1 rule\(s\), sha256 [0-9a-f]{12}", server.output
            ),
            timeout=5,
        )
        assert reloaded
        assert [s for s, _ in calls_as(READER, path, POST)] == [201]
        assert [s for s, _ in calls_as(WRITER, path, POST)] == [403]
        assert server.proc.poll() is None


_LOAD = """
import http.client, json, os, socket, sys, time
path, stop = sys.argv[1], sys.argv[2]

class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)

records, conn, used = [], None, 0
while not os.path.exists(stop):
    if conn is None:
        conn, used = Conn("localhost"), 0
    began = time.monotonic()
    try:
        headers = {"Content-Type": "application/json"}
        conn.request("POST", "/v1/messages", body=b'{"text": "load"}', headers=headers)
        response = conn.getresponse()
        response.read()
        status = response.status
    except Exception as exc:
        status = repr(exc)
    records.append((began, status))
    used += 1
    if status != 201 or used >= 10:  # a 403 closes the connection; others change every 10 requests
        conn.close()
        conn = None
print(json.dumps(records))
"""


def test_reload_under_load_applies_within_a_second_in_every_worker(tmp: Path) -> None:
    before = (
        f'[[rule]]\nuid = {WRITER}\nallow = ["read", "write"]\n[[rule]]\nuid = {READER}\nallow = ["read"]\n'
    )
    after = (
        f'[[rule]]\nuid = {WRITER}\nallow = ["read"]\n[[rule]]\nuid = {READER}\nallow = ["read", "write"]\n'
    )
    before += '[[rule]]\nuid = 0\nallow = ["read"]\n'
    after += '[[rule]]\nuid = 0\nallow = ["read"]\n'
    audit = tmp / "audit.log"
    with _server(tmp, before, "--workers", "2", "--audit-log", str(audit)) as server:
        server.wait_ready()
        path = str(tmp / "s.sock")
        pids = wait_until(
            lambda: re.search(r"2 workers serving \(pids (\d+), (\d+)\)", server.output), timeout=10
        )
        script = tmp / "load.py"
        script.write_text(_LOAD)
        script.chmod(0o644)
        stop = tmp / "stop"
        loads = {
            uid: subprocess.Popen(
                [PYTHON, str(script), path, str(stop)],
                stdout=subprocess.PIPE,
                text=True,
                user=uid,
                group=uid,
                cwd="/",
            )
            for uid in (WRITER, READER)
        }
        try:

            def both_loaded() -> bool:
                lines = _audit(audit) if audit.exists() else []
                return all(sum(line.get("uid") == uid for line in lines) >= 20 for uid in (WRITER, READER))

            wait_until(both_loaded, timeout=30, what="20 audited POSTs from each uid")
            _write(tmp / "policy.toml", after)
            swapped = time.monotonic()
            server.signal(signal.SIGHUP)
            for pid in pids.groups():
                wait_until(
                    lambda pid=pid: f"in pid {pid}: 3 rule(s)" in server.output,
                    timeout=5,
                    what=f"worker {pid}'s reload",
                )
            settled = swapped + 1.0
            wait_until(lambda: time.monotonic() > settled + 1.5, timeout=5)
        finally:
            stop.write_text("")
            results = {uid: json.loads(proc.communicate(timeout=30)[0]) for uid, proc in loads.items()}
        assert server.stop() == 0  # each worker drains and flushes its audit lines before the parent exits
    for uid, records in results.items():
        statuses = {status for _, status in records}
        assert statuses <= {201, 403}, (uid, statuses - {201, 403})  # nothing failed for another reason
        early = [status for at, status in records if at < swapped]
        late = [status for at, status in records if at >= settled]
        assert early, uid
        assert len(late) >= 5, (uid, len(late))
        allowed_before, allowed_after = (201, 403) if uid == WRITER else (403, 201)
        assert set(early) == {allowed_before}, (uid, early)
        assert set(late) == {allowed_after}, (uid, late)
    # Both workers appended to one audit file: every line whole, one per POST answered, by uid
    # (refusals past the budget counted in "denied" lines).
    lines = _audit(audit)
    assert audit.read_bytes().count(b"\n") == len(lines)
    for uid, records in results.items():
        logged = Counter(line["status"] for line in lines if line.get("uid") == uid)
        logged[403] += sum(line["by_uid"].get(str(uid), 0) for line in lines if line.get("event") == "denied")
        logged += Counter()  # drop a zero count
        assert logged == Counter(status for _, status in records), uid


def test_every_audit_line_parses_and_forged_text_cannot_break_one(tmp: Path) -> None:
    log = tmp / "audit.log"
    with _server(tmp, POLICY, "--store", "memory", "--audit-log", str(log)) as server:
        server.wait_ready()
        path = str(tmp / "s.sock")
        forged_paths = [
            "/v1/messages%0a%7b%22decision%22:%22allow%22%7d",
            "/x%0d%0a%1b[2J%00%22%5c",
            "/%e2%80%a8%c2%85%ff",
        ]
        calls_as(WRITER, path, POST, *(("POST", p, '{"text": "x\\n{\\"uid\\": 0}"}') for p in forged_paths))
        calls_as(STRANGER, path, ("GET", "/v1/messages", ""), ("GET", forged_paths[0], ""))
        forged_header = (
            b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Uds-Forwarded-Peer: uid=1 gid=1 pid=1\x0b\r\nContent-Length: 2\r\n\r\n{}"
        )
        import socket

        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(path)
            raw.sendall(forged_header)
            answer = raw.recv(65536)
        # uid 0 may only read: a 403 and its line, unless the parser refused the head first (400).
        refused_head = answer.startswith(b"HTTP/1.1 400 ")
        assert refused_head or answer.startswith(b"HTTP/1.1 403 "), answer
        expected = 6 if refused_head else 7

        def lines() -> list[dict[str, Any]] | None:
            found = _audit(log) if log.exists() else []
            return found if len(found) >= expected else None

        records = wait_until(lines, timeout=5, what=f"{expected} audit lines")
    raw_bytes = log.read_bytes()
    assert raw_bytes.isascii()
    assert len(raw_bytes.decode().splitlines()) == len(records) == raw_bytes.count(b"\n")
    assert {tuple(sorted(r)) for r in records} <= {
        tuple(
            sorted(
                ["time", "uid", "gid", "pid", "method", "route", "status", "decision", "scope", "message_id"]
            )
        ),
        tuple(sorted(["time", "uid", "gid", "pid", "method", "route", "status", "decision", "scope"])),
    }
    writes = [r for r in records if r["uid"] == WRITER]
    assert writes[0]["status"] == 201
    assert writes[0]["message_id"] == 1
    assert writes[0]["route"] == "/v1/messages"
    assert any(r["route"] == '/v1/messages\n{"decision":"allow"}' for r in writes)
    refusals = [r for r in records if r["decision"] == "deny"]
    assert [(r["uid"], r["status"], r["scope"]) for r in refusals][:2] == [(STRANGER, 403, "read")] * 2
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_sighup_reopens_the_audit_log_and_without_a_policy_does_not_stop_the_server(tmp: Path) -> None:
    log = tmp / "audit.log"
    sock = str(tmp / "s.sock")
    with running_server("--store", "memory", "--audit-log", str(log), tmp=tmp) as server:
        assert http_over_uds(sock, "POST", "/v1/messages", b'{"text": "a"}', JSON_TYPE)[0] == 201
        wait_until(lambda: log.exists() and len(_audit(log)) == 1, timeout=5)
        os.rename(log, tmp / "audit.log.1")  # logrotate
        server.signal(signal.SIGHUP)
        wait_until(lambda: "no policy file to reload; audit log reopened" in server.output, timeout=5)
        assert http_over_uds(sock, "POST", "/v1/messages", b'{"text": "b"}', JSON_TYPE)[0] == 201
        wait_until(lambda: log.exists() and len(_audit(log)) == 1, timeout=5, what="a line in the new file")
        assert [r["message_id"] for r in _audit(tmp / "audit.log.1")] == [1]
        assert [r["message_id"] for r in _audit(log)] == [2]
        assert os.stat(log).st_mode & 0o777 == 0o600
        assert server.proc.poll() is None


def test_a_full_disk_loses_audit_lines_not_requests_and_counts_them(tmp: Path) -> None:
    sock = str(tmp / "s.sock")
    with small_tmpfs(tmp / "disk", "1m", 0o700) as disk:
        log = disk / "audit.log"
        args = ["--socket", sock, "--store", "memory", "--audit-log", str(log), "--log-level", "warning"]
        with ServerProcess(args, socket_path=sock) as server:
            server.wait_ready()
            assert http_over_uds(sock, "POST", "/v1/messages", b'{"text": "a"}', JSON_TYPE)[0] == 201
            wait_until(lambda: log.exists() and log.stat().st_size > 0, timeout=5)
            fill(disk / "filler")
            for _ in range(3000):  # about 500 KiB of lines: past the 256 KiB the server holds
                status, _ = http_over_uds(sock, "POST", "/v1/messages", b'{"text": "b"}', JSON_TYPE)
                assert status == 201
            warned = wait_until(lambda: re.findall(r".*cannot write audit log.*", server.output), timeout=5)
            assert len(warned) == 1
            assert "No space left on device" in warned[0]
            (disk / "filler").unlink()
            assert http_over_uds(sock, "POST", "/v1/messages", b'{"text": "c"}', JSON_TYPE)[0] == 201
            resumed = wait_until(
                lambda: re.search(r"writable again; (\d+) line\(s\) were lost", server.output), timeout=5
            )
            lost = int(resumed.group(1))
            records = wait_until(
                lambda: (r := _audit(log)) and any(x.get("event") == "lost" for x in r) and r,
                timeout=5,
                what=f"the line counting lost lines; the file ends {log.read_bytes()[-300:]!r}",
            )
    ids = [r["message_id"] for r in records if "message_id" in r]
    assert lost > 0
    assert [r["lines"] for r in records if r.get("event") == "lost"] == [lost]
    assert len(ids) + lost == 3002
    assert ids == sorted(ids)


def test_through_the_proxy_a_caller_holds_what_both_hold(tmp: Path) -> None:
    from tests.client.test_proxy import Proxy, as_nobody

    nobody = 65534
    rules = (
        f'[[rule]]\nuid = 0\nallow = ["read", "write"]\n'  # the proxy's own uid
        f'[[rule]]\nuid = {nobody}\nallow = ["read", "events"]\n'
    )
    with _server(tmp, rules, "--store", "memory") as server:
        server.wait_ready()
        with Proxy(str(tmp / "s.sock")) as proxy:
            proxy.wait_listening()
            assert as_nobody(proxy.port, "GET", "/v1/messages")["status"] == 200
            refused = as_nobody(proxy.port, "POST", "/v1/messages", '{"text": "x"}', JSON_TYPE)
            assert refused["status"] == 403, refused
            assert "behind the proxy" in refused["body"]["message"]
            assert as_nobody(proxy.port, "GET", "/v1/events?since=0")["status"] == 403  # the proxy lacks it
            me = as_nobody(proxy.port, "GET", "/v1/whoami")["body"]
            assert me["uid"] == 0
            assert me["scopes"] == ["read"]
            assert me["forwarded_for"]["uid"] == nobody
            assert me["forwarded_for"]["scopes"] == ["read"]  # its own, within the proxy's
            proxy.stop()


def test_a_worker_replaced_while_the_file_is_invalid_does_not_start_the_others_keep_the_rules(
    tmp: Path,
) -> None:
    with _server(tmp, POLICY, "--workers", "2") as server:
        server.wait_ready()
        path = str(tmp / "s.sock")
        pids = wait_until(
            lambda: re.search(r"2 workers serving \(pids (\d+), (\d+)\)", server.output), timeout=10
        )
        _write(tmp / "policy.toml", '[[rule]]\nuid = 1\nallow = ["everything"]\n')
        os.kill(int(pids.group(1)), signal.SIGKILL)
        wait_until(
            lambda: re.search(
                r"Worker pid \d+: policy file \S+, line 1 \(rule 1\): unknown scope", server.output
            ),
            timeout=10,
            what="the replacement's one line",
        )
        assert "Traceback" not in server.output
        for _ in range(4):  # the surviving worker answers with the rules in force
            assert [s for s, _ in calls_as(READER, path, ("GET", "/v1/messages", ""), POST)] == [200, 403]
        wait_until(
            lambda: re.search(r"Worker pid \d+ exited with status 3 before serving", server.output),
            timeout=10,
        )
