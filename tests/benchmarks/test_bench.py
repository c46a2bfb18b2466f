"""``benchmarks/bench.py`` and its load generator, against real servers and scripted fake ones.

No timing is asserted: only counts, statuses, error kinds and the shape of the output.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.serving.spawn import app_command
from benchmarks import bench
from benchmarks._loadgen import LoadSpec, Target, build_request, run_load
from benchmarks._spawn import free_port, spawn
from client import UsageError
from tests.support import (
    PYTHON,
    ROOT,
    ServerProcess,
    http_over_uds,
    read_message,
    running_server,
)

POST = b'{"text":"Hello from client"}'


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as process:
        yield process


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/bench.py ARGS``, as a developer runs it."""
    command = [PYTHON, str(ROOT / "benchmarks" / "bench.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def _stored_count(path: str) -> int:
    status, body = http_over_uds(path, "GET", "/messages?limit=1")
    assert status == 200
    messages = json.loads(body)["messages"]
    return int(messages[-1]["id"]) if messages else 0


# --- the generator against the real server ------------------------------------------------------


def test_generator_sends_real_posts_and_counts_every_response(server: ServerProcess) -> None:
    assert server.socket_path
    before = _stored_count(server.socket_path)
    result = run_load(Target(socket=server.socket_path), LoadSpec(concurrency=4, requests=200, warmup=0))
    assert result.transport == "uds"
    assert result.requests == 200
    assert result.errors == 0
    assert result.statuses == {201: 200}
    assert result.error_kinds == {}
    assert len(result.latencies_ns) == 200
    assert all(ns > 0 for ns in result.latencies_ns)
    assert result.elapsed > 0
    # every request was a real POST the server stored (ids are sequential)
    assert _stored_count(server.socket_path) - before == 200


def test_generator_duration_mode_warms_up_then_measures(server: ServerProcess) -> None:
    assert server.socket_path
    before = _stored_count(server.socket_path)
    result = run_load(Target(socket=server.socket_path), LoadSpec(concurrency=2, duration=0.3, warmup=0.1))
    assert result.requests > 0
    assert result.errors == 0
    assert result.elapsed == pytest.approx(0.3)
    assert len(result.latencies_ns) == result.requests
    stored = _stored_count(server.socket_path) - before
    assert stored >= result.requests  # warm-up requests are stored but not counted
    p50, p90, p99 = (result.percentile_ms(q) for q in (50, 90, 99))
    assert 0 < p50 <= p90 <= p99


def test_generator_counts_error_statuses(server: ServerProcess) -> None:
    assert server.socket_path
    spec = LoadSpec(concurrency=2, requests=20, warmup=0, path="/no-such-route")
    result = run_load(Target(socket=server.socket_path), spec)
    assert result.requests == 20
    assert result.errors == 20
    assert result.statuses == {404: 20}


def test_generator_with_two_worker_processes(server: ServerProcess) -> None:
    assert server.socket_path
    spec = LoadSpec(concurrency=4, requests=101, warmup=0, workers=2)
    result = run_load(Target(socket=server.socket_path), spec)
    assert result.workers == 2
    assert result.requests == 101
    assert result.errors == 0
    assert len(result.latencies_ns) == 101


def test_generator_reports_a_missing_socket(tmp_short: Path) -> None:
    path = str(tmp_short / "absent.sock")
    result = run_load(Target(socket=path), LoadSpec(concurrency=2, requests=4, warmup=0))
    assert result.requests == 0
    assert result.errors == 4
    assert result.error_kinds == {"no-such-socket": 4}


def test_request_bytes() -> None:
    request = build_request("POST", "/messages", POST)
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /messages HTTP/1.1\r\n")
    assert b"\r\nContent-Type: application/json" in head
    assert f"\r\nContent-Length: {len(POST)}".encode() in head
    assert body == POST
    assert b"Content-Length" not in build_request("GET", "/healthz", b"")


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        LoadSpec(concurrency=0)
    with pytest.raises(ValueError, match="duration"):
        LoadSpec(duration=0)
    with pytest.raises(ValueError, match="socket path or a TCP port"):
        Target()


# --- the generator's HTTP parsing, against scripted servers -------------------------------------


def _read_request(conn: socket.socket, buf: bytearray) -> bool:
    """Read one request (head plus Content-Length body) into nothing; False when the peer closed."""
    return read_message(conn, buf) is not None


@pytest.fixture
def scripted(tmp_short: Path) -> Iterator[Callable[[Callable[[int], bytes | None]], str]]:
    """A Unix socket server answering request n with ``reply(n)`` (None: never answer)."""
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()

    def start(reply: Callable[[int], bytes | None]) -> str:
        path = str(tmp_short / f"f{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(16)
        listener.settimeout(0.1)
        listeners.append(listener)
        counter = iter(range(1_000_000))

        def serve(conn: socket.socket) -> None:
            buf = bytearray()
            with conn:
                conn.settimeout(5)
                while not stop.is_set():
                    try:
                        if not _read_request(conn, buf):
                            return
                    except OSError:
                        return
                    answer = reply(next(counter))
                    if answer is None:
                        stop.wait(5)
                        return
                    conn.sendall(answer)
                    if b"connection: close" in answer.lower():
                        return

        def accept() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                worker = threading.Thread(target=serve, args=(conn,), daemon=True)
                threads.append(worker)
                worker.start()

        thread = threading.Thread(target=accept, daemon=True)
        threads.append(thread)
        thread.start()
        return path

    yield start
    stop.set()
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(10)


def _response(status: int, body: bytes, *extra: bytes) -> bytes:
    head = [f"HTTP/1.1 {status} X".encode(), f"content-length: {len(body)}".encode(), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def test_generator_reads_split_and_closing_responses(scripted: Callable[..., str]) -> None:
    body = b'{"id": 1, "text": "' + b"x" * 70_000 + b'"}'  # larger than one read

    def reply(n: int) -> bytes:
        if n % 3 == 2:
            return _response(201, body, b"Connection: close")
        return _response(201, body)

    result = run_load(Target(socket=scripted(reply)), LoadSpec(concurrency=2, requests=30, warmup=0))
    assert result.requests == 30
    assert result.errors == 0
    assert result.statuses == {201: 30}


def test_generator_flags_a_response_without_length(scripted: Callable[..., str]) -> None:
    def reply(n: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"

    result = run_load(Target(socket=scripted(reply)), LoadSpec(concurrency=1, requests=3, warmup=0))
    assert result.requests == 0
    assert result.error_kinds == {"no-content-length": 3}


def test_generator_flags_garbage(scripted: Callable[..., str]) -> None:
    result = run_load(
        Target(socket=scripted(lambda n: b"SSH-2.0-OpenSSH\r\n\r\n")),
        LoadSpec(concurrency=1, requests=2, warmup=0),
    )
    assert result.error_kinds == {"protocol": 2}


def test_generator_times_out_a_silent_server(scripted: Callable[..., str]) -> None:
    result = run_load(
        Target(socket=scripted(lambda n: None)), LoadSpec(concurrency=2, requests=2, warmup=0, timeout=0.3)
    )
    assert result.requests == 0
    assert result.error_kinds == {"timeout": 2}


# --- benchmarks/bench.py ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[int]:
    """A real ``uds-server --host 127.0.0.1 --port N`` (same code as the socket server)."""
    port = free_port()
    with spawn(
        app_command("--host", "127.0.0.1", "--port", str(port), "--store", "memory"), port=port, cwd=ROOT
    ):
        yield port


def _bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``benchmarks/bench.py ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = bench.main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _check_report(
    report: dict[str, Any], transports: set[str], concurrency: list[int], rounds: int, requests: int
) -> None:
    results = report["results"]
    assert isinstance(results, list)
    expected = {(t, c) for t in transports for c in concurrency}
    assert {(r["transport"], r["concurrency"]) for r in results} == expected
    for row in results:
        assert row["requests"] == requests * rounds
        assert row["errors"] == 0
        assert row["statuses"] == {"201": requests * rounds}
        assert len(row["rounds"]) == rounds
        assert row["rps"] > 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["generator_cpu"] >= 0
    settings = report["settings"]
    assert isinstance(settings, dict)
    assert settings["concurrency"] == concurrency
    assert settings["rounds"] == rounds


def test_bench_json_uds_and_tcp(server: ServerProcess, tcp_server: int) -> None:
    assert server.socket_path
    done = run_bench(
        "--socket",
        server.socket_path,
        "--tcp",
        f"127.0.0.1:{tcp_server}",
        "-c",
        "1,3",
        "-n",
        "40",
        "--warmup",
        "0",
        "-r",
        "2",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    _check_report(report, {"uds", "tcp"}, [1, 3], 2, 40)
    assert report["targets"] == {
        "uds": f"unix://{server.socket_path}",
        "tcp": f"http://127.0.0.1:{tcp_server}",
    }
    assert [r["concurrency"] for r in report["ratios"]] == [1, 3]
    for ratio in report["ratios"]:
        assert ratio["rps_uds_over_tcp"] > 0
    assert done.stderr == ""  # no progress when stderr is not a terminal


def test_bench_spawn_pinned_json_progress_plot_and_table(tmp_path: Path) -> None:
    plot = tmp_path / "lat.png"
    done = run_bench(
        "--spawn",
        "--pin",
        "-c",
        "2",
        "-n",
        "30",
        "--warmup",
        "0",
        "-r",
        "1",
        "--progress",
        "--plot",
        str(plot),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["settings"]["pinned"] is True
    _check_report(report, {"uds", "tcp"}, [2], 1, 30)
    assert "[1/2] uds c=2 round 1/1" in done.stderr
    assert "[2/2] tcp c=2 round 1/1" in done.stderr
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The human-readable table of the same report.
    lines = bench.format_table(report).splitlines()
    assert any(line.split()[:2] == ["uds", "2"] for line in lines), lines
    assert any(line.split()[:2] == ["tcp", "2"] for line in lines), lines
    assert any(line.strip().startswith("conc   2: req/s") for line in lines), lines


def test_bench_only_uds_has_no_ratios(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert server.socket_path
    code, out, err = _bench(
        capsys,
        "--socket",
        server.socket_path,
        "-c",
        "2",
        "-n",
        "25",
        "--warmup",
        "0",
        "-r",
        "1",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    _check_report(report, {"uds"}, [2], 1, 25)
    assert report["ratios"] == []
    assert report["settings"]["pinned"] is False


def test_bench_cannot_connect_is_exit_3(tmp_short: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_short / "none.sock")
    code, _, err = _bench(capsys, "--socket", path, "-n", "5")
    assert code == 3
    assert err.strip().splitlines() == [
        f"Error: cannot connect to unix://{path} (no such file). Is the server running?"
    ]


def test_bench_tcp_refused_is_exit_3(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert server.socket_path
    port = free_port()
    code, _, err = _bench(capsys, "--socket", server.socket_path, "--tcp", f"127.0.0.1:{port}", "-n", "5")
    assert code == 3
    assert f"http://127.0.0.1:{port} (connection refused)" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "0"],
        ["-c", "1,x"],
        ["--tcp", "nohost:99999"],
        ["-d", "0"],
        ["-d", "1", "-n", "5"],
        ["--spawn", "--tcp", "127.0.0.1:1"],
        ["--pin", "-n", "5"],
    ],
)
def test_bench_usage_errors_are_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _bench(capsys, "--socket", "/nonexistent/s.sock", *args)
    assert code == 2, err
    assert "Traceback" not in err


def test_bench_plot_without_matplotlib_is_a_clear_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    args = argparse.Namespace(plot="x.png", spawn=False, tcp=None, socket="/nonexistent.sock")
    with pytest.raises(UsageError, match=r"pip install 'uds-example\[plot\]'"):
        bench.run(args)
