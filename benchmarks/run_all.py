"""Run every benchmark and write a markdown table and JSON to benchmarks/results/.

    .venv/bin/python benchmarks/run_all.py            # full run (several minutes)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run: one short round each
    .venv/bin/python benchmarks/run_all.py --only a,e # a subset

Each comparison is measured side by side in this one run; the table gives medians, their ratio and
the target. Exit status: 0 when every benchmark ran (targets met or not), 1 when one could not run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HERE, Row
from bench import json_safe

BENCHES = {
    "a": ("server_transport", "server over UDS vs TCP"),
    "b": ("server_vs_bare", "server vs a bare Starlette route"),
    "c": ("generator_vs_autocannon", "load generator vs autocannon"),
    "d": ("client_roundtrips", "client library round trips"),
    "e": ("oneshot_cli", "one-shot CLI vs curl"),
    "f": ("startup_memory", "cold start and memory"),
    "i": ("durable_store", "durable store vs memory store"),
    "j": ("workers", "--workers 2 vs --workers 1"),
    "k": ("metrics", "metrics collected vs not"),
    "l": ("events", "event streams: delivery latency, POSTs with 100 streams open"),
}


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    if unit == "s":
        return f"{value * 1000:.1f} ms"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:g} {unit}".strip()


def to_markdown(report: dict[str, Any]) -> str:
    """The results table, one row per figure."""
    host = report["host"]
    lines = [
        f"Run {report['started']} ({report['mode']}), {host['cpus']} CPUs, {host['machine']}, "
        f"Python {host['python']}, {report['seconds']:.0f} s in all; 1-minute load average "
        f"{host['loadavg_1m_before']:.1f} before, {host['loadavg_1m_after']:.1f} after.",
        "",
        "| | Measure | A | B | A/B | Target | Met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ratio = "-" if row["ratio"] is None or math.isnan(row["ratio"]) else f"{row['ratio']:.2f}x"
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(
            f"| {row['bench']} | {row['measure']} | {row['a_label']}: {_fmt(row['a'], row['unit'])} "
            f"| {row['b_label']}: {_fmt(row['b'], row['unit'])} | {ratio} | {row['target']} | {met} |"
        )
    for failure in report["failures"]:
        error = failure["error"].replace("|", "/")
        lines.append(f"| {failure['bench']} | {failure['title']} | could not run: {error} | | | | **no** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the uds-example benchmarks.")
    parser.add_argument("--quick", action="store_true", help="one short round each (a smoke test)")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of a,b,c,d,e,f")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="directory for results.md/.json")
    args = parser.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    failures: list[dict[str, str]] = []
    for key in chosen:
        module_name, title = BENCHES[key]
        print(f"[{key}] {title} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(module_name)
            rows.extend(module.run(args.quick))
        except Exception as exc:  # one benchmark failing must not hide the others
            traceback.print_exc()
            failures.append({"bench": key, "title": title, "error": f"{type(exc).__name__}: {exc}"})
    report = {
        "started": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mode": "quick" if args.quick else "full",
        "seconds": time.monotonic() - clock,
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0],
        },
        "rows": [row.as_dict() for row in rows],
        "failures": failures,
    }
    report = json_safe(report)
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    (args.out / "results.md").write_text(markdown, encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown)
    print(f"written to {args.out / 'results.md'} and {args.out / 'results.json'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
