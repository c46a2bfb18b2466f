"""(k) What collecting metrics costs POST throughput: counted vs not.

Both servers are this tree's ``uds-server --store memory``, on the same CPU. ``uds-server`` counts
every request (method, route template, status, duration, peer uid) and hands the counts to
``prometheus-client`` each tick; here it also serves ``--metrics-listen``. The other side is
``uncounted_server.py``, the same server with the recorder switched off, which counts nothing. So
the ratio is the collection's cost alone.
Each round of the "on" side ends with a scrape of its ``/metrics``, which must show the POSTs
counted (otherwise the figure would measure nothing).

Two figures: req/s, and the server's CPU time per request (user + system, from ``/proc``), which
holds better than req/s when other work shares the machine.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Iterator

from _common import BenchError, Row, Server, autocannon, compare, main_for, paired

from client.cli.spawn import free_port, split_cpus

PATH = "/v1/messages"


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
def pair(cpus: set[int] | None) -> Iterator[tuple[Server, Server, int]]:
    port = free_port()
    started: list[Server] = []
    try:
        started.append(Server(extra=["--metrics-listen", f"127.0.0.1:{port}"], cpus=cpus, store="memory"))
        started.append(Server("uncounted", cpus=cpus, store="memory"))
        for server in started:
            server.ready()
        yield started[0], started[1], port
    finally:
        for server in started:
            server.close()


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 1.0, 0.5) if quick else (9, 3.0, 1.0)
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)
    with pair(server_cpus) as (on, off, port):

        def measured_on() -> dict[str, float]:
            result = load(on, duration, warmup, generator_cpus)
            result["counted"] = counted(port)
            if result["counted"] < result["requests"]:
                raise BenchError(
                    f"/metrics counted {result['counted']:.0f} POSTs of {result['requests']:.0f}"
                )
            return result

        runs = paired(rounds, measured_on, lambda: load(off, duration, warmup, generator_cpus))
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
    ]


if __name__ == "__main__":
    main_for(run)
