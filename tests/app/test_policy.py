"""The policy file, the scopes a request needs and the middleware's decisions, in process."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from app.api.access import Access, PeerAllowlist
from app.api.audit import AuditLog
from app.api.policy import PolicyError, load_policy, parse_policy, scope_for, scope_table
from app.api.versions import API_VERSIONS
from app.config import Settings
from app.main import create_app
from app.storage.sqlite import build_store
from tests.app.conftest import ASGIClient, assert_error
from tests.support import NOBODY

WRITER = {"pid": 10, "uid": 1000, "gid": 1000}
READER = {"pid": 11, "uid": 2000, "gid": 2000}
BY_GROUP = {"pid": 12, "uid": 3000, "gid": 3000}
STRANGER = {"pid": 13, "uid": 5000, "gid": 5000}
POLICY = b"""
[[rule]]
uid = 1000
allow = ["read", "write"]

[[rule]]
uid = 2000          # a read-only watcher
allow = ["read", "events"]

[[rule]]
gid = 3000
allow = ["metrics"]
"""


def _policy_file(tmp_path: Path, text: bytes = POLICY) -> str:
    path = tmp_path / "policy.toml"
    path.write_bytes(text)
    return str(path)


def _settings(tmp_path: Path, text: bytes = POLICY, **more: object) -> Settings:
    return Settings(store="memory", policy=_policy_file(tmp_path, text), **more)  # type: ignore[arg-type]


# -- the file ---------------------------------------------------------------------------------


def test_a_caller_holds_the_union_of_its_uid_gid_and_groups_rules() -> None:
    policy = parse_policy(POLICY, "p.toml")
    assert policy.rules == 3
    assert policy.scopes(1000, 1000) == {"read", "write"}
    assert policy.scopes(2000, 3000) == {"read", "events", "metrics"}
    assert policy.scopes(9, 9, (3000,)) == {"metrics"}
    assert policy.scopes(9, 9, (1000, 4)) == set()  # 1000 is a uid rule, not a group
    assert policy.scopes(5000, 5000) == set()


def test_user_and_group_names_are_resolved_when_the_file_is_read() -> None:
    policy = parse_policy(
        b'[[rule]]\nuser = "nobody"\nallow = ["read"]\n[[rule]]\ngroup = "root"\nallow = ["write"]\n', "p"
    )
    assert policy.scopes(65534, 1) == {"read"}
    assert policy.scopes(1, 0) == {"write"}


def test_the_digest_names_the_file_version() -> None:
    assert parse_policy(POLICY, "a").digest == parse_policy(POLICY, "b").digest
    assert parse_policy(POLICY + b"\n", "a").digest != parse_policy(POLICY, "a").digest
    assert len(parse_policy(POLICY, "a").digest) == 12


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            b'[[rule]]\nuid = 1\nallow = ["read", "wrte"]\n',
            "line 1 (rule 1): unknown scope 'wrte'; choose from read",
        ),
        (b'\n\n[[rule]]\nallow = ["read"]\n', "line 3 (rule 1): no selector; give exactly one of uid, gid"),
        (b"[[rule]]\nuid = 1\ngid = 2\nallow = []\n", "line 1 (rule 1): uid and gid together"),
        (
            b'[[rule]]\nuid = 1\nallow = ["read"]\n[[rule]]\nuser = "no-such-user-x"\nallow = ["read"]\n',
            "line 4 (rule 2): no user named 'no-such-user-x' on this system",
        ),
        (b'[[rule]]\ngroup = "no-such-group-x"\nallow = ["read"]\n', "no group named 'no-such-group-x'"),
        (b'[[rule]]\nuid = -1\nallow = ["read"]\n', "uid must be a number from 0, not -1"),
        (b'[[rule]]\nuid = "1000"\nallow = ["read"]\n', "uid must be a number from 0, not '1000'"),
        (b"[[rule]]\nuid = 1\n", 'allow must be a list of scopes, e.g. allow = ["read"]'),
        (b'[[rule]]\nuid = 1\nalow = ["read"]\n', "unknown key 'alow'"),
        (b'[[rule]]\nuid = 1\nallow = ["read"]\n\nuid = 2\n', "line 5: Cannot overwrite a value"),
        (b"[[rule]]\nuid = 1\nallow = [read]\n", "line 3: Invalid value"),
        (b"[rules]\nuid = 1\n", "unknown key 'rules'"),
        (b'[[rule]]\nuid = 1\nallow = ["\xff"]\n', "line 3: not UTF-8"),
    ],
)
def test_a_bad_file_names_the_file_the_line_and_the_problem(text: bytes, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "/etc/uds/policy.toml")
    message = str(caught.value)
    assert message.startswith("policy file /etc/uds/policy.toml"), message
    assert expected in message, message
    assert "\n" not in message


def test_a_missing_or_world_writable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policy file .*/nope.toml: cannot read it \(No such file"):
        load_policy(str(tmp_path / "nope.toml"))
    path = _policy_file(tmp_path)
    os.chmod(path, 0o666)
    with pytest.raises(PolicyError, match="writable by every user"):
        load_policy(path)
    os.chmod(path, 0o644)
    os.chown(path, NOBODY, NOBODY)  # CI runs as root: another uid's file
    with pytest.raises(PolicyError, match="owned by uid 65534, neither root nor this server's"):
        load_policy(path)
    with pytest.raises(PolicyError, match="Is a directory"):
        load_policy(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):  # and reading did not block
        load_policy(str(fifo))


def test_an_empty_file_is_a_policy_that_grants_nothing() -> None:
    policy = parse_policy(b"# nobody yet\n", "p")
    assert policy.rules == 0
    assert policy.scopes(0, 0) == set()


# -- which scope a request needs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/v1/messages", "read"),
        ("HEAD", "/messages/3", "read"),
        ("GET", "/docs", "read"),
        ("GET", "/openapi.json", "read"),
        ("GET", "/v1/version", "read"),
        ("POST", "/v1/messages", "write"),
        ("POST", "/messages", "write"),
        ("DELETE", "/v1/messages/1", "write"),
        ("PUT", "/nowhere", "write"),
        ("GET", "/v1/events", "events"),
        ("GET", "/events", "events"),
        ("GET", "/metrics", "metrics"),
        ("GET", "/healthz", ""),
        ("GET", "/readyz", ""),
        ("HEAD", "/_ping", ""),
        ("GET", "/v1/whoami", ""),
        ("GET", "/whoami", ""),
    ],
)
def test_each_route_needs_its_scope(method: str, path: str, scope: str) -> None:
    assert scope_for(scope_table([1]), method, path) == scope


# -- the middleware ---------------------------------------------------------------------------


def test_the_middleware_is_one_and_only_when_needed(tmp_path: Path) -> None:
    assert create_app(Settings(store="memory")).user_middleware == []
    for settings in (
        _settings(tmp_path),
        Settings(store="memory", allow_uid=(1,)),
        Settings(store="memory", audit_log="-"),
        _settings(tmp_path, allow_gid=(4,), audit_log="-"),
    ):
        assert [m.cls for m in create_app(settings).user_middleware] == [PeerAllowlist]


def test_reader_reads_and_gets_403_naming_write(
    tmp_path: Path, make_client: Callable[..., ASGIClient]
) -> None:
    settings = _settings(tmp_path)
    store = build_store(settings)
    app = create_app(settings, store=store)
    reader = make_client(app=app, peer=READER)
    assert reader.get("/v1/messages").status_code == 200
    body = assert_error(reader.post("/v1/messages", json={"text": "no"}), 403, "forbidden")
    assert "'write' scope" in body["message"]
    assert "uid 2000" in body["message"]
    assert "1000" not in body["message"]  # never the rules
    assert store.last_id() == 0
    writer = make_client(app=app, peer=WRITER)
    assert writer.post("/v1/messages", json={"text": "yes"}).status_code == 201
    assert_error(make_client(app=app, peer=STRANGER).get("/v1/messages"), 403)
    assert_error(make_client(app=app, peer=WRITER).get("/metrics"), 403)
    assert make_client(app=app, peer=BY_GROUP).get("/metrics").status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/_ping", "/v1/whoami", "/whoami"])
def test_probes_and_whoami_are_open_to_anyone(
    tmp_path: Path, make_client: Callable[..., ASGIClient], path: str
) -> None:
    app = create_app(_settings(tmp_path))
    assert make_client(app=app, peer=STRANGER).get(path).status_code == 200
    assert make_client(app=app, peer=None).get(path).status_code == 200


def test_whoami_shows_the_scopes_held_and_no_rules(
    tmp_path: Path, make_client: Callable[..., ASGIClient]
) -> None:
    app = create_app(_settings(tmp_path))
    me = make_client(app=app, peer=READER).get("/v1/whoami").json()
    assert me == {
        "uid": 2000,
        "gid": 2000,
        "pid": 11,
        "groups": [],
        "scopes": ["read", "events"],
        "forwarded_for": None,
    }
    assert make_client(app=app, peer=STRANGER).get("/whoami").json()["scopes"] == []
    assert make_client(app=app, peer=None).get("/whoami").json()["uid"] is None
    open_app = create_app(Settings(store="memory"))
    assert make_client(app=open_app, peer=STRANGER).get("/whoami").json()["scopes"] == [
        "read",
        "write",
        "events",
        "metrics",
    ]


def test_through_a_proxy_a_caller_holds_what_both_hold(
    tmp_path: Path, make_client: Callable[..., ASGIClient]
) -> None:
    text = POLICY + b'[[rule]]\nuid = 4000\nallow = ["read", "write", "events"]\n'
    app = create_app(_settings(tmp_path, text))
    proxy = {"pid": 20, "uid": 4000, "gid": 4000}
    client = make_client(app=app, peer=proxy)
    as_reader = {"Uds-Forwarded-Peer": "uid=2000 gid=2000 pid=7"}
    as_writer = {"Uds-Forwarded-Peer": "uid=1000 gid=-1 pid=0"}
    body = assert_error(client.post("/messages", json={"text": "x"}, headers=as_reader), 403)
    assert "behind the proxy" in body["message"]
    assert "'write'" in body["message"]
    assert client.post("/messages", json={"text": "x"}, headers=as_writer).status_code == 201
    assert client.get("/v1/events", headers=as_writer).status_code == 403  # the writer lacks events
    me = client.get("/whoami", headers=as_reader).json()
    assert me["scopes"] == ["read", "events"]
    assert me["forwarded_for"] == {"uid": 2000, "gid": 2000, "pid": 7, "scopes": ["read", "events"]}
    # A reader's own process naming a writer gains nothing: the intersection only narrows.
    narrowed = make_client(app=app, peer=READER)
    assert narrowed.post("/messages", json={"text": "x"}, headers=as_writer).status_code == 403
    assert narrowed.get("/whoami", headers=as_writer).json()["scopes"] == ["read"]
    bad = {"Uds-Forwarded-Peer": "uid=1000"}
    assert_error(client.get("/messages", headers=bad), 403)


def test_the_allowlist_flags_grant_every_scope_beside_the_file(
    tmp_path: Path, make_client: Callable[..., ASGIClient]
) -> None:
    app = create_app(_settings(tmp_path, allow_uid=(5000,)))
    stranger = make_client(app=app, peer=STRANGER)
    assert stranger.get("/metrics").status_code == 200
    assert stranger.post("/messages", json={"text": "x"}).status_code == 201
    assert make_client(app=app, peer=READER).post("/messages", json={"text": "x"}).status_code == 403


def test_reload_replaces_the_rules_whole_or_not_at_all(
    tmp_path: Path, make_client: Callable[..., ASGIClient]
) -> None:
    settings = _settings(tmp_path)
    access = Access(settings, API_VERSIONS)
    app = create_app(settings, access=access)
    reader = make_client(app=app, peer=READER)
    assert reader.post("/messages", json={"text": "x"}).status_code == 403  # cached on no connection
    assert settings.policy is not None
    Path(settings.policy).write_bytes(
        b'[[rule]]\nuid = 2000\nallow = ["write"]\n[[rule]]\nuid = 1\nallow = ["oops"]\n'
    )
    assert access.reload() is False
    assert reader.post("/messages", json={"text": "x"}).status_code == 403
    assert reader.get("/messages").status_code == 200
    Path(settings.policy).write_bytes(b'[[rule]]\nuid = 2000\nallow = ["write"]\n')
    generation = access.generation
    assert access.reload() is True
    assert access.generation == generation + 1
    assert reader.post("/messages", json={"text": "x"}).status_code == 201
    assert reader.get("/messages").status_code == 403


# -- the audit log, in process ----------------------------------------------------------------


def _audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_writes_and_refusals_get_one_line_each(
    tmp_path: Path, make_client: Callable[..., ASGIClient]
) -> None:
    log = tmp_path / "audit.log"
    settings = _settings(tmp_path, audit_log=str(log))
    access = Access(settings, API_VERSIONS)
    app = create_app(settings, access=access)
    writer = make_client(app=app, peer=WRITER)
    assert writer.post("/v1/messages", json={"text": "a"}).status_code == 201
    assert writer.get("/v1/messages").status_code == 200  # a read: no line
    assert make_client(app=app, peer=READER).post("/messages", json={"text": "b"}).status_code == 403
    assert make_client(app=app, peer=STRANGER).get("/messages/1").status_code == 403
    assert access.audit is not None
    access.audit.flush()
    lines = _audit_lines(log)
    assert [(x["uid"], x["method"], x["route"], x["status"], x["decision"], x["scope"]) for x in lines] == [
        (1000, "POST", "/v1/messages", 201, "allow", "write"),
        (2000, "POST", "/messages", 403, "deny", "write"),
        (5000, "GET", "/messages/1", 403, "deny", "read"),
    ]
    assert lines[0]["message_id"] == 1
    assert lines[0]["gid"] == 1000
    assert lines[0]["pid"] == 10
    assert str(lines[0]["time"]).endswith("Z")
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_forged_text_cannot_break_a_line(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    audit = AuditLog(str(log))
    forged = '/x\n{"decision": "allow"}\r\x1b[2J\x00"\\\u2028\u0085\ud800end'
    audit.record({"uid": 1, "route": forged, "method": "P\nOST"})
    audit.flush()
    raw = log.read_bytes()
    assert raw.count(b"\n") == 1
    assert raw.endswith(b"\n")
    assert raw.isascii()
    assert len(raw.decode().splitlines()) == 1  # no U+2028 or NEL for a reader to split at
    assert json.loads(raw)["route"] == forged


def test_a_planted_symlink_or_foreign_file_is_refused(tmp_path: Path) -> None:
    from app.api.audit import AuditError, open_audit_file

    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "link.log").symlink_to(target)
    with pytest.raises(AuditError, match="symbolic link"):
        open_audit_file(str(tmp_path / "link.log"))
    wide = tmp_path / "wide.log"
    wide.write_text("")
    wide.chmod(0o644)
    with pytest.raises(AuditError, match="others may open it"):
        open_audit_file(str(wide))
    with pytest.raises(AuditError, match="Is a directory"):
        open_audit_file(str(tmp_path))
    foreign = tmp_path / "foreign.log"
    foreign.write_text("")
    foreign.chmod(0o600)
    os.chown(foreign, NOBODY, NOBODY)  # CI runs as root: another uid's file, planted beforehand
    with pytest.raises(AuditError, match="owned by uid 65534"):
        open_audit_file(str(foreign))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(AuditError, match="cannot open it"):  # at once (O_NONBLOCK), no reader needed
        open_audit_file(str(fifo))


def test_a_failing_write_keeps_whole_lines_and_counts_what_it_drops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import app.api.audit as audit_module

    log = tmp_path / "audit.log"
    audit = AuditLog(str(log))
    monkeypatch.setattr(audit_module, "MAX_PENDING", 300)
    real_write = os.write
    budget = {"bytes": 30}  # the disk takes 30 bytes, then is full

    def full_disk(fd: int, data: bytes) -> int:
        if budget["bytes"] <= 0:
            raise OSError(28, "No space left on device")
        taken = min(len(data), budget["bytes"])
        budget["bytes"] -= taken
        return real_write(fd, data[:taken])

    monkeypatch.setattr(audit_module.os, "write", full_disk)
    with caplog.at_level("WARNING", logger="app.api.audit"):
        for number in range(10):
            audit.record({"n": number})
            audit.flush()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "No space left on device" in warnings[0]
    assert audit.lost > 0
    budget["bytes"] = 1 << 20
    with caplog.at_level("WARNING", logger="app.api.audit"):
        audit.flush()
    audit.record({"n": 10})
    audit.flush()
    lines = _audit_lines(log)  # every line parses: the one cut by the full disk was finished
    numbers = [x["n"] for x in lines if "n" in x]
    assert caplog.records[-1].getMessage().endswith(f"writable again; {11 - len(numbers)} line(s) were lost")
    assert len(numbers) < 11
    assert numbers == sorted(numbers)
    assert numbers[0] == 0
    assert numbers[-1] == 10
    lost = [x for x in lines if x.get("event") == "lost"]
    assert len(lost) == 1
    assert lost[0]["lines"] == 11 - len(numbers)
