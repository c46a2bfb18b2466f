"""(b) Our server against a bare Starlette route doing the same work, both on uvicorn over the socket.

With two or more CPUs the server runs on the first and autocannon on the others. Our server runs
with ``--store memory``: the bare route keeps nothing either, so both sides do the same work and
the figure is the framework's and the hardening's cost; what the durable store costs on top is (i).
"""

from __future__ import annotations

from _common import Row, autocannon, compare, main_for, paired, servers
from _spawn import split_cpus


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 0.5, 0.0) if quick else (7, 3.0, 1.0)
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)
    with servers(("ours", False), ("bare", False), cpus=server_cpus, store="memory") as (ours, bare):
        runs = paired(
            rounds,
            lambda: autocannon(ours, 10, duration, warmup, generator_cpus),
            lambda: autocannon(bare, 10, duration, warmup, generator_cpus),
        )
    return [
        compare(
            "b",
            "req/s over UDS, autocannon 10 conns: uds-server vs bare Starlette route",
            ("uds-server", "bare Starlette"),
            runs,
            "rps",
            "req/s",
            ">= 0.85x",
            lambda r: r >= 0.85,
        )
    ]


if __name__ == "__main__":
    main_for(run)
