"""benchmarks/policy.py (m) runs end to end in process and writes well-formed rows (no speed asserted)."""

from __future__ import annotations

import json
import subprocess

from tests.support import PYTHON, ROOT


def test_policy_benchmark_in_process_rows() -> None:
    done = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "policy.py"), "--quick", "--in-process-only"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["bench"] for row in rows] == ["m"] * 4
    check, audit, policy, both = rows
    assert check["unit"] == audit["unit"] == "us"
    assert check["a"] > 0
    assert audit["a"] > 0
    assert 0 < audit["ratio"] < 1  # an audit line against a whole POST
    for row in (policy, both):
        assert row["a"] > 0
        assert row["b"] > 0
        assert row["rounds"]
