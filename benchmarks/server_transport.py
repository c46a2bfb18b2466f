"""(a) Our server over the Unix socket against the same server over loopback TCP (autocannon, 10 conns)."""

from __future__ import annotations

from _common import Row, autocannon, compare, main_for, paired, servers


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 1.0, 0.5) if quick else (3, 5.0, 1.0)
    with servers(("ours", False), ("ours", True)) as (uds, tcp):
        runs = paired(
            rounds,
            lambda: autocannon(uds, 10, duration, warmup),
            lambda: autocannon(tcp, 10, duration, warmup),
        )
    return [
        compare(
            "a",
            "server req/s, POST /messages, autocannon 10 conns",
            ("UDS", "TCP"),
            runs,
            "rps",
            "req/s",
            "UDS >= 1.25x TCP",
            lambda r: r >= 1.25,
        )
    ]


if __name__ == "__main__":
    main_for(run)
