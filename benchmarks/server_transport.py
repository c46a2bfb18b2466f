"""(a) Our server over the Unix socket against the same server over loopback TCP, 10 connections.

The target row uses autocannon; a second row repeats it with our generator, which spends about a
third of autocannon's CPU per request; a third measures the bare Starlette yardstick the same way,
for the ratio the transport gives a Python server doing this work on the same machine. With two
or more CPUs the server runs on the first and the load generator on the others.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from _common import Row, autocannon, compare, loadgen, main_for, paired, servers
from _spawn import split_cpus


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 0.5, 0.0) if quick else (7, 3.0, 1.0)
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)

    def uds_vs_tcp(
        kind: str,
        tool: Callable[..., dict[str, float]],
        measure: str,
        target: str,
        ok: Callable[[float], bool],
    ) -> Row:
        with servers((kind, False), (kind, True), cpus=server_cpus) as (uds, tcp):
            runs = paired(
                rounds,
                partial(tool, uds, 10, duration, warmup, generator_cpus),
                partial(tool, tcp, 10, duration, warmup, generator_cpus),
            )
        return compare("a", measure, ("UDS", "TCP"), runs, "rps", "req/s", target, ok)

    rows = [
        uds_vs_tcp(
            "ours",
            tool,
            f"server req/s, POST /messages, 10 conns, {name}",
            "UDS >= 1.25x TCP",
            lambda r: r >= 1.25,
        )
        for name, tool in (("autocannon", autocannon), ("bench.py generator", loadgen))
    ]
    # The yardstick's own ratio: the bare Starlette route doing the same work, same settings.
    # What the transport can give a Python server of this kind on this machine.
    rows.append(
        uds_vs_tcp(
            "bare",
            autocannon,
            "bare Starlette route req/s, same work, 10 conns, autocannon",
            "reported (the yardstick's own ratio)",
            lambda r: True,
        )
    )
    return rows


if __name__ == "__main__":
    main_for(run)
