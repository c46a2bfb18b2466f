"""The order files run in. ``scripts/test`` spreads whole files over pytest-xdist workers in this
order (``--dist loadfile --no-loadscope-reorder``): files with a test marked ``slow`` start first, so
that no long file starts last and keeps one worker busy while the others have finished.

Every test must have a node id of its own: pytest-xdist runs tests by id, so tests sharing one would
run once for all of them (pytest 9.2 names schemathesis's per-operation tests so, hence its pin in
pyproject.toml).

The two files that play a pod (their pods share volume names, tests/containers/conftest.py) go one
first and one last, so that neither waits for the other.
"""

from __future__ import annotations

from collections import Counter

import pytest

PLAYS_A_POD = ("test_pod_e2e.py", "test_deployment.py")


def _rank(item: pytest.Item, slow: set[str]) -> int:
    name = item.path.name
    if name == PLAYS_A_POD[0]:
        return 0
    if name == PLAYS_A_POD[1]:
        return 3
    return 1 if str(item.path) in slow else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    shared = sorted(nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1)
    if shared:
        raise pytest.UsageError(f"tests share a node id, so pytest-xdist would run one of each: {shared}")
    slow = {str(item.path) for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: _rank(item, slow))  # stable: each file's tests keep their order
