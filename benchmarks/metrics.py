"""(k) What collecting metrics costs POST throughput: ``--metrics-listen`` on vs off.

Both servers are this tree's ``uds-server --store memory``, on the same CPU. With
``--metrics-listen`` every request is counted (method, route template, status, duration, peer uid)
and handed to ``prometheus-client`` each tick; without it, and with nobody asking ``GET /metrics``
on the socket, nothing is counted (``app.metrics``). So the ratio is the collection's cost alone.
Each round of the "on" side ends with a scrape of its ``/metrics``, which must show the POSTs
counted (otherwise the figure would measure nothing).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def pair(cpus: set[int] | None) -> Iterator[tuple[Server, Server, int]]:
    port = free_port()
    started: list[Server] = []
    try:
        started.append(Server(extra=["--metrics-listen", f"127.0.0.1:{port}"], cpus=cpus, store="memory"))
        started.append(Server(cpus=cpus, store="memory"))
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
            result = autocannon(on, 10, duration, warmup, generator_cpus, path=PATH)
            result["counted"] = counted(port)
            if result["counted"] < result["requests"]:
                raise BenchError(
                    f"/metrics counted {result['counted']:.0f} POSTs of {result['requests']:.0f}"
                )
            return result

        runs = paired(
            rounds, measured_on, lambda: autocannon(off, 10, duration, warmup, generator_cpus, path=PATH)
        )
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
        )
    ]


if __name__ == "__main__":
    main_for(run)
