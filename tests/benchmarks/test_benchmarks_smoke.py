"""The benchmark scripts run end to end (``run_all.py --quick``) and write well-formed results.

This proves the scripts work; it asserts structure, never speed.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import PYTHON, ROOT, require_tool, short_tmpdir

pytestmark = pytest.mark.slow

BENCHMARKS = ROOT / "benchmarks"
AUTOCANNON = BENCHMARKS / "node_modules" / ".bin" / "autocannon"
RUN_ALL = {"a", "b", "c", "d", "e", "f", "i", "j", "k", "l"}
"""The benchmarks run_all.py runs (its BENCHES)."""
ROW_KEYS = {"bench", "measure", "a_label", "a", "b_label", "b", "unit", "ratio", "target", "met", "rounds"}


@pytest.fixture(scope="module")
def quick_run() -> Iterator[tuple[subprocess.CompletedProcess[str], Path]]:
    require_tool("node")
    npm = require_tool("npm")
    require_tool("curl")
    if not AUTOCANNON.exists():
        installed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(BENCHMARKS)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert installed.returncode == 0, f"npm ci for autocannon failed:\n{installed.stderr}"
    out = short_tmpdir("bench")
    done = subprocess.run(
        [PYTHON, str(BENCHMARKS / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
        check=False,
    )
    yield done, out
    shutil.rmtree(out, ignore_errors=True)


def test_run_all_quick_succeeds(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = quick_run
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert (out / "results.md").read_text() in done.stdout


def test_results_json_has_every_benchmark(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = quick_run
    report = json.loads((out / "results.json").read_text())
    assert report["mode"] == "quick"
    assert report["failures"] == []
    rows = report["rows"]
    assert {row["bench"] for row in rows} == RUN_ALL
    for row in rows:
        assert set(row) == ROW_KEYS
        for side in ("a", "b"):
            assert isinstance(row[side], float), row
            assert row[side] > 0, row
        assert math.isclose(row["ratio"], row["a"] / row["b"], rel_tol=1e-9), row
        assert isinstance(row["met"], bool)
        assert row["target"]
    throughput = [row for row in rows if row["unit"] == "req/s"]
    assert len(throughput) >= 6
    for row in throughput:
        for measured in row["rounds"]:
            for side in ("a", "b"):
                assert measured[f"{side}_errors"] == 0, row
                assert measured[f"{side}_requests"] > 0, row


def test_results_markdown_table(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = quick_run
    lines = (out / "results.md").read_text().splitlines()
    assert lines[2] == "| | Measure | A | B | A/B | Target | Met |"
    body = [line for line in lines[4:] if line.startswith("| ")]
    assert {line.split("|")[1].strip() for line in body} == RUN_ALL
    assert all(line.count("|") == 8 for line in body)
    assert not any("could not run" in line for line in body)


def test_against_revision_compares_two_checkouts() -> None:
    """(g) checks out a revision in a temporary worktree and runs its server beside this tree's."""
    require_tool("git")
    done = subprocess.run(
        [
            PYTHON,
            str(BENCHMARKS / "against_revision.py"),
            "--rev",
            "HEAD",
            "--rounds",
            "1",
            "--duration",
            "0.5",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(row) == ROW_KEYS
    assert (row["bench"], row["b_label"]) == ("g", "HEAD")
    assert row["a"] > 0, row
    assert row["b"] > 0, row
    assert [(r["a_errors"], r["b_errors"]) for r in row["rounds"]] == [(0, 0)]
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True
    )
    assert "ub-rev-" not in listed.stdout, "the temporary worktree was left behind"
