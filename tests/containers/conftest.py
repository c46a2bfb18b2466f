"""Podman tests that run at once (pytest-xdist workers, scripts/test) take turns where they would
collide: one image build at a time, and one pod at a time, since the pods share volume names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.containers.podman import taking_turns

PODS = ("test_pod_e2e.py", "test_deployment.py")


@pytest.fixture(scope="module", autouse=True)
def one_pod_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Held by a file that plays a pod from before its first fixture until after its last."""
    if request.node.path.name not in PODS:
        yield
        return
    with taking_turns("pod"):
        yield
