"""(a) Our server over the Unix socket against the same server over loopback TCP, 10 connections.

The target row uses autocannon; a second row repeats it with our generator, which spends about a
third of autocannon's CPU per request; a third measures the bare Starlette yardstick the same way,
for the ratio the transport gives a Python server doing this work on the same machine. With two
or more CPUs the server runs on the first and the load generator on the others.
"""

from __future__ import annotations

from functools import partial

from _common import Row, autocannon, compare, loadgen, main_for, paired, servers, split_cpus


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 1.0, 0.5) if quick else (7, 3.0, 1.0)
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)
    rows: list[Row] = []
    with servers(("ours", False), ("ours", True), cpus=server_cpus) as (uds, tcp):
        for name, tool in (("autocannon", autocannon), ("uds-client bench", loadgen)):
            runs = paired(
                rounds,
                partial(tool, uds, 10, duration, warmup, generator_cpus),
                partial(tool, tcp, 10, duration, warmup, generator_cpus),
            )
            rows.append(
                compare(
                    "a",
                    f"server req/s, POST /messages, 10 conns, {name}",
                    ("UDS", "TCP"),
                    runs,
                    "rps",
                    "req/s",
                    "UDS >= 1.25x TCP",
                    lambda r: r >= 1.25,
                )
            )
    # The yardstick's own ratio: the bare Starlette route doing the same work, same settings.
    # What the transport can give a Python server of this kind on this machine.
    with servers(("bare", False), ("bare", True), cpus=server_cpus) as (uds, tcp):
        runs = paired(
            rounds,
            partial(autocannon, uds, 10, duration, warmup, generator_cpus),
            partial(autocannon, tcp, 10, duration, warmup, generator_cpus),
        )
        rows.append(
            compare(
                "a",
                "bare Starlette route req/s, same work, 10 conns, autocannon",
                ("UDS", "TCP"),
                runs,
                "rps",
                "req/s",
                "reported (the yardstick's own ratio)",
                lambda r: True,
            )
        )
    return rows


if __name__ == "__main__":
    main_for(run)
