"""Throughput and latency of ``POST /messages`` over the socket, and over TCP: a developer tool.

    .venv/bin/python benchmarks/bench.py --spawn --pin -c 1,10,50   # or: python -m benchmarks.bench

Each round measures every concurrency on every transport, interleaved so that drift on a shared
machine hits both alike; the table shows medians over the rounds and the UDS/TCP ratios. The load
comes from ``_loadgen`` (keep-alive HTTP/1.1, one request in flight per connection). Exit codes as
``uds-client``'s: 0 ok, 1 some request failed, 2 usage, 3 a server could not be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _loadgen import LoadSpec, Target, run_load
from _spawn import ServerProcess, free_port, probe_tcp, socket_dir, split_cpus

from app.serving.spawn import app_command
from client import DEFAULT_ADDRESS, ClientError, UsageError, probe, resolve_socket

__all__ = ["build_parser", "json_safe", "main", "run"]

DESCRIPTION = (
    "Send POST /messages with a JSON body over keep-alive connections and report req/s and p50/p90/p99 "
    "latency per transport and concurrency (medians over --rounds), plus UDS/TCP ratios. Compare with "
    "TCP against a server started with 'uds-server --host 127.0.0.1 --port N' (--tcp 127.0.0.1:N), or "
    "let --spawn start one server on a temporary socket and one on a free loopback port."
)
_SPAWN_READY_TIMEOUT = 15.0


def _concurrency_list(text: str) -> list[int]:
    values: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"expected numbers of connections like 1,10,50, got {text!r}")
        values.append(int(part))
    return values


def _tcp_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:8080, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _positive(kind: type[int] | type[float], zero_ok: bool = False) -> Any:
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < 0 or (value == 0 and not zero_ok):
            bound = "at least 0" if zero_ok else "greater than 0"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    """The options of ``benchmarks/bench.py``."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/bench.py",
        description=DESCRIPTION,
        epilog="Exit status: 0 every request got a 2xx answer; 1 some did not (see the errors column); "
        "2 bad usage; 3 a server could not be reached.",
    )
    parser.add_argument(
        "--socket",
        metavar="ADDRESS",
        help=f"the server's socket (default: $UDS_SOCKET, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=5.0,
        metavar="SECONDS",
        help="a request unanswered for SECONDS is an error (default: 5)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--tcp",
        type=_tcp_address,
        metavar="HOST:PORT",
        help="also measure this TCP server (uds-server --host HOST --port PORT), same code",
    )
    where.add_argument(
        "--spawn",
        action="store_true",
        help="start two uds-server processes (temporary socket, free loopback port), "
        "measure both, stop them; --socket is then ignored",
    )
    parser.add_argument(
        "--concurrency",
        "-c",
        type=_concurrency_list,
        default=[1, 10, 50],
        metavar="N[,N...]",
        help="connections kept busy, comma-separated (default: 1,10,50)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--duration",
        "-d",
        type=_positive(float),
        default=5.0,
        metavar="SECONDS",
        help="seconds measured per run, after the warm-up (default: 5)",
    )
    amount.add_argument(
        "--requests",
        "-n",
        type=_positive(int),
        metavar="N",
        help="measure N requests per run instead of a duration",
    )
    parser.add_argument(
        "--warmup",
        type=_positive(float, zero_ok=True),
        default=1.0,
        metavar="SECONDS",
        help="seconds of unmeasured load before each run (default: 1)",
    )
    parser.add_argument(
        "--rounds",
        "-r",
        type=_positive(int),
        default=3,
        metavar="N",
        help="repeat every run N times and report medians (default: 3)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="with --spawn: servers on the first CPU, the generator on the others, so they "
        "never share a core (needs 2+ CPUs)",
    )
    parser.add_argument(
        "--workers",
        type=_positive(int),
        default=1,
        metavar="N",
        help="generator processes (default: 1; raise it if 'gen cpu' nears 100%%)",
    )
    parser.add_argument("--text", default="Hello from client", help="message text sent in every request")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument(
        "--progress", action="store_true", help="show progress on stderr even when it is not a terminal"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw req/s and latency percentiles to FILE.png (needs uds-example[plot])",
    )
    return parser


