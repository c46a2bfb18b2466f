"""(k) What collecting metrics costs POST throughput: counted vs not.

Both servers are this tree's ``uds-server --store memory``, on the same CPU. ``uds-server`` counts
every request (method, route template, status, duration, peer uid) in plain numbers that a
collector reads at each exposition; here it also serves ``--metrics-listen``. The other side is
``uncounted_server.py``, the same server with the recorder switched off, which counts nothing. So
the ratio is the collection's cost alone.
Each round of the "on" side ends with a scrape of its ``/metrics``, which must show the POSTs
counted (otherwise the figure would measure nothing).

Two figures over the socket: req/s, and the server's CPU time per request (user + system, from
``/proc``), which holds better than req/s when other work shares the machine. Two processes running
the very same code differ by up to 2% (where their memory landed), so the rounds are spread over
fresh pairs of servers, started in turn in either order.

A third figure runs the whole request path in one process, ``--in-process``: the server's protocol
and application (``--store memory``) with a stand-in transport that keeps what is written, a
``POST /v1/messages`` at a time, counted and not in turn. Without the socket, the load generator and
the scheduler it varies far less, so it shows what a change to the counting costs, in microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

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
    paired,
)
from _spawn import free_port, split_cpus

PATH = "/v1/messages"
FLUSH_EVERY = 2000
"""Requests between two flushes in process: the server flushes every 0.1 s, 2,000 POSTs at 20,000/s."""
BODY = b'{"text":"Hello from client"}'
REQUEST = (
    b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(BODY)
    + BODY
)


def counted(port: int) -> float:
    """``uds_requests_total`` for POST /v1/messages 201 on the endpoint at ``port``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "uds_requests_total"
                and labels.get("route") == PATH
                and labels.get("status") == "201"
            ):
                return float(sample.value)
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(server: Server, duration: float, warmup: float, cpus: set[int] | None) -> dict[str, float]:
    """One autocannon run, with the server's CPU microseconds per request (warm-up included)."""
    before = cpu_seconds(server.proc.pid)
    result = autocannon(server, 10, duration, warmup, cpus, path=PATH)
    spent = cpu_seconds(server.proc.pid) - before
    result["cpu_us"] = spent / (result["requests"] * (duration + warmup) / duration) * 1e6
    return result


@contextlib.contextmanager
def pair(cpus: set[int] | None, on_first: bool) -> Iterator[tuple[Server, Server, int]]:
    port = free_port()
    sides = [
        lambda: Server(extra=["--metrics-listen", f"127.0.0.1:{port}"], cpus=cpus, store="memory"),
        lambda: Server("uncounted", cpus=cpus, store="memory"),
    ]
    started: list[Server] = []
    try:
        for make in sides if on_first else sides[::-1]:
            started.append(make())
        for server in started:
            server.ready()
        on, off = started if on_first else started[::-1]
        yield on, off, port
    finally:
        for server in started:
            server.close()


def in_process(requests: int, rounds: int) -> list[tuple[dict[str, float], dict[str, float]]]:
    """Microseconds per ``POST /v1/messages`` through the protocol and the app, counted vs not."""
    import uvloop
    from uvicorn.server import ServerState

    from app.__main__ import parse_settings
    from app.connection.protocol import PeerCredProtocol
    from app.logs import configure
    from app.serving.server import Services, build_config

    settings = parse_settings(["--store", "memory", "--socket", "/nonexistent/bench.sock"], {})  # never bound
    # Logged as the server logs (a line per message), to /dev/null like the servers' output above.
    configure(settings.log_level, settings.log_format, stream=open(os.devnull, "w"))  # noqa: SIM115

    async def measure() -> list[tuple[dict[str, float], dict[str, float]]]:
        services = Services.build(settings)
        app = services.application(settings)
        metrics = services.metrics
        config = build_config(settings, app, metrics.recorder)
        config.load()
        counting = metrics.recorder
        sides = {}
        for on in (True, False):
            transport = StandInTransport()
            recorder = counting if on else None  # no recorder: nothing counted, nothing to flush
            loop = asyncio.get_running_loop()
            protocol = PeerCredProtocol(config, ServerState(), {}, loop, recorder=recorder)
            protocol.connection_made(transport)
            sides[on] = (protocol, transport)

        async def one_round(on: bool) -> dict[str, float]:
            protocol, transport = sides[on]
            flush = metrics.flush if on else (lambda: None)
            loop = asyncio.get_running_loop()
            began = time.perf_counter()
            for index in range(requests):
                if index % FLUSH_EVERY == 0:
                    flush()  # the server's tick
                transport.answered = loop.create_future()
                protocol.data_received(REQUEST)
                await transport.answered
            return {"us": (time.perf_counter() - began) / requests * 1e6, "requests": requests}

        async with app.router.lifespan_context(app):
            await one_round(True)  # warm-up
            await one_round(False)
            runs = []
            for index in range(rounds):
                if index % 2 == 0:
                    runs.append((await one_round(True), await one_round(False)))
                else:
                    off = await one_round(False)
                    runs.append((await one_round(True), off))
        stored = sum(
            int(sum(cell[:-1]))
            for labels, cell in counting.records.items()
            if labels[:4] == ("cell", "POST", PATH, "201")
        )
        if stored != requests * (rounds + 1):
            raise BenchError(f"the recorder counted {stored} of {requests * (rounds + 1)} POSTs")
        return runs

    return uvloop.run(measure())


def run(quick: bool) -> list[Row]:
    pairs, rounds, duration, warmup = (1, 1, 0.5, 0.0) if quick else (5, 2, 3.0, 1.0)
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)
    runs = []
    for index in range(pairs):
        with pair(server_cpus, on_first=index % 2 == 0) as (on, off, port):

            def measured_on(on: Server = on, port: int = port) -> dict[str, float]:
                result = load(on, duration, warmup, generator_cpus)
                result["counted"] = counted(port)
                if result["counted"] < result["requests"]:
                    raise BenchError(
                        f"/metrics counted {result['counted']:.0f} POSTs of {result['requests']:.0f}"
                    )
                return result

            runs += paired(rounds, measured_on, lambda off=off: load(off, duration, warmup, generator_cpus))
    command = [PYTHON, __file__, "--in-process", "500" if quick else "4000", "1" if quick else "15"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if split:
        command = ["taskset", "-c", ",".join(map(str, sorted(server_cpus or ()))), *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise BenchError(f"the in-process measure failed: {done.stderr.strip()[-2000:]}")
    inner = [(a, b) for a, b in json.loads(done.stdout)]
    return [
        compare(
            "k",
            "req/s over UDS, autocannon 10 conns: metrics collected (--metrics-listen) vs not",
            ("metrics on", "metrics off"),
            runs,
            "rps",
            "req/s",
            ">= 0.95x",
            lambda r: r >= 0.95,
        ),
        compare(
            "k",
            "server CPU per POST (user + system): metrics collected vs not",
            ("metrics on", "metrics off"),
            runs,
            "cpu_us",
            "us",
            "<= 1.05x",
            lambda r: r <= 1.05,
        ),
        compare(
            "k",
            "time per POST in process (protocol and app, stand-in transport): counted vs not",
            ("metrics on", "metrics off"),
            inner,
            "us",
            "us",
            "<= 1.05x",
            lambda r: r <= 1.05,
        ),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--in-process"]:
        print(json.dumps(in_process(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main_for(run)
