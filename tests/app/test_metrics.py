"""Metrics on a real server: route templates, the TCP endpoint that serves nothing else, the
allowlist on the socket's /metrics, a busy port, --workers adding up, the bounded uid label."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings, SettingsError
from app.metrics.core import OTHER, UNMATCHED
from app.metrics.exposition import Metrics
from app.metrics.files import multiprocess_dir, read_file
from benchmarks._spawn import free_port
from tests.support import (
    NOBODY,
    ServerProcess,
    http_over_uds,
    python_as_nobody,
    read_response,
    running_server,
    short_tmpdir,
    wait_until,
)

POST_HEADERS = {"Content-Type": "application/json"}
MAX_PEER_UIDS = 32
"""Most ``--metrics-uid`` values (``app.config``)."""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def requests_total(text: str, method: str, route: str, status: int) -> float:
    return requests_total_in(samples(text), method, route, status)


def requests_total_in(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], method: str, route: str, status: int
) -> float:
    key = ("uds_requests_total", (("method", method), ("route", route), ("status", str(status))))
    return found.get(key, 0.0)


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return str(answer.read().decode())


def post(socket_path: str, text: str = "hello", target: str = "/v1/messages") -> int:
    status, _ = http_over_uds(socket_path, "POST", target, json.dumps({"text": text}).encode(), POST_HEADERS)
    return status


@pytest.fixture
def metrics_server() -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    with running_server(
        "--store", "memory", "--metrics-listen", f"127.0.0.1:{port}", "--metrics-uid", str(os.getuid())
    ) as server:
        yield server, port


def test_requests_are_counted_by_route_template(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    path = server.socket_path
    assert path is not None
    for number in range(3):
        assert post(path, f"message {number}") == 201
    assert http_over_uds(path, "GET", "/v1/messages/2")[0] == 200
    assert http_over_uds(path, "GET", "/v1/messages/99")[0] == 404
    assert http_over_uds(path, "GET", "/no/such/path")[0] == 404
    assert http_over_uds(path, "GET", "/another/missing/path")[0] == 404

    def counted() -> str | None:
        text = scrape(port)
        return text if requests_total(text, "GET", UNMATCHED, 404) == 2 else None

    text = wait_until(counted, what="the requests in /metrics")
    assert requests_total(text, "POST", "/v1/messages", 201) == 3
    assert requests_total(text, "GET", "/v1/messages/{message_id}", 200) == 1
    assert requests_total(text, "GET", "/v1/messages/{message_id}", 404) == 1
    assert "/no/such/path" not in text
    assert '/v1/messages/2"' not in text
    found = samples(text)
    assert found[("uds_messages_stored_total", ())] == 3
    duration = ("uds_request_duration_seconds_count", (("method", "POST"), ("route", "/v1/messages")))
    assert found[duration] == 3
    answered = sum(value for (name, _), value in found.items() if name == "uds_requests_total")
    assert answered >= 7  # and the readiness probes
    assert found[("uds_peer_requests_total", (("uid", str(os.getuid())),))] == answered
    assert any(name == "process_resident_memory_bytes" for name, _ in found)
    assert ("uds_open_connections", ()) in found
    assert ("uds_event_streams", ()) in found


def test_the_socket_serves_the_same_metrics(metrics_server: tuple[ServerProcess, int]) -> None:
    server, _port = metrics_server
    path = server.socket_path
    assert path is not None
    assert post(path) == 201
    status, body = http_over_uds(path, "GET", "/metrics")
    assert status == 200
    assert requests_total(body.decode(), "POST", "/v1/messages", 201) == 1


def test_the_tcp_port_serves_metrics_and_nothing_else(metrics_server: tuple[ServerProcess, int]) -> None:
    _, port = metrics_server
    assert "uds_requests_total" in scrape(port) or "uds_open_connections" in scrape(port)
    for method, target in (("POST", "/messages"), ("POST", "/v1/messages"), ("GET", "/v1/messages")):
        for path in (target, "/healthz", "/openapi.json"):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}",
                data=b'{"text": "x"}' if method == "POST" else None,
                headers=POST_HEADERS,
                method=method,
            )
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=5)
            with caught.value:
                assert caught.value.code == 404, (method, path)
                assert json.loads(caught.value.read())["error"] == "not_found"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    with caught.value:
        assert caught.value.code == 405


def test_the_tcp_port_answers_head_and_refuses_what_is_not_http(
    metrics_server: tuple[ServerProcess, int],
) -> None:
    _, port = metrics_server
    for request, status in (
        (b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(request)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == str(status).encode(), answer
        if request.startswith(b"HEAD"):
            assert body == b"", answer  # the head alone, Content-Length as for GET
        else:
            assert json.loads(body)["error"] == "bad_request"


def test_the_tcp_port_is_served_by_the_loop_not_a_thread() -> None:
    """A thread beside uvicorn's loop cost 1.5-2% of POST throughput by being there."""
    port = free_port()
    with (
        running_server("--store", "memory") as plain,
        running_server("--store", "memory", "--metrics-listen", f"127.0.0.1:{port}") as served,
    ):
        assert "uds_open_connections" in scrape(port)
        threads = [psutil.Process(server.proc.pid).num_threads() for server in (plain, served)]
        assert threads[0] == threads[1], threads


