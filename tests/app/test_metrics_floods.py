"""The ``--metrics-listen`` port and the series under floods: scrapes that cost the API little at
any rate, peers that cannot add series, and trickling connections that cannot keep Prometheus out.
Each runs against a real server, one process and ``--workers 2``."""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._loadgen import LoadSpec, Target, run_load
from benchmarks._spawn import free_port
from tests.app.test_metrics_attacks import METHODS
from tests.support import running_server, wait_until

pytestmark = pytest.mark.slow

MODES = pytest.mark.parametrize(
    "mode", [["--store", "memory"], ["--workers", "2"]], ids=["one-process", "workers"]
)
SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"
_SCRAPER = """
import signal, socket, sys
port, answered = int(sys.argv[1]), 0
def done(*_):
    print(answered, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            answered += answer.startswith(b"HTTP/1.1 200 ")
    except OSError:
        pass
"""


def _scrape(port: int, timeout: float = 5.0) -> str | None:
    """One ``GET /metrics`` over TCP: the text, or None when it was not answered in time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
    except OSError:
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200 ") else None


def _series(text: str) -> int:
    return sum(len(family.samples) for family in text_string_to_metric_families(text))


@MODES
def test_peers_cannot_inflate_the_series(mode: list[str]) -> None:
    """Before: one peer sending 47 odd methods to a few paths made 6,792 series."""
    port = free_port()
    uids = [arg for uid in range(32) for arg in ("--metrics-uid", str(uid))]  # the most allowed
    with running_server(*mode, "--metrics-listen", f"127.0.0.1:{port}", *uids) as server:
        path = server.socket_path
        assert path is not None
        wait_until(lambda: "Server listening" in server.output, what="serving")
        targets = ["/v1/messages", "/messages", "/v1/messages/1", "/v1/messages/x", "/healthz", "/readyz"]
        targets += ["/_ping", "/v1/version", "/v1/events?since=x", "/metrics", "/docs", "/openapi.json"]
        targets += ["/nowhere", "/v7/x", *(f"/random/{n}" for n in range(20))]
        for target in targets:
            for method in [*METHODS, "HEAD", "POST", "BREW", "X-ODD"]:
                for body in (b"", b'{"text":"x"}', b'{"te'):
                    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as conn:
                        conn.settimeout(5)
                        conn.connect(path)
                        head = (
                            f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n"
                        )
                        conn.sendall(head.encode() + body)
                        conn.recv(100)
        sent = len(targets) * (len(METHODS) + 4) * 3

        def all_counted() -> str | None:
            text = _scrape(port)
            counted = sum(
                sample.value
                for family in text_string_to_metric_families(text or "")
                for sample in family.samples
                if sample.name == "uds_requests_total"
            )
            return text if counted >= sent else None

        text = wait_until(all_counted, timeout=20, what=f"the {sent} requests counted")
        series = _series(text)
        assert series < 300, f"{series} series"
        methods = {
            line.split('method="')[1].split('"')[0] for line in text.splitlines() if 'method="' in line
        }
        assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}, methods
        assert "/random/" not in text
        assert server.stop() == 0


@contextlib.contextmanager
def _scrapers(port: int, count: int) -> Iterator[list[int]]:
    """``count`` processes scraping the port as fast as it answers; the list gets the number of
    scrapes they had answered once they stop."""
    answered: list[int] = []
    procs = [
        subprocess.Popen([sys.executable, "-c", _SCRAPER, str(port)], stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    try:
        yield answered
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            out, _ = proc.communicate(timeout=30)
            answered.append(int(out.strip() or 0))


def _server_cpu(pid: int) -> float:
    process = psutil.Process(pid)
    total = 0.0
    for each in [process, *process.children()]:
        with contextlib.suppress(psutil.Error):
            times = each.cpu_times()
            total += times.user + times.system
    return total


@MODES
def test_a_scrape_flood_costs_the_api_little(mode: list[str]) -> None:
    """Before: 4 clients scraping as fast as they could took POST throughput to 0.18x (0.3x-0.56x
    here), and the server's CPU per POST to 3.2x."""
    port = free_port()
    with running_server(*mode, "--metrics-listen", f"127.0.0.1:{port}") as server:
        assert server.socket_path is not None
        wait_until(lambda: "Server listening" in server.output, what="serving")
        pid = server.proc.pid
        # What the flood alone costs the server: CPU seconds per second, over what it uses idle.
        shares: list[float] = []
        for flooded in (False, True, False, True):
            with _scrapers(port, 4) if flooded else contextlib.nullcontext([1]) as scraped:
                began, before = time.monotonic(), _server_cpu(pid)
                time.sleep(2)
                shares.append((_server_cpu(pid) - before) / (time.monotonic() - began))
            assert sum(scraped) > 0  # the flood was answered: it measured scrapes, not idle clients
        flood_cost = statistics.median([shares[1] - shares[0], shares[3] - shares[2]])
        # POST throughput with and without the flood, in turn.
        target = Target(socket=server.socket_path)
        spec = LoadSpec(concurrency=4, duration=1.5, warmup=0.3)
        rps: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(4):
            for flooded in (round_ % 2 == 0, round_ % 2 == 1):
                with _scrapers(port, 4) if flooded else contextlib.nullcontext([1]) as scraped:
                    result = run_load(target, spec)
                assert result.errors == 0
                assert sum(scraped) > 0
                rps[flooded].append(result.rps)
        ratios = [with_flood / without for with_flood, without in zip(rps[True], rps[False], strict=True)]
        figures = f"flood alone: {flood_cost:.3f} CPU s/s; req/s ratios {ratios}; req/s {rps}"
        print(figures)
        assert flood_cost <= 0.05, figures  # the bound: at most 5% of what the server can do
        # The machine the suite runs on is shared: req/s is noisy, hence the margin.
        assert statistics.median(ratios) >= 0.7, figures
        assert server.stop() == 0


@contextlib.contextmanager
def _tricklers(port: int, count: int) -> Iterator[list[int]]:
    """``count`` connections that send a request head a byte at a time and never finish it,
    reopened as soon as the server closes them (slowloris). Yields a list holding the number of
    connections opened so far."""
    stop = threading.Event()
    opened = [0]

    def trickle() -> None:
        conns: list[socket.socket] = []
        while not stop.is_set():
            while len(conns) < count and not stop.is_set():
                with contextlib.suppress(OSError):
                    conn = socket.create_connection(("127.0.0.1", port), timeout=1)
                    conn.setblocking(False)
                    conns.append(conn)
                    opened[0] += 1
            for conn in list(conns):
                try:
                    conn.send(b"G")
                    if conn.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    conns.remove(conn)
                    conn.close()
            stop.wait(0.1)
        for conn in conns:
            conn.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join(10)


@MODES
def test_trickling_connections_cannot_keep_scrapes_out(mode: list[str]) -> None:
    """Before: with 16 half-sent connections 4 of 40 scrapes were answered; with 64, 1 of 40."""
    port = free_port()
    with running_server(*mode, "--metrics-listen", f"127.0.0.1:{port}") as server:
        wait_until(lambda: "Server listening" in server.output, what="serving")
        with _tricklers(port, 64) as opened:
            wait_until(lambda: opened[0] >= 64, what="64 trickling connections")
            answered = sum(_scrape(port) is not None for _ in range(40))
        print(f"{answered} of 40 scrapes answered past 64 trickling connections")
        assert answered >= 39, f"{answered} of 40 scrapes answered"
        assert server.stop() == 0
