"""``whoami``: ``Client.whoami()``, ``AsyncClient.whoami()`` and ``uds-client whoami``, on a real
server with a policy (its answer is the kernel's view of the caller) and in process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import AsyncClient, Client, Peer, WhoAmI
from client.cli import main as cli_main
from tests.client.conftest import answering, json_answer, raw_server
from tests.support import running_server, short_tmpdir

POLICY = f'[[rule]]\nuid = {os.getuid()}\nallow = ["read", "events"]\n'


@pytest.fixture(scope="module")
def policy_server() -> Iterator[str]:
    directory = short_tmpdir("who")
    (directory / "policy.toml").write_text(POLICY)
    with running_server(
        "--store", "memory", "--policy", str(directory / "policy.toml"), tmp=directory
    ) as server:
        assert server.socket_path is not None
        yield server.socket_path
    shutil.rmtree(directory, ignore_errors=True)


def test_client_whoami_is_the_kernels_view_and_the_scopes_held(policy_server: str) -> None:
    with Client(policy_server) as api:
        me = api.whoami()
    assert isinstance(me, WhoAmI)
    assert (me.uid, me.gid, me.pid) == (os.getuid(), os.getgid(), os.getpid())
    assert me.scopes == ("read", "events")
    assert me.forwarded_for is None
    assert WhoAmI.from_json(me.to_json()) == me


def test_async_client_whoami(policy_server: str) -> None:
    async def scenario() -> WhoAmI:
        async with AsyncClient(policy_server) as api:
            return await api.whoami()

    me = asyncio.run(scenario())
    assert me.uid == os.getuid()
    assert me.scopes == ("read", "events")


def test_uds_client_whoami_text_and_json(policy_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--socket", policy_server, "whoami"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"uid     {os.getuid()} gid {os.getgid()} pid {os.getpid()}"
    assert out[-1] == "scopes  read, events"
    assert cli_main(["--socket", policy_server, "whoami", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scopes"] == ["read", "events"]
    assert data["uid"] == os.getuid()


def test_whoami_without_a_socket_and_through_a_proxy_in_process(app_client: Client) -> None:
    me = app_client.whoami()
    assert (me.uid, me.pid, me.groups) == (None, None, ())
    assert me.scopes == ("read", "write", "events", "metrics")  # no policy: every scope
    behind = WhoAmI.from_json(
        {
            "uid": 0,
            "gid": 0,
            "pid": 5,
            "groups": [4],
            "scopes": ["read"],
            "forwarded_for": {"uid": 65534, "gid": -1, "pid": 0, "scopes": ["read", "write"]},
        }
    )
    assert behind.forwarded_for == Peer(pid=0, uid=65534, gid=-1)
    assert behind.forwarded_scopes == ("read", "write")
    assert behind.to_json()["forwarded_for"]["scopes"] == ["read", "write"]


def test_uds_client_whoami_escapes_what_the_server_says(
    tmp_short: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An impostor server's scopes cannot paint the terminal or add lines to whoami's output."""
    body = json.dumps(
        {
            "uid": 1,
            "gid": 1,
            "pid": 1,
            "groups": [],
            "scopes": ["read\n\x1b[2Jscopes  everything", "write\x07"],
            "forwarded_for": {"uid": 2, "gid": 2, "pid": 2, "scopes": ["\x1b]0;title\x07"]},
        }
    ).encode()
    with raw_server(str(tmp_short / "w.sock"), answering(json_answer(200, body))) as path:
        assert cli_main(["--socket", path, "whoami"]) == 0
    out = capsys.readouterr().out
    assert out.isascii()
    assert not any(ord(char) < 0x20 for char in out.replace("\n", "")), out
    lines = out.splitlines()
    assert len(lines) == 4, lines
    assert lines[-1].startswith("scopes  read\\n")
