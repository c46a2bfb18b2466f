"""The order files run in. ``scripts/test`` spreads whole files over pytest-xdist workers in this
order (``--dist loadfile --no-loadscope-reorder``), the longest first, so that no long file starts
last and keeps one worker busy while the others have finished. A file's length is its seconds in
tests/file_seconds.json (refresh it with ``pytest --write-file-seconds tests/file_seconds.json``
after adding or changing a long file); a file not listed there goes first if it has a test marked
``slow``, last otherwise.

Every test must have a node id of its own: pytest-xdist runs tests by id, so tests sharing one would
run once for all of them (pytest 9.2 names schemathesis's per-operation tests so, hence its pin in
pyproject.toml).

The two files that play a pod (their pods share volume names, tests/containers/conftest.py) go one
first and one last, so that neither waits for the other.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest

PLAYS_A_POD = ("test_pod_e2e.py", "test_deployment.py")
FILE_SECONDS = Path(__file__).with_name("file_seconds.json")
ROOT = Path(__file__).parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--write-file-seconds",
        metavar="PATH",
        help="write each test file's seconds (setup, call and teardown of its tests) to PATH as JSON",
    )


def _sort_key(item: pytest.Item, seconds: dict[str, float], slow: set[str]) -> tuple[int, float]:
    name = item.path.name
    if name == PLAYS_A_POD[0]:
        return (0, 0.0)
    if name == PLAYS_A_POD[1]:
        return (2, 0.0)
    path = item.path.relative_to(ROOT).as_posix()
    if path in seconds:
        return (1, -seconds[path])
    return (1, -math.inf if path in slow else 0.0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    shared = sorted(nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1)
    if shared:
        raise pytest.UsageError(f"tests share a node id, so pytest-xdist would run one of each: {shared}")
    seconds = json.loads(FILE_SECONDS.read_text(encoding="utf-8"))
    slow = {item.path.relative_to(ROOT).as_posix() for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: _sort_key(item, seconds, slow))  # stable: each file's tests keep their order


_file_seconds: defaultdict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _file_seconds[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--write-file-seconds")
    if path and not hasattr(session.config, "workerinput"):  # the controller has every worker's reports
        ranked = sorted(_file_seconds.items(), key=lambda entry: -entry[1])
        table = {name: round(spent, 1) for name, spent in ranked}
        Path(path).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
