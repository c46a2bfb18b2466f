"""(f) Server cold start (exec to answering ``GET /healthz`` on the socket) and resident memory idle,
under load, and after a long run (it should stay flat: history and idempotency keys are bounded).
"""

from __future__ import annotations

import threading
import time

from _common import Row, Server, loadgen, main_for, median, servers


def cold_start(kind: str) -> float:
    server = Server(kind)
    try:
        return server.ready()
    finally:
        server.close()


def rss_during(server: Server, seconds: float, samples: list[int]) -> None:
    """Load the server with 10 connections for ``seconds`` while sampling its RSS every 0.2 s."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append(server.rss_kib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        loadgen(server, 10, seconds, warmup=0)
    finally:
        stop.set()
        thread.join()
    samples.append(server.rss_kib())


def run(quick: bool) -> list[Row]:
    starts, load_s, long_s = (2, 1.0, 2.0) if quick else (5, 5.0, 60.0)
    ours: list[float] = []
    bare: list[float] = []
    for index in range(starts):
        pair = ("ours", "bare") if index % 2 == 0 else ("bare", "ours")
        for kind in pair:
            (ours if kind == "ours" else bare).append(cold_start(kind))
    rows = [
        Row(
            "f",
            "cold start: exec to first 200 from /healthz on the socket",
            "uds-server",
            median(ours),
            "bare Starlette",
            median(bare),
            "s",
            median(ours) / median(bare),
            "<= 0.5 s",
            median(ours) <= 0.5,
            [{"a_s": a, "b_s": b} for a, b in zip(ours, bare, strict=True)],
        )
    ]
    with servers(("ours", False)) as (server,):
        idle = server.rss_kib()
        first: list[int] = []
        rss_during(server, load_s, first)
        long_run: list[int] = []
        started = time.monotonic()
        rss_during(server, long_s, long_run)
        long_elapsed = time.monotonic() - started
        after = server.rss_kib()
    under = max(first)
    rows.append(
        Row(
            "f",
            "RSS: idle and under load (10 conns)",
            "under load",
            under / 1024,
            "idle",
            idle / 1024,
            "MiB",
            under / idle,
            "reported",
            True,
        )
    )
    rows.append(
        Row(
            "f",
            f"RSS after a {long_elapsed:.0f} s run vs after the first {load_s:g} s of load",
            "after long run",
            after / 1024,
            "under load",
            under / 1024,
            "MiB",
            after / under,
            "<= 1.10x (flat)",
            after / under <= 1.10,
            [{"rss_mib_every_0.2s": round(kib / 1024, 1)} for kib in long_run],
        )
    )
    return rows


if __name__ == "__main__":
    main_for(run)
