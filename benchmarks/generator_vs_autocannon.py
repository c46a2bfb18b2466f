"""(c) Our load generator (bench.py) against autocannon, same server, same request, 10 conns.

Measured against our server and against the faster bare route: if the generator were the
bottleneck, it would fall behind autocannon on the faster server first. On a machine with two
or more CPUs the servers run on the first and the generators on the others, so the two generators
do not take CPU time from the server in different amounts.
"""

from __future__ import annotations

from functools import partial

from _common import Row, autocannon, compare, loadgen, main_for, paired, servers
from _spawn import split_cpus


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 0.5, 0.2) if quick else (7, 3.0, 1.0)
    rows: list[Row] = []
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)
    with servers(("ours", False), ("bare", False), cpus=server_cpus) as (ours, bare):
        for server, name in ((ours, "uds-server"), (bare, "bare Starlette")):
            runs = paired(
                rounds,
                partial(loadgen, server, 10, duration, warmup, generator_cpus),
                partial(autocannon, server, 10, duration, warmup, generator_cpus),
            )
            rows.append(
                compare(
                    "c",
                    f"req/s against {name} over UDS, 10 conns",
                    ("bench.py generator", "autocannon"),
                    runs,
                    "rps",
                    "req/s",
                    "0.8x .. 1.25x (agree)",
                    lambda r: 0.8 <= r <= 1.25,
                )
            )
    return rows


if __name__ == "__main__":
    main_for(run)
