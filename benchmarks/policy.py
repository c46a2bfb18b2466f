"""(m) What the access policy and the audit log cost ``POST /v1/messages``.

Three figures in process, where the socket, the load generator and the scheduler add no noise:

* the check alone: the middleware (``app.api.access.PeerAllowlist``) around an application that does
  nothing, against that application alone, driven without an event loop; a policy of 10 rules,
  a peer whose scopes are cached on its connection (as every request after a connection's first,
  and after each reload);
* a whole ``POST /v1/messages`` through the server's protocol and application (``--store memory``)
  with a stand-in transport: policy of 10 rules vs none, and policy plus ``--audit-log`` (a file,
  flushed as the server's tick does) vs none.

Then over the socket, unless ``--in-process-only``: three servers (none, policy, policy and audit
log) with autocannon, 10 connections, rounds in rotating order over 4 fresh triples of servers: req/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    ROOT,
    BenchError,
    Row,
    Server,
    StandInTransport,
    autocannon,
    compare,
    main_for,
    median,
)
from _spawn import split_cpus

PATH = "/v1/messages"
BODY = b'{"text":"Hello from client"}'
REQUEST = (
    b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(BODY)
    + BODY
)
FLUSH_EVERY = 2000
"""Requests between two audit flushes in process: the server flushes every 0.1 s."""


def rules(uid: int, count: int = 10) -> str:
    """A policy of ``count`` rules, one of them granting ``uid`` read and write."""
    text = f'[[rule]]\nuid = {uid}\nallow = ["read", "write"]\n'
    for index in range(1, count):
        selector = "uid" if index % 2 else "gid"
        text += f'[[rule]]\n{selector} = {20000 + index}\nallow = ["read", "events"]\n'
    return text


def check_alone(calls: int, rounds: int) -> list[dict[str, float]]:
    """µs per request added by the middleware around an app that answers 201 and does nothing
    else: the check alone (policy), and the check with its audit line (queued, encoded, written)."""
    from app.api.access import Access, PeerAllowlist
    from app.api.versions import API_VERSIONS
    from app.config import Settings
    from app.connection.peer import CONNECTION_KEY, PEER_KEY, PeerConnection

    directory = Path(tempfile.mkdtemp(prefix="pb-"))
    policy = directory / "policy.toml"
    policy.write_text(rules(os.getuid()))
    audit_path = directory / "audit.log"
    access = Access(Settings(store="memory", policy=str(policy)), API_VERSIONS)
    audited = Access(Settings(store="memory", policy=str(policy), audit_log=str(audit_path)), API_VERSIONS)
    if access.policy is None or access.policy.rules != 10:
        raise BenchError("the policy was not read: nothing would be measured")

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def sent(message: Any) -> None:
        return None

    apps = {"bare": answer, "policy": PeerAllowlist(answer, access), "audit": PeerAllowlist(answer, audited)}
    connection = PeerConnection((20002, 20004))
    scope = {
        "type": "http",
        "method": "POST",
        "path": PATH,
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"content-length", b"28"),
            (b"idempotency-key", b"k-1"),
        ],
        "extensions": {
            PEER_KEY: {"pid": 1, "uid": os.getuid(), "gid": os.getgid()},
            CONNECTION_KEY: connection,
        },
        "uds.message_id": 1,
    }

    def drive(name: str) -> float:
        app = apps[name]
        began = time.process_time()
        for _ in range(calls):
            coroutine = app(scope, None, sent)
            with contextlib.suppress(StopIteration):
                coroutine.send(None)
        if audited.audit is not None:
            audited.audit.flush()  # the server's tick: the lines' encoding and write are counted
        return (time.process_time() - began) / calls * 1e6

    for name in apps:
        drive(name)
    runs = []
    for index in range(rounds):
        order = ["bare", "policy", "audit"]
        order = order[index % 3 :] + order[: index % 3]
        got = {name: drive(name) for name in order}
        runs.append({"check_us": got["policy"] - got["bare"], "audit_us": got["audit"] - got["policy"]})
    if "write" not in connection.scopes:
        raise BenchError("the writer was refused: the check did not run as measured")
    written = audit_path.read_bytes().count(b"\n")
    if written != calls * (rounds + 1):
        raise BenchError(f"the audit log has {written} lines for {calls * (rounds + 1)} writes")
    return runs


def in_process(requests: int, rounds: int) -> dict[str, list[tuple[dict[str, float], dict[str, float]]]]:
    """µs per ``POST /v1/messages`` through protocol and app: policy vs none, policy + audit vs none."""
    import uvloop
    from uvicorn.server import ServerState

    from app.__main__ import parse_settings
    from app.logs import configure
    from app.serving.server import Services, build_config

    directory = Path(tempfile.mkdtemp(prefix="pb-"))
    policy = directory / "policy.toml"
    policy.write_text(rules(os.getuid()))
    audit_path = directory / "audit.log"
    base = ["--store", "memory", "--socket", "/nonexistent/bench.sock"]  # never bound
    variants = {
        "none": base,
        "policy": [*base, "--policy", str(policy)],
        "audit": [*base, "--policy", str(policy), "--audit-log", str(audit_path)],
    }
    configure("info", "text", stream=open(os.devnull, "w"))  # noqa: SIM115 - a line per message, as served

    async def measure() -> dict[str, list[tuple[dict[str, float], dict[str, float]]]]:
        sides = {}
        for name, argv in variants.items():
            settings = parse_settings(argv, {})
            services = Services.build(settings)
            app = services.application(settings)
            config = build_config(settings, app, services.metrics.recorder)
            config.load()
            transport = StandInTransport()
            protocol = config.http_protocol_class(
                config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
            )
            protocol.connection_made(transport)
            sides[name] = (app, protocol, transport, services)

        async def one_round(name: str) -> dict[str, float]:
            _app, protocol, transport, services = sides[name]
            audit = services.access.audit
            loop = asyncio.get_running_loop()
            began = time.process_time()
            for index in range(requests):
                if audit is not None and index % FLUSH_EVERY == 0:
                    audit.flush()  # the server's tick
                transport.answered = loop.create_future()
                protocol.data_received(REQUEST)
                await transport.answered
            return {"us": (time.process_time() - began) / requests * 1e6, "requests": requests}

        out: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {"policy": [], "audit": []}
        apps = [side[0] for side in sides.values()]
        async with (
            apps[0].router.lifespan_context(apps[0]),
            apps[1].router.lifespan_context(apps[1]),
            apps[2].router.lifespan_context(apps[2]),
        ):
            for name in sides:
                await one_round(name)  # warm-up
            for index in range(rounds):
                order = ["none", "policy", "audit"]
                order = order[index % 3 :] + order[: index % 3]
                got = {name: await one_round(name) for name in order}
                out["policy"].append((got["policy"], got["none"]))
                out["audit"].append((got["audit"], got["none"]))
            sides["audit"][3].access.audit.flush()
        written = audit_path.read_bytes().count(b"\n")
        if written != requests * (rounds + 1):
            raise BenchError(f"the audit log has {written} lines for {requests * (rounds + 1)} POSTs")
        return out

    return uvloop.run(measure())


def over_socket(rounds: int, duration: float, warmup: float) -> list[tuple[dict[str, float], ...]]:
    """req/s of three servers (none, policy, policy + audit log), autocannon 10 connections."""
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)
    directory = Path(tempfile.mkdtemp(prefix="pb-"))
    policy = directory / "policy.toml"
    policy.write_text(rules(os.getuid()))
    servers = [
        Server(cpus=server_cpus, store="memory"),
        Server(extra=["--policy", str(policy)], cpus=server_cpus, store="memory"),
        Server(
            extra=["--policy", str(policy), "--audit-log", str(directory / "audit.log")],
            cpus=server_cpus,
            store="memory",
        ),
    ]
    try:
        for server in servers:
            server.ready()
        runs = []
        for index in range(rounds):
            order = [0, 1, 2][index % 3 :] + [0, 1, 2][: index % 3]
            got = {i: autocannon(servers[i], 10, duration, warmup, generator_cpus, path=PATH) for i in order}
            runs.append((got[0], got[1], got[2]))
        return runs
    finally:
        for server in servers:
            server.close()


def run(quick: bool) -> list[Row]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [PYTHON, __file__, "--in-process", "500" if quick else "4000", "1" if quick else "15"]
    split = split_cpus()
    if split:
        command = ["taskset", "-c", ",".join(map(str, sorted(split[0]))), *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise BenchError(f"the in-process measure failed: {done.stderr.strip()[-2000:]}")
    inner = json.loads(done.stdout)
    check = median([r["check_us"] for r in inner["check"]])
    audit = median([r["audit_us"] for r in inner["check"]])
    post = median([b["us"] for _, b in inner["policy"]])
    rows = [
        Row(
            "m",
            "the policy check alone, in process (10 rules, scopes cached on the connection), per request",
            "check",
            check,
            unit="us",
            target="<= 1 us",
            met=check <= 1.0,
            rounds=inner["check"],
        ),
        Row(
            "m",
            "the audit line alone, in process (queued, encoded, written), per write; vs a POST in process",
            "audit line",
            audit,
            "POST",
            post,
            unit="us",
            ratio=audit / post,
            target="<= 0.05x",
            met=audit / post <= 0.05,
            rounds=inner["check"],
        ),
        compare(
            "m",
            "time per POST in process: policy of 10 rules vs none",
            ("policy", "none"),
            inner["policy"],
            "us",
            "us",
            "<= 1.03x",
            lambda r: r <= 1.03,
        ),
        compare(
            "m",
            "time per POST in process: policy and audit log vs none",
            ("policy + audit", "none"),
            inner["audit"],
            "us",
            "us",
            "<= 1.05x",
            lambda r: r <= 1.05,
        ),
    ]
    if "--in-process-only" in sys.argv[1:]:
        return rows
    # Rounds over fresh triples of servers: two processes of the same code differ by up to 2%.
    triples = 1 if quick else 4
    runs = [run for _ in range(triples) for run in over_socket(*((1, 1.0, 0.5) if quick else (3, 3.0, 1.0)))]
    rows += [
        compare(
            "m",
            "req/s over UDS, autocannon 10 conns: policy of 10 rules vs none",
            ("policy", "none"),
            [(p, n) for n, p, _ in runs],
            "rps",
            "req/s",
            ">= 0.97x",
            lambda r: r >= 0.97,
        ),
        compare(
            "m",
            "req/s over UDS, autocannon 10 conns: policy and audit log vs policy",
            ("policy + audit", "policy"),
            [(a, p) for _, p, a in runs],
            "rps",
            "req/s",
            ">= 0.95x",
            lambda r: r >= 0.95,
        ),
    ]
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--in-process"]:
        calls, rounds = int(sys.argv[2]), int(sys.argv[3])
        result = in_process(calls, rounds)
        result["check"] = check_alone(calls * 25, rounds)  # type: ignore[assignment]
        print(json.dumps(result))
    else:
        main_for(run)
