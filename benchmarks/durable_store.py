"""(i) POST throughput on the durable store (SQLite, the default) as a multiple of the memory store.

Three servers over the socket, the same code and settings but the store: ``--store sqlite`` with
``--durability normal`` (the default), the same with ``--durability full`` (an fsync per commit),
and ``--store memory``. Each round runs autocannon (10 connections, ``POST /messages``) against
each, in an order that rotates from round to round; the rows are the median per-round ratios. The
data directories are temporary, on the disk that holds /tmp. With two or more CPUs the servers run
on the first and autocannon on the others.
"""

from __future__ import annotations

from _common import Row, Server, autocannon, compare, main_for
from _spawn import split_cpus

CONNECTIONS = 10


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 0.5, 0.0) if quick else (7, 3.0, 1.0)
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)
    sides = {
        "normal": Server(cpus=server_cpus, store="sqlite"),
        "full": Server(cpus=server_cpus, store="sqlite", extra=["--durability", "full"]),
        "memory": Server(cpus=server_cpus, store="memory"),
    }
    try:
        for server in sides.values():
            server.ready()
        order = list(sides)
        results: list[dict[str, dict[str, float]]] = []
        for index in range(rounds):
            turn = order[index % 3 :] + order[: index % 3]
            results.append(
                {
                    name: autocannon(sides[name], CONNECTIONS, duration, warmup, generator_cpus)
                    for name in turn
                }
            )
    finally:
        for server in sides.values():
            server.close()
    return [
        compare(
            "i",
            f"POST req/s, {CONNECTIONS} conns: durable store (sqlite, --durability normal) vs memory store",
            ("sqlite", "memory"),
            [(r["normal"], r["memory"]) for r in results],
            "rps",
            "req/s",
            ">= 0.8x",
            lambda r: r >= 0.8,
        ),
        compare(
            "i",
            f"POST req/s, {CONNECTIONS} conns: --durability full (fsync per commit) vs memory store",
            ("sqlite full", "memory"),
            [(r["full"], r["memory"]) for r in results],
            "rps",
            "req/s",
            "reported",
            lambda r: True,
        ),
    ]


if __name__ == "__main__":
    main_for(run)