def test_a_refused_request_counts_as_unmatched(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    assert server.socket_path is not None
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(server.socket_path)
        conn.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # no Host: the protocol answers 400 itself
        assert read_response(conn)[0] == 400
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(server.socket_path)
        conn.sendall(b"FOO /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")  # no such method
        assert read_response(conn)[0] == 400

    def counted() -> str | None:
        text = scrape(port)
        return text if requests_total(text, OTHER, UNMATCHED, 400) == 1 else None  # method not parsed

    text = wait_until(counted, what="the refused requests counted")
    assert requests_total(text, "GET", UNMATCHED, 400) == 1


def test_counting_starts_with_the_server_not_with_the_first_scrape() -> None:
    with running_server("--store", "memory") as server:
        path = server.socket_path
        assert path is not None
        assert post(path) == 201  # before anyone has asked for /metrics
        first = http_over_uds(path, "GET", "/metrics")[1].decode()
        assert requests_total(first, "POST", "/v1/messages", 201) == 1
        assert samples(first)[("uds_messages_stored_total", ())] == 1
        assert post(path) == 201
        wait_until(  # a scrape within a second of the last one gets the same copy
            lambda: (
                requests_total(
                    http_over_uds(path, "GET", "/metrics")[1].decode(), "POST", "/v1/messages", 201
                )
                == 2
            ),
            what="the second POST in /metrics",
        )


def test_the_socket_metrics_follow_the_peer_allowlist() -> None:
    other = os.getuid() + 1000
    port = free_port()
    with running_server(
        "--store", "memory", "--allow-uid", str(other), "--metrics-listen", f"127.0.0.1:{port}"
    ) as s:
        assert s.socket_path is not None
        status, body = http_over_uds(s.socket_path, "GET", "/metrics")
        assert status == 403, body
        assert json.loads(body)["error"] == "forbidden"
        shown = scrape(port)
        assert "uds_open_connections" in shown  # the TCP port is for Prometheus, not peers
        assert (
            "uds_peer_requests_total{" not in shown
        )  # before: the peers' uids, which the allowlist kept from /metrics


def test_at_most_32_uids_are_shown() -> None:
    assert Settings.from_env({"UDS_METRICS_UID": " ".join(map(str, range(32)))}).metrics_uid == tuple(
        range(32)
    )
    with pytest.raises(SettingsError, match="at most 32"):
        Settings.from_env({"UDS_METRICS_UID": " ".join(map(str, range(33)))})


@pytest.mark.parametrize("mode", [["--store", "memory"], ["--workers", "2"]], ids=["one-process", "workers"])
def test_a_busy_metrics_port_is_one_line_and_exit_3(mode: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        directory = short_tmpdir()
        path = str(directory / "s.sock")
        with ServerProcess(
            ["--socket", path, *mode, "--metrics-listen", f"127.0.0.1:{port}"], socket_path=path
        ) as server:
            code = server.proc.wait(timeout=30)
            output = server.output
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    assert code == 3, output
    assert errors == [
        f"ERROR cannot serve metrics on 127.0.0.1:{port} (--metrics-listen): address already in use; "
        "stop the program using it or choose another port"
    ], output
    assert not os.path.exists(path)  # the socket it had bound is gone again


def test_workers_add_up() -> None:
    port = free_port()
    with running_server("--workers", "2", "--metrics-listen", f"127.0.0.1:{port}") as server:
        path = str(server.socket_path)
        wait_until(lambda: "workers serving" in server.output, what="both workers serving")
        (directory,) = glob.glob(f"/tmp/uds-metrics-{server.proc.pid}-*")
        sent = 0

        def both_served() -> list[float] | None:
            # Eight clients at once, each on new connections, until each worker has answered some.
            nonlocal sent
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(post, [path] * 40)) == {201}
            sent += 40
            counts = [posts_in(file) for file in glob.glob(f"{directory}/cells-*.db")]
            return counts if len(counts) == 2 and all(counts) else None

        wait_until(both_served, timeout=30, what="POSTs answered by both workers")

        def added_up() -> str | None:
            text = scrape(port)
            return text if requests_total(text, "POST", "/v1/messages", 201) == sent else None

        text = wait_until(added_up, timeout=15, what=f"{sent} POSTs in the workers' sum")
        assert samples(text)[("uds_messages_stored_total", ())] == sent
        by_worker = [posts_in(file) for file in glob.glob(f"{directory}/cells-*.db")]
        assert sum(by_worker) == sent  # two workers' files, one sum
        socket_view = http_over_uds(path, "GET", "/metrics")[1].decode()
        assert requests_total(socket_view, "POST", "/v1/messages", 201) == sent  # the same view
        start = ("process_start_time_seconds", ())
        assert samples(socket_view)[start] == samples(text)[start]  # the parent's, in both views
        assert server.stop() == 0
    assert not os.path.exists(directory)  # removed at exit


def posts_in(path: str) -> float:
    """The POST /v1/messages 201 count in one worker's file."""
    return sum(
        sum(counts[:-1])
        for labels, counts in read_file(path)[0]
        if labels[:4] == ("cell", "POST", "/v1/messages", "201")
    )


def test_peer_uids_are_opt_in_and_bounded() -> None:
    hidden = Metrics().recorder
    assert {hidden.peer(uid).label for uid in (0, 5, None)} == {None}  # no --metrics-uid: no uid series
    metrics = Metrics(shown_uids=range(MAX_PEER_UIDS))
    recorder = metrics.recorder
    tallies = [recorder.peer(uid) for uid in range(MAX_PEER_UIDS + 10)]
    assert [tally.label for tally in tallies] == [*range(MAX_PEER_UIDS), *[OTHER] * 10]
    assert recorder.peer(3) is tallies[3]
    assert recorder.peer(None).label is None  # no peer (TCP): not shown by uid
    assert recorder.peer(MAX_PEER_UIDS + 20).label == OTHER
    for tally in tallies:
        recorder.refused("GET", 400, tally)
    metrics.flush()
    _, body = metrics.rendered.render(None, None)
    found = samples(body.decode())
    uids = {
        dict(labels)["uid"]: value
        for (name, labels), value in found.items()
        if name == "uds_peer_requests_total"
    }
    assert len(uids) == MAX_PEER_UIDS + 1
    assert uids[OTHER] == 10
    assert sum(uids.values()) == MAX_PEER_UIDS + 10
    assert requests_total(body.decode(), "GET", UNMATCHED, 400) == MAX_PEER_UIDS + 10


def test_pipelined_and_encoded_requests_are_each_counted(metrics_server: tuple[ServerProcess, int]) -> None:
    """The protocol builds each request's cycle itself (its copy of uvicorn's header handling):
    pipelined requests, a percent-encoded path and a query string are served and counted as usual."""
    server, port = metrics_server
    assert server.socket_path is not None
    body = b'{"text":"piped"}'
    post = (
        b"POST /v1/%6Dessages?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(server.socket_path)
        conn.sendall(post * 3 + b"GET /v1/messages/1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        buffer = bytearray()
        assert [read_response(conn, buffer)[0] for _ in range(4)] == [201, 201, 201, 200]

    def counted() -> str | None:
        text = scrape(port)
        return text if requests_total(text, "GET", "/v1/messages/{message_id}", 200) == 1 else None

    text = wait_until(counted, what="the pipelined requests in /metrics")
    assert requests_total(text, "POST", "/v1/messages", 201) == 3
    assert samples(text)[("uds_messages_stored_total", ())] == 3


_POST_AS_NOBODY = textwrap.dedent(
    """
    import socket, sys
    body = b'{"text": "from another uid"}'
    for _ in range(int(sys.argv[2])):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(sys.argv[1])
            sock.sendall(
                b"POST /v1/messages HTTP/1.1\\r\\nhost: localhost\\r\\ncontent-type: application/json\\r\\n"
                + b"content-length: %d\\r\\n\\r\\n" % len(body) + body
            )
            print(sock.recv(4096).split(b" ", 2)[1].decode())
    """
)


def test_each_request_counts_under_its_connections_uid() -> None:
    directory = short_tmpdir()
    directory.chmod(0o755)  # uid 65534 may reach the socket (mode 666)
    port = free_port()
    with running_server(
        *("--store", "memory", "--socket-mode", "666", "--metrics-listen", f"127.0.0.1:{port}"),
        *("--metrics-uid", str(NOBODY), "--metrics-uid", str(os.getuid())),
        tmp=directory,
    ) as server:
        assert server.socket_path is not None
        other = python_as_nobody("-c", _POST_AS_NOBODY, server.socket_path, "3")
        assert other.returncode == 0, other.stderr
        assert other.stdout.split() == ["201"] * 3
        assert post(server.socket_path) == 201

        def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            found = samples(scrape(port))
            return found if requests_total_in(found, "POST", "/v1/messages", 201) == 4 else None

        found = wait_until(counted, what="the four POSTs in /metrics")
        by_uid = {
            dict(labels)["uid"]: value
            for (name, labels), value in found.items()
            if name == "uds_peer_requests_total"
        }
        assert by_uid[str(NOBODY)] == 3
        assert (
            by_uid[str(os.getuid())]
            == sum(value for (name, _), value in found.items() if name == "uds_requests_total") - 3
        )  # this uid's POST and the readiness probes


def test_an_answer_that_never_went_out_is_not_counted() -> None:
    """A body the protocol refuses (a bad chunk) or that stops arriving (408) is answered by the
    protocol and counted once there, as refused; the application's own answer to the request it
    was reading, which the peer never gets, is not counted."""
    port = free_port()
    with running_server(
        *("--store", "memory", "--request-timeout", "1", "--metrics-listen", f"127.0.0.1:{port}"),
        *("--metrics-uid", str(os.getuid())),
    ) as server:
        assert server.socket_path is not None
        head = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(server.socket_path)
            conn.sendall(head + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"tex\r\nZZ\r\n')
            assert read_response(conn)[0] == 400
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(server.socket_path)
            conn.sendall(head + b'Content-Length: 100\r\n\r\n{"text":')
            assert read_response(conn)[0] == 408

        def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            found = samples(scrape(port))
            refused = requests_total_in(found, "POST", UNMATCHED, 400) + requests_total_in(
                found, "POST", UNMATCHED, 408
            )
            return found if refused == 2 else None

        found = wait_until(counted, what="the two refused requests in /metrics")
        posts = {
            dict(labels)["route"]
            for (name, labels), value in found.items()
            if name == "uds_requests_total" and dict(labels)["method"] == "POST"
        }
        assert posts == {UNMATCHED}, found
        answered = sum(value for (name, _), value in found.items() if name == "uds_requests_total")
        assert found[("uds_peer_requests_total", (("uid", str(os.getuid())),))] == answered


def test_raw_methods_and_routes_share_their_labels_record() -> None:
    """Cells are kept by raw method and route object; those with the same labels add up in one
    record (a peer sending every method to every path makes cells, not series)."""
    metrics = Metrics()
    recorder = metrics.recorder
    tally = recorder.peer(0)
    for route in range(300):
        for method in ("PROPFIND", "BREW"):
            recorder.cell((route, method, 404), None)[0] += 1
            tally.counts[0] += 1
    assert len(recorder.records) == 1  # one cell record (the hidden peer has none)
    _, body = metrics.rendered.render(None, None)
    assert requests_total(body.decode(), OTHER, UNMATCHED, 404) == 600


def test_open_event_streams_and_connections_are_gauges(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    assert server.socket_path is not None

    def gauges() -> tuple[float, float]:
        found = samples(scrape(port))
        return found[("uds_event_streams", ())], found[("uds_open_connections", ())]

    with socket.socket(socket.AF_UNIX) as stream:
        stream.settimeout(5)
        stream.connect(server.socket_path)
        stream.sendall(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
        assert stream.recv(4096).startswith(b"HTTP/1.1 200")
        wait_until(lambda: gauges() == (1.0, 1.0), what="one stream on one connection")
    wait_until(lambda: gauges() == (0.0, 0.0), what="the stream and its connection gone")


def test_a_dead_worker_leaves_the_gauges_and_stays_in_the_counters() -> None:
    port = free_port()
    with running_server("--workers", "2", "--metrics-listen", f"127.0.0.1:{port}") as server:
        path = str(server.socket_path)
        serving = wait_until(
            lambda: re.search(r"2 workers serving \(pids (\d+), (\d+)\)", server.output), what="both workers"
        )
        workers = [int(pid) for pid in serving.groups()]
        held = socket.socket(socket.AF_UNIX)
        held.settimeout(5)
        held.connect(path)
        body = b'{"text": "kept"}'
        held.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert read_response(held)[0] == 201

        def gauge() -> float:
            return samples(scrape(port))[("uds_open_connections", ())]

        wait_until(lambda: gauge() == 1, what="the held connection counted")
        for pid in workers:  # whichever holds it: its last gauge value must not outlive it
            os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: server.output.count("killed by signal SIGKILL") == 2, timeout=30, what="both reaped"
        )
        held.close()
        wait_until(lambda: gauge() == 0, what="the dead worker's gauge dropped")
        assert requests_total(scrape(port), "POST", "/v1/messages", 201) == 1  # its counters stay
        assert server.stop() == 0


def test_the_workers_directory_replaces_what_killed_servers_left(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])  # its pid is gone once it has been reaped
    finished.wait()
    dead = tmp_path / f"uds-metrics-{finished.pid}-old"
    mine = tmp_path / f"uds-metrics-{os.getpid()}-old"  # a restarted container's server has the same pid
    alive = tmp_path / f"uds-metrics-{os.getppid()}-other"  # another live server's
    for directory in (dead, mine, alive):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")
    made = Path(multiprocess_dir(str(tmp_path)))
    assert not dead.exists()
    assert not mine.exists()
    assert alive.exists()
    assert made.name.startswith(f"uds-metrics-{os.getpid()}-")
    assert made.stat().st_mode & 0o777 == 0o700
