"""Shared by the benchmark scripts: servers in subprocesses, autocannon, medians, result rows.

Every script measures the two sides of a comparison in the same run, interleaved round by round,
and reports medians and their ratio; absolute figures depend on the machine and are context only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _spawn import ServerProcess, free_port, pinned, socket_dir

from app.serving.spawn import SpawnError, app_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
BIN = Path(PYTHON).parent
BODY = '{"text":"Hello from client"}'
AUTOCANNON = HERE / "node_modules" / ".bin" / "autocannon"


class BenchError(RuntimeError):
    """A benchmark could not run (a tool missing, a server that would not start)."""


@dataclass(slots=True)
class Row:
    """One figure of the results table: ``a`` against ``b`` and their ratio, with its target."""

    bench: str
    measure: str
    a_label: str
    a: float
    b_label: str = ""
    b: float | None = None
    unit: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class Server(ServerProcess):
    """``uds-server`` (or the bare Starlette app) on a socket or a loopback port, output discarded."""

    def __init__(
        self,
        kind: str = "ours",
        *,
        tcp: bool = False,
        extra: Sequence[str] = (),
        cpus: set[int] | None = None,
        source: Path = ROOT,
        store: str | None = None,
    ) -> None:
        """``source`` is the tree whose ``app`` runs (another revision's checkout, say).

        ``uds-server`` keeps its durable store in a ``data`` directory beside the socket, removed
        with it; ``store`` (``memory`` or ``sqlite``) overrides the default store. Both go by
        environment variables, which an older revision without those settings ignores."""
        self.dir = socket_dir("ub")
        path = None if tcp else os.path.join(self.dir, "s.sock")
        port = free_port() if tcp else None
        where = ["--port", str(port)] if tcp else ["--socket", str(path)]
        if kind == "ours":
            command = app_command(*(["--host", "127.0.0.1"] if tcp else []), *where, *extra)
        elif kind == "uncounted":
            command = [PYTHON, str(HERE / "uncounted_server.py"), *where, *extra]
        elif kind == "bare":
            command = [PYTHON, str(HERE / "bare_app.py"), *where, *extra]
        else:
            raise ValueError(kind)
        self.kind = kind
        super().__init__(
            command,
            socket=path,
            port=port,
            name=f"the {kind} server",
            cwd=source,
            cpus=cpus,
            env={"UDS_STORE": store} if store else None,
            data_dir=os.path.join(self.dir, "data") if kind == "ours" else None,
        )

    @property
    def transport(self) -> str:
        return "tcp" if self.port else "uds"

    def ready(self, timeout: float = 20.0) -> float:
        """Block until ``GET /healthz`` answers, polling every 2 ms; return seconds since the exec."""
        try:
            self.wait_ready(timeout, first_delay=0.002, max_delay=0.002)
        except SpawnError as exc:
            raise BenchError(str(exc)) from exc
        assert self.ready_after is not None
        return self.ready_after

    def target(self) -> Any:
        from _loadgen import Target

        return Target(port=self.port) if self.port else Target(socket=self.socket)

    def rss_kib(self) -> int:
        """Resident memory of the server process and its children, in KiB (from /proc)."""
        total = 0
        pids = [self.proc.pid, *_children(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def close(self) -> None:
        """Stop with SIGTERM (SIGKILL after 15 s) and remove the socket's directory."""
        with contextlib.suppress(SpawnError):
            self.stop(timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out.extend(int(p) for p in (task / "children").read_text().split())
    return out


@contextlib.contextmanager
def servers(
    *specs: tuple[str, bool], cpus: set[int] | None = None, store: str | None = None
) -> Iterator[list[Server]]:
    """Start servers given as (kind, tcp) pairs (on ``cpus`` if given, ours with ``store`` if
    given), wait for all, stop all after."""
    started: list[Server] = []
    try:
        for kind, tcp in specs:
            started.append(Server(kind, tcp=tcp, cpus=cpus, store=store))
        for server in started:
            server.ready()
        yield started
    finally:
        for server in started:
            server.close()


def ensure_autocannon() -> str:
    """The local autocannon, installed with ``npm ci`` from benchmarks/package-lock.json if absent."""
    if AUTOCANNON.exists():
        return str(AUTOCANNON)
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise BenchError("node and npm are needed for autocannon: apt-get install nodejs npm")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(HERE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0 or not AUTOCANNON.exists():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"npm ci in {HERE} failed ({last}); run it by hand to see why")
    return str(AUTOCANNON)


def autocannon(
    server: Server,
    connections: int,
    duration: float,
    warmup: float = 1.0,
    cpus: set[int] | None = None,
    path: str = "/messages",
) -> dict[str, float]:
    """One autocannon run of ``POST path`` (``/messages``, or ``/v1/messages``): req/s, latency
    (whole ms), errors, CPU it used."""
    tool = ensure_autocannon()
    command = [
        tool,
        "-c",
        str(connections),
        "-d",
        f"{duration:g}",
        "-m",
        "POST",
        "-H",
        "content-type=application/json",
        "-b",
        BODY,
        "--json",
    ]
    if warmup > 0:
        command += ["-W", "[", "-c", str(connections), "-d", f"{warmup:g}", "]"]
    if server.socket:
        command += ["-S", server.socket, f"http://localhost{path}"]
    else:
        command += [f"http://127.0.0.1:{server.port}{path}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        timeout=duration + warmup + 60,
        preexec_fn=pinned(cpus),
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise BenchError(f"autocannon failed with {result.returncode}: {result.stderr.strip()[-300:]}")
    data = json.loads(lines[-1])
    elapsed = float(data["duration"])
    return {
        "rps": data["requests"]["total"] / elapsed,
        "p50_ms": float(data["latency"]["p50"]),
        "p99_ms": float(data["latency"]["p99"]),
        "errors": float(data["errors"] + data["timeouts"] + data["non2xx"]),
        "requests": float(data["requests"]["total"]),
        # start-up and warm-up included: an upper bound on its share of a core while measuring
        "generator_cpu": cpu / (elapsed + warmup),
    }


def loadgen(
    server: Server, connections: int, duration: float, warmup: float = 1.0, cpus: set[int] | None = None
) -> dict[str, float]:
    """One run of our generator (``_loadgen``) with the same request autocannon sends."""
    from _loadgen import LoadSpec, run_load

    spec = LoadSpec(concurrency=connections, duration=duration, warmup=warmup, body=BODY.encode())
    saved = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        result = run_load(server.target(), spec)
    finally:
        os.sched_setaffinity(0, saved)
    return {
        "rps": result.rps,
        "p50_ms": result.percentile_ms(50),
        "p99_ms": result.percentile_ms(99),
        "errors": float(result.errors),
        "requests": float(result.requests),
        "generator_cpu": result.generator_cpu,
    }


def compare(
    bench: str,
    measure: str,
    labels: tuple[str, str],
    runs: Sequence[tuple[dict[str, float], dict[str, float]]],
    key: str,
    unit: str,
    target: str,
    ok: Callable[[float], bool],
) -> Row:
    """A row from paired rounds: medians of ``key`` for each side and the median per-round ratio."""
    a = median([x[key] for x, _ in runs])
    b = median([y[key] for _, y in runs])
    # The median of each round's own ratio: both sides of a round ran back to back, so a swing in
    # the machine's load between rounds cancels out instead of landing on one side.
    ratio = median([x[key] / y[key] for x, y in runs if y[key]])
    errors = sum(x.get("errors", 0) + y.get("errors", 0) for x, y in runs)
    rounds = [{f"a_{k}": v for k, v in x.items()} | {f"b_{k}": v for k, v in y.items()} for x, y in runs]
    return Row(
        bench, measure, labels[0], a, labels[1], b, unit, ratio, target, ok(ratio) and errors == 0, rounds
    )


def main_for(run: Callable[[bool], list[Row]]) -> None:
    """Let each script run alone: ``python benchmarks/<script>.py [--quick]`` prints its rows."""
    quick = "--quick" in sys.argv[1:]
    for row in run(quick):
        print(json.dumps(row.as_dict()))


def paired(
    rounds: int, first: Callable[[], dict[str, float]], second: Callable[[], dict[str, float]]
) -> list[tuple[dict[str, float], dict[str, float]]]:
    """Run both sides ``rounds`` times, swapping which goes first each round so drift hits both."""
    runs: list[tuple[dict[str, float], dict[str, float]]] = []
    for index in range(rounds):
        if index % 2 == 0:
            a = first()
            b = second()
        else:
            b = second()
            a = first()
        runs.append((a, b))
    return runs


class StandInTransport(asyncio.Transport):
    """What the protocol writes to, kept in memory: each answer's second write (its body) ends it.

    Its socket reports this process as the peer (SO_PEERCRED) with two supplementary groups
    (SO_PEERGROUPS), so the in-process benchmarks (k) and (m) drive the protocol as a real
    connection would.
    """

    class _Socket:
        family = socket.AF_UNIX

        def getsockopt(self, level: int, option: int, size: int = 0) -> bytes:
            if option == socket.SO_PEERCRED:
                return struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
            return struct.pack("2I", 20002, 20004)  # SO_PEERGROUPS: two supplementary groups

        def getsockname(self) -> str:
            return "bench.sock"

        def getpeername(self) -> str:
            return ""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.answered: asyncio.Future[None] | None = None
        self.sock = self._Socket()

    def write(self, data: Any) -> None:
        self.writes += 1
        if self.writes % 2 == 0 and self.answered is not None:
            self.answered.set_result(None)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0
