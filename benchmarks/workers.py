"""(j) ``--workers 2`` against ``--workers 1`` on the durable store: throughput, CPU per request, fairness.

Two servers over the socket, the default SQLite store in temporary data directories, the same
settings but ``--workers``. Each round runs autocannon (20 connections, ``POST /messages``) against
each, the order swapping every round; a separate warm-up run comes first, so the measured run has
none. Nothing is pinned: two workers need more than one CPU, so servers and autocannon share them
all (on a two-CPU machine autocannon takes most of one, which caps what a second worker can add).

- Throughput: autocannon's requests per second, all workers together.
- Server CPU per request: on-CPU time (``/proc/PID/schedstat``) of the parent and its workers over
  the measured run, divided by the requests autocannon counted.
- Fairness: the busiest worker's share of the requests (0.50 is an even split), exact, from the line
  each worker logs when it stops (``Worker pid N stopped after M request(s)``), over every round;
  each round also records each worker's share of on-CPU time and of autocannon's connections
  (counted mid-run from /proc). An accepted connection stays with its worker, so the split is
  decided when autocannon connects.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from _common import ROOT, BenchError, Row, autocannon, compare, main_for, paired
from _spawn import ServerProcess, socket_dir

from app.serving.spawn import SpawnError, app_command

CONNECTIONS = 20
SERVED = re.compile(r"Worker pid (\d+) stopped after (\d+) request\(s\)")


class _Server(ServerProcess):
    """``uds-server --workers N`` on a temporary socket and data directory, its output in a file."""

    def __init__(self, workers: int) -> None:
        self.dir = socket_dir("uw")
        self.log = tempfile.NamedTemporaryFile(prefix="uds-workers-", suffix=".log")  # noqa: SIM115
        sock = os.path.join(self.dir, "s.sock")
        command = app_command(
            "--socket", sock, "--workers", str(workers), "--data-dir", os.path.join(self.dir, "data")
        )
        super().__init__(
            command, socket=sock, stdout=self.log, cwd=ROOT, name=f"uds-server --workers {workers}"
        )

    def pids(self) -> list[int]:
        """The parent and its workers."""
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    children.extend(int(p) for p in (task / "children").read_text().split())
        return [self.proc.pid, *children]

    def output(self) -> str:
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        with contextlib.suppress(SpawnError):
            self.stop(timeout=30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _on_cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU (all its threads), from /proc/PID/schedstat."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def _held(pid: int) -> int:
    """Connections worker ``pid`` holds: its sockets bound to the listening path, less the listener."""
    import psutil

    with contextlib.suppress(psutil.Error):
        return sum(1 for conn in psutil.Process(pid).net_connections("unix") if conn.laddr) - 1
    return 0


def _measure(server: _Server, duration: float, warmup: float) -> dict[str, float]:
    """A warm-up run, then one measured autocannon run with the server's CPU time around it."""
    autocannon(server, CONNECTIONS, warmup, 0)
    pids = server.pids()
    workers = pids[1:]
    before = {pid: _on_cpu_ns(pid) for pid in pids}
    held: dict[int, int] = {}
    sampler = threading.Timer(duration / 2, lambda: held.update({pid: _held(pid) for pid in workers}))
    sampler.start()
    try:
        result = autocannon(server, CONNECTIONS, duration, 0)
    finally:
        sampler.cancel()
    spent = {pid: _on_cpu_ns(pid) - before[pid] for pid in pids}
    answered = result["requests"] + result["errors"]
    result["cpu_us_per_request"] = sum(spent.values()) / 1000 / answered if answered else float("nan")
    if len(workers) > 1:
        worker_cpu = sum(spent[pid] for pid in workers)
        result["busiest_cpu_share"] = max(spent[pid] for pid in workers) / worker_cpu if worker_cpu else 0.0
        connections = sum(held.values())
        result["busiest_connection_share"] = max(held.values()) / connections if connections else float("nan")
    return result


def _request_shares(server: _Server) -> list[int]:
    """Requests each worker served over the whole run, busiest first, once the server has stopped."""
    counts = sorted((int(n) for _, n in SERVED.findall(server.output())), reverse=True)
    if not counts:
        raise BenchError(f"no 'Worker pid N stopped after M request(s)' lines in {server.log.name}")
    return counts


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 0.5, 0.2) if quick else (7, 3.0, 1.0)
    two, one = _Server(2), _Server(1)
    try:
        for server in (two, one):
            try:
                server.wait_ready(20)
            except SpawnError as exc:
                raise BenchError(str(exc)) from exc
        runs = paired(
            rounds, lambda: _measure(two, duration, warmup), lambda: _measure(one, duration, warmup)
        )
        two.stop(timeout=30)
        counts = _request_shares(two)
    finally:
        two.close()
        one.close()
    share = counts[0] / sum(counts)
    fairness = Row(
        "j",
        f"busiest worker's share of requests, {CONNECTIONS} conns, every round, vs an even split "
        f"(requests per worker {' / '.join(f'{c:,}' for c in counts)})",
        "busiest worker",
        share,
        "even split",
        0.5,
        "",
        share / 0.5,
        "reported",
        True,
        [{k: v for k, v in a.items() if k.startswith("busiest")} for a, _ in runs],
    )
    return [
        compare(
            "j",
            f"POST req/s, {CONNECTIONS} conns, sqlite store: --workers 2 vs --workers 1 (all CPUs shared)",
            ("2 workers", "1 worker"),
            runs,
            "rps",
            "req/s",
            "reported",
            lambda r: True,
        ),
        compare(
            "j",
            "server CPU per request (parent + workers, on-CPU time / requests): --workers 2 vs 1",
            ("2 workers", "1 worker"),
            runs,
            "cpu_us_per_request",
            "µs",
            "<= 1.1x",
            lambda r: r <= 1.1,
        ),
        fairness,
    ]


if __name__ == "__main__":
    main_for(run)
