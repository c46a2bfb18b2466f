"""``--workers`` metrics when workers die: counts that stay and never go backwards, bounded labels
across replacements, and a full metrics disk that never stops a worker from starting."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._spawn import free_port
from tests.support import ServerProcess, http_over_uds, running_server, small_tmpfs, wait_until

POST_HEADERS = {"Content-Type": "application/json"}


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _counters(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[object, float]:
    """The counter samples (and histogram buckets, counts and sums) of an exposition."""
    kinds = ("_total", "_bucket", "_count", "_sum")
    return {
        key: value for key, value in found.items() if key[0].startswith("uds_") and key[0].endswith(kinds)
    }


def _workers(server: ServerProcess) -> list[int]:
    return sorted(child.pid for child in psutil.Process(server.proc.pid).children())


@contextlib.contextmanager
def _posting(path: str, threads: int) -> Iterator[list[int]]:
    """``threads`` clients POSTing in a loop; the list holds the 201 answers they got."""
    stop = threading.Event()
    created = [0] * threads

    def post(index: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, http.client.HTTPException):  # its worker killed mid-request
                body = json.dumps({"text": f"m{index}"}).encode()
                if http_over_uds(path, "POST", "/v1/messages", body, POST_HEADERS)[0] == 201:
                    created[index] += 1

    running = [threading.Thread(target=post, args=(n,), daemon=True) for n in range(threads)]
    for thread in running:
        thread.start()
    total = [0]
    try:
        yield total
    finally:
        stop.set()
        for thread in running:
            thread.join(30)
        total[0] = sum(created)


def _replaced(server: ServerProcess, victim: int) -> None:
    """Wait until the supervisor has reaped ``victim`` and two workers run again."""
    wait_until(
        lambda: (
            f"Worker pid {victim} killed by signal SIGKILL" in server.output and len(_workers(server)) == 2
        ),
        timeout=60,
        what=f"worker {victim} replaced",
    )


def test_counts_survive_killed_workers_and_never_go_backwards() -> None:
    """Before: uid label values grew with each replaced worker (115 after 3 rounds, 32 documented),
    and uds_messages_stored_total read 139 for 300 stored."""
    port = free_port()
    me = str(os.getuid())
    with running_server(
        "--workers", "2", "--metrics-listen", f"127.0.0.1:{port}", "--metrics-uid", me
    ) as server:
        path = server.socket_path
        assert path is not None
        wait_until(lambda: "workers serving" in server.output, what="both workers serving")
        seen: dict[object, float] = {}

        def no_counter_went_back() -> None:
            now = _counters(_samples(port))
            fell = {key: (seen[key], value) for key, value in now.items() if value < seen.get(key, 0.0)}
            assert not fell, f"counters went backwards: {fell}"
            assert set(seen) <= set(now), f"series vanished: {set(seen) - set(now)}"
            seen.update(now)

        with _posting(path, 4) as created:
            for round_ in range(4):
                live = _workers(server)
                assert len(live) == 2
                victim = live[round_ % 2]
                wait_until(
                    lambda: _samples(port)[("uds_messages_stored_total", ())] > 0, what="POSTs counted"
                )
                no_counter_went_back()
                os.kill(victim, signal.SIGKILL)
                _replaced(server, victim)
                no_counter_went_back()
        status, body = http_over_uds(path, "GET", "/v1/messages?limit=1")
        assert status == 200, body
        in_store = json.loads(body)["messages"][-1]["id"]  # ids count from 1, one per stored message
        answered = created[0]
        assert answered > 0

        def settled() -> float | None:
            stored = _samples(port)[("uds_messages_stored_total", ())]
            return stored if stored >= answered else None

        stored = wait_until(settled, what=f"{answered} answered POSTs counted")
        no_counter_went_back()
        # Each 201 was counted before it was sent; a worker killed between a message's commit and
        # its count would leave one uncounted, between its count and its answer one unanswered.
        print(f"answered {answered}, counted {stored}, stored {in_store}")
        assert answered <= stored <= in_store, (answered, stored, in_store)
        assert in_store - answered <= 4 * 4, (answered, stored, in_store)  # those in flight at each kill
        uids = {dict(labels)["uid"] for (name, labels) in _samples(port) if name == "uds_peer_requests_total"}
        assert uids == {me}, uids
        directory = next(Path("/tmp").glob(f"uds-metrics-{server.proc.pid}-*"))
        # The two live workers' files and the dead ones' totals: the dead workers' files are gone.
        wait_until(lambda: len(list(directory.iterdir())) == 3, what="three files")
        assert server.stop() == 0


def test_a_full_metrics_disk_never_stops_a_worker(tmp: Path) -> None:
    """Before: with the disk under the metrics directory full, every replacement worker failed at
    its start (ENOSPC), and the server stopped. Any uid may fill a shared /tmp."""
    port = free_port()
    with (
        small_tmpfs(tmp / "small", "1m", 0o1777) as small,
        running_server(
            "--workers", "2", "--metrics-listen", f"127.0.0.1:{port}", env={"TMPDIR": str(small)}
        ) as server,
    ):
        path = server.socket_path
        assert path is not None
        wait_until(lambda: "workers serving" in server.output, what="both workers serving")
        with contextlib.suppress(OSError), (small / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        body = json.dumps({"text": "x"}).encode()
        for round_ in range(2):
            for victim in _workers(server):
                os.kill(victim, signal.SIGKILL)
                _replaced(server, victim)
            replacements = _workers(server)
            assert len(replacements) == 2
            wait_until(
                lambda: all(http_over_uds(path, "GET", "/healthz")[0] == 200 for _ in range(10)),
                timeout=30,
                what=f"round {round_}: the replacements serving",
            )
            for _ in range(10):
                assert http_over_uds(path, "POST", "/v1/messages", body, POST_HEADERS)[0] == 201, (
                    server.output
                )
                assert http_over_uds(path, "GET", "/metrics")[0] == 200, server.output
            assert _samples(port)[("uds_open_connections", ())] >= 0
            assert _workers(server) == replacements  # none of them died at its start
        warned = "cannot create this worker's file"
        wait_until(lambda: server.output.count(warned) >= 4, what="each replacement's warning")
        output = server.output
        assert "could not build the application" not in output, output
        assert "failed to start" not in output, output
        assert output.count(warned) == 4, output  # one for each replacement, not one per request
        assert "Traceback" not in output, output
        (small / "filler").unlink()
        assert server.stop() == 0
