"""(b) Our server against a bare Starlette route doing the same work, both on uvicorn over the socket."""

from __future__ import annotations

from _common import Row, autocannon, compare, main_for, paired, servers


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 1.0, 0.5) if quick else (3, 5.0, 1.0)
    with servers(("ours", False), ("bare", False)) as (ours, bare):
        runs = paired(
            rounds,
            lambda: autocannon(ours, 10, duration, warmup),
            lambda: autocannon(bare, 10, duration, warmup),
        )
    return [
        compare(
            "b",
            "req/s over UDS, autocannon 10 conns: uds-server vs bare Starlette route",
            ("uds-server", "bare Starlette"),
            runs,
            "rps",
            "req/s",
            ">= 0.6x",
            lambda r: r >= 0.6,
        )
    ]


if __name__ == "__main__":
    main_for(run)