@dataclass(slots=True)
class Cell:
    """One transport at one concurrency, over all rounds."""

    transport: str
    concurrency: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def median(self, key: str) -> float:
        values = [r[key] for r in self.rounds if not math.isnan(r[key])]
        return statistics.median(values) if values else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "concurrency": self.concurrency,
            "rps": self.median("rps"),
            "p50_ms": self.median("p50_ms"),
            "p90_ms": self.median("p90_ms"),
            "p99_ms": self.median("p99_ms"),
            "requests": sum(r["requests"] for r in self.rounds),
            "errors": sum(r["errors"] for r in self.rounds),
            "generator_cpu": self.median("generator_cpu"),
            "statuses": dict(sorted(self.statuses.items())),
            "error_kinds": dict(sorted(self.error_kinds.items())),
            "rounds": self.rounds,
        }


class _Progress:
    """One self-rewriting line on stderr."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.step = 0
        self.label = ""

    def start(self, label: str) -> None:
        self.step += 1
        self.label = label
        self.update(0.0, 0)

    def update(self, seconds: float, requests: int) -> None:
        if self.enabled:
            line = f"[{self.step}/{self.total}] {self.label}: {seconds:4.1f}s, {requests:,} requests"
            sys.stderr.write("\r" + line.ljust(70))
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.step:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


@contextlib.contextmanager
def spawned_servers(
    timeout: float = _SPAWN_READY_TIMEOUT, cpus: set[int] | None = None
) -> Iterator[tuple[str, tuple[str, int]]]:
    """Start one ``uds-server`` on a temporary socket and one on a free loopback port; stop both after.

    Both run the same code with their default settings (the durable store, each in its own data
    directory inside the temporary one, removed after); their output goes to /dev/null.
    """
    directory = socket_dir("uds-bench")
    path = os.path.join(directory, "b.sock")
    port = free_port()
    try:
        with (
            ServerProcess(
                app_command("--socket", path), socket=path, cpus=cpus, data_dir=directory / "uds-data"
            ) as uds,
            ServerProcess(
                app_command("--host", "127.0.0.1", "--port", str(port)),
                port=port,
                cpus=cpus,
                data_dir=directory / "tcp-data",
            ) as tcp,
        ):
            uds.wait_ready(timeout)
            tcp.wait_ready(timeout)
            yield path, ("127.0.0.1", port)
            uds.stop()
            tcp.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _pin_split() -> tuple[set[int], set[int]]:
    split = split_cpus()
    if split is None:
        raise UsageError(f"--pin needs at least 2 CPUs; this process may use {len(os.sched_getaffinity(0))}")
    return split


def _measure(targets: dict[str, Any], args: argparse.Namespace, show: _Progress) -> list[Cell]:
    body = json.dumps({"text": args.text}, separators=(",", ":")).encode()
    cells = {(name, c): Cell(name, c) for c in args.concurrency for name in targets}
    for round_no in range(1, args.rounds + 1):
        for conc in args.concurrency:
            for name, target in targets.items():
                spec = LoadSpec(
                    concurrency=conc,
                    duration=args.duration,
                    requests=args.requests,
                    warmup=args.warmup,
                    workers=args.workers,
                    body=body,
                    timeout=args.timeout,
                )
                show.start(f"{name} c={conc} round {round_no}/{args.rounds}")
                result = run_load(target, spec, progress=show.update)
                cell = cells[(name, conc)]
                cell.rounds.append(
                    {
                        "rps": result.rps,
                        "p50_ms": result.percentile_ms(50),
                        "p90_ms": result.percentile_ms(90),
                        "p99_ms": result.percentile_ms(99),
                        "requests": result.requests,
                        "errors": result.errors,
                        "elapsed_s": result.elapsed,
                        "generator_cpu": result.generator_cpu,
                    }
                )
                for status, count in result.statuses.items():
                    cell.statuses[str(status)] = cell.statuses.get(str(status), 0) + count
                for kind, count in result.error_kinds.items():
                    cell.error_kinds[kind] = cell.error_kinds.get(kind, 0) + count
    show.done()
    return list(cells.values())


def ratios(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """UDS over TCP per concurrency: throughput ratio (>1: UDS faster), p50/p99 ratios (<1: UDS faster)."""
    by = {(r["transport"], r["concurrency"]): r for r in results}
    out: list[dict[str, Any]] = []
    for (transport, conc), uds in by.items():
        tcp = by.get(("tcp", conc))
        if transport != "uds" or tcp is None:
            continue
        out.append(
            {
                "concurrency": conc,
                "rps_uds_over_tcp": _paired_ratio(uds, tcp, "rps"),
                "p50_uds_over_tcp": _paired_ratio(uds, tcp, "p50_ms"),
                "p99_uds_over_tcp": _paired_ratio(uds, tcp, "p99_ms"),
            }
        )
    return out


def _paired_ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    """Median over rounds of a/b: each round ran both back to back, so load swings cancel out."""
    values = [
        x[key] / y[key]
        for x, y in zip(a["rounds"], b["rounds"], strict=True)
        if y[key] and not math.isnan(x[key]) and not math.isnan(y[key])
    ]
    return statistics.median(values) if values else math.nan


def format_table(report: dict[str, Any]) -> str:
    """The human-readable report."""
    s = report["settings"]
    amount = f"{s['requests']} requests" if s["requests"] else f"{s['duration']:g}s"
    lines = [
        f"POST {s['path']} ({s['body_bytes']} B JSON), {amount} x {s['rounds']} round(s), medians; "
        f"warm-up {s['warmup']:g}s; {s['workers']} generator process(es)",
    ]
    for name, where in report["targets"].items():
        lines.append(f"  {name}: {where}")
    lines.append("")
    header = (
        f"{'transport':<10}{'conc':>5}{'req/s':>11}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'gen cpu':>9}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for r in report["results"]:
        lines.append(
            f"{r['transport']:<10}{r['concurrency']:>5}{r['rps']:>11,.0f}{_ms(r['p50_ms'])}{_ms(r['p90_ms'])}"
            f"{_ms(r['p99_ms'])}{r['errors']:>8}{r['generator_cpu']:>9.0%}"
        )
    if report["ratios"]:
        lines.append("")
        lines.append("UDS/TCP: throughput (>1 is UDS faster), p50 and p99 latency (<1 is UDS faster)")
        for q in report["ratios"]:
            lines.append(
                f"  conc {q['concurrency']:>3}: req/s {q['rps_uds_over_tcp']:.2f}x, "
                f"p50 {q['p50_uds_over_tcp']:.2f}x, p99 {q['p99_uds_over_tcp']:.2f}x"
            )
    busy = [r for r in report["results"] if r["generator_cpu"] > 0.9]
    if busy:
        lines.append("")
        lines.append(
            "note: the generator kept its core over 90% busy; rerun with more --workers to be sure "
            "the server, not the generator, sets these figures"
        )
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{'-':>9}" if math.isnan(value) else f"{value:>9.3f}"


def plot(report: dict[str, Any], filename: str) -> None:
    """Draw req/s and p50/p90/p99 latency against concurrency, one line per transport."""
    mpl = _import_matplotlib()
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    transports = list(dict.fromkeys(r["transport"] for r in report["results"]))
    for index, transport in enumerate(transports):
        rows = [r for r in report["results"] if r["transport"] == transport]
        conc = [r["concurrency"] for r in rows]
        color = f"C{index}"
        left.plot(conc, [r["rps"] for r in rows], marker="o", color=color, label=transport.upper())
        for key, style in (("p50_ms", "-"), ("p90_ms", "--"), ("p99_ms", ":")):
            label = f"{transport.upper()} {key[:3]}"
            right.plot(conc, [r[key] for r in rows], style, marker="o", color=color, label=label)
    left.set(title="Throughput", xlabel="connections", ylabel="requests/s", xscale="log", ylim=(0, None))
    right.set(title="Latency", xlabel="connections", ylabel="ms", xscale="log", yscale="log")
    ticks = sorted({r["concurrency"] for r in report["results"]})
    for axis in (left, right):
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.xaxis.set_minor_locator(mpl.ticker.NullLocator())
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    settings = report["settings"]
    fig.suptitle(f"bench: POST {settings['path']}, medians of {settings['rounds']} rounds")
    fig.tight_layout()
    try:
        fig.savefig(filename, dpi=110)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"cannot write the plot to {filename} ({reason}); check the path") from exc
    finally:
        plt.close(fig)


def _import_matplotlib() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'uds-example[plot]'"
        ) from exc
    return matplotlib


def build_report(
    targets: dict[str, str], cells: Sequence[Cell], args: argparse.Namespace, body_bytes: int
) -> dict[str, Any]:
    results = [c.summary() for c in cells]
    return {
        "tool": "benchmarks/bench.py",
        "settings": {
            "method": "POST",
            "path": "/messages",
            "body_bytes": body_bytes,
            "concurrency": args.concurrency,
            "duration": None if args.requests else args.duration,
            "requests": args.requests,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "workers": args.workers,
            "pinned": bool(getattr(args, "pin", False)),
        },
        "targets": targets,
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "results": results,
        "ratios": ratios(results),
    }


def run(args: argparse.Namespace) -> int:
    """Measure, print the table (or JSON), optionally plot; exit 1 if any request failed."""
    if args.plot:
        _import_matplotlib()  # fail before minutes of measuring, not after
    show = _Progress(
        args.progress or sys.stderr.isatty(),
        args.rounds * len(args.concurrency) * (2 if args.spawn or args.tcp else 1),
    )
    with contextlib.ExitStack() as stack:
        if args.pin and not args.spawn:
            raise UsageError("--pin only applies to servers started with --spawn")
        if args.spawn:
            server_cpus, generator_cpus = _pin_split() if args.pin else (None, None)
            path, tcp = stack.enter_context(spawned_servers(cpus=server_cpus))
            if generator_cpus:
                saved = os.sched_getaffinity(0)
                os.sched_setaffinity(0, generator_cpus)
                stack.callback(os.sched_setaffinity, 0, saved)
        else:
            path, tcp = args.socket, args.tcp
            probe(path, timeout=args.timeout)
            if tcp is not None:
                probe_tcp(tcp[0], tcp[1], timeout=args.timeout)
        targets = {"uds": Target(socket=path)}
        if tcp is not None:
            targets["tcp"] = Target(host=tcp[0], port=tcp[1])
        try:
            cells = _measure(targets, args, show)
        except KeyboardInterrupt:
            show.done()
            raise
    body_bytes = len(json.dumps({"text": args.text}, separators=(",", ":")).encode())
    report = build_report({k: t.label for k, t in targets.items()}, cells, args, body_bytes)
    if args.json:
        print(_dump(report))
    else:
        print(format_table(report))
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    failed = sum(r["errors"] for r in report["results"])
    total = sum(r["requests"] for r in report["results"])
    if failed:
        kinds = {k for r in report["results"] for k in r["error_kinds"]} | _bad(report)
        print(
            f"Error: {failed} of {total} requests failed ({', '.join(sorted(kinds))}); see the errors column",
            file=sys.stderr,
        )
        return 1
    return 0


def _bad(report: dict[str, Any]) -> set[str]:
    return {f"HTTP {s}" for r in report["results"] for s in r["statuses"] if not s.startswith("2")}


def _dump(report: dict[str, Any]) -> str:
    return json.dumps(json_safe(report), indent=2)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN (no samples) spelled None, as strict JSON parsers expect."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit code (errors are one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        args.socket = resolve_socket(args.socket)
        return run(args)
    except ClientError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
