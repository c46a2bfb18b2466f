"""(f) Server cold start (exec to answering ``GET /healthz`` on the socket), the same started by
socket activation (systemd-socket-activate holds the socket and execs ``uds-server`` on the first
connection), and resident memory idle, under load, and after a long run (it should stay flat:
history and idempotency keys are bounded).
"""

from __future__ import annotations

import os
import shutil
import threading
import time

from _common import PYTHON, BenchError, Row, Server, loadgen, main_for, median, servers
from _spawn import ServerProcess, poll, socket_dir

from client import probe


def cold_start(kind: str) -> float:
    server = Server(kind)
    try:
        return server.ready()
    finally:
        server.close()


def activated_start() -> float:
    """Seconds from the first connection (which makes systemd-socket-activate exec the server) to
    the answer to ``GET /healthz`` sent on it: the activated server's exec to its first answer."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        raise BenchError("systemd-socket-activate is missing: apt-get install systemd")
    directory = socket_dir("ua")
    path = os.path.join(directory, "s.sock")
    command = [activate, "--listen", path, "-E", f"UDS_DATA_DIR={directory}/data", PYTHON, "-m", "app"]
    log = open(os.path.join(directory, "out.log"), "wb")  # noqa: SIM115 - closed below
    server = ServerProcess(command, socket=path, name="the activated server", stdout=log)
    try:
        # It logs this line once the socket listens (a connection before it would be refused).
        poll(
            lambda: b"Listening on" in open(log.name, "rb").read(),  # noqa: SIM115
            20.0,
            what=f"{path} listened on by systemd-socket-activate",
        )
        started = time.monotonic()
        status, _ = probe(path, timeout=20.0)
        took = time.monotonic() - started
        if status != 200:
            raise BenchError(f"the activated server answered {status} to GET /healthz")
        return took
    finally:
        server.stop(timeout=15)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


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
    starts, load_s, long_s = (1, 0.5, 1.0) if quick else (5, 5.0, 60.0)
    ours: list[float] = []
    bare: list[float] = []
    activated: list[float] = []
    for index in range(starts):
        pair = ("ours", "bare") if index % 2 == 0 else ("bare", "ours")
        for kind in pair:
            (ours if kind == "ours" else bare).append(cold_start(kind))
        activated.append(activated_start())
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
        ),
        Row(
            "f",
            "cold start by socket activation: first connection (the exec) to its 200, vs exec to first 200",
            "activated",
            median(activated),
            "uds-server",
            median(ours),
            "s",
            median(activated) / median(ours),
            "<= 0.3 s",
            median(activated) <= 0.3,
            [{"a_s": a, "b_s": b} for a, b in zip(activated, ours, strict=True)],
        ),
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
