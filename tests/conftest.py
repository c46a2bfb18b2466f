"""The order files run in. ``scripts/test`` spreads whole files over pytest-xdist workers in this
order (``--dist loadfile --no-loadscope-reorder``), the longest first, so that no long file starts
last and keeps one worker busy while the others have finished. A file's length is its seconds in
tests/file_seconds.json (refresh it with ``pytest --write-file-seconds tests/file_seconds.json``
after adding or changing a long file); a file not listed there goes first if it has a test marked
``slow``, last otherwise.

Every test must have a node id of its own: pytest-xdist runs tests by id, so tests sharing one would
run once for all of them (pytest 9.2 names schemathesis's per-operation tests so, hence its pin in
pyproject.toml).

The two files that play a pod take turns (their pods share volume names, tests/containers/conftest.py):
one goes first, the other once the first has had its seconds to finish, so that neither waits.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import short_tmpdir

PLAYS_A_POD = ("test_pod_e2e.py", "test_deployment.py")
FILE_SECONDS = Path(__file__).with_name("file_seconds.json")
ROOT = Path(__file__).parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--write-file-seconds",
        metavar="PATH",
        help="write each test file's seconds (setup, call and teardown of its tests) to PATH as JSON",
    )


def _order(files: list[str], seconds: dict[str, float], slow: set[str]) -> list[str]:
    """Longest first; the first pod file before all, the second where the first has had its
    seconds to finish (the other workers have spent as long on the files before it), else last."""
    first, second = (f"tests/containers/{name}" for name in PLAYS_A_POD)
    both = first in files and second in files
    rest = sorted(
        (path for path in files if path != first and not (both and path == second)),
        key=lambda path: -seconds.get(path, math.inf if path in slow else 0.0),
    )
    order = [first] if first in files else []
    spent, placed = 0.0, not both
    for path in rest:
        if not placed and first in seconds and spent >= seconds[first]:
            order.append(second)
            placed = True
        order.append(path)
        spent += seconds.get(path, 0.0)
    return order if placed else [*order, second]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    shared = sorted(nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1)
    if shared:
        raise pytest.UsageError(f"tests share a node id, so pytest-xdist would run one of each: {shared}")
    seconds = json.loads(FILE_SECONDS.read_text(encoding="utf-8"))
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:  # each file's tests keep their order
        by_file.setdefault(item.path.relative_to(ROOT).as_posix(), []).append(item)
    slow = {path for path, tests in by_file.items() if any(test.get_closest_marker("slow") for test in tests)}
    items[:] = [item for path in _order(list(by_file), seconds, slow) for item in by_file[path]]


_file_seconds: defaultdict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _file_seconds[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--write-file-seconds")
    if path and not hasattr(session.config, "workerinput"):  # the controller has every worker's reports
        ranked = sorted(_file_seconds.items(), key=lambda entry: -entry[1])
        table = {name: round(spent, 1) for name, spent in ranked}
        Path(path).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A short temp directory for the sockets of one test (AF_UNIX paths stay under 107 bytes)."""
    directory = short_tmpdir("uds")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
