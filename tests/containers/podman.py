"""podman helpers shared by the container tests: run podman, build the images, play a manifest.

Not a test module: test_pod_e2e.py, test_deployment.py and test_client_image.py import it.
"""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import ROOT, require_tool, wait_until


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)


def ok(*args: str, timeout: float = 120) -> str:
    result = podman(*args, timeout=timeout)
    assert result.returncode == 0, f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def logs(container: str) -> list[str]:
    result = podman("logs", container)
    return (result.stdout + result.stderr).splitlines()


def exists(kind: str, name: str) -> bool:
    return podman(kind, "exists", name).returncode == 0


def run_script(name: str, *args: str, timeout: float) -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, f"scripts/{name} failed ({result.returncode}):\n{output}"


@contextmanager
def taking_turns(name: str) -> Iterator[None]:
    """Hold the machine-wide lock ``name`` (a file under /tmp) while in the block."""
    with open(f"/tmp/uds-example-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_images() -> None:
    """podman configured, the base image and both images built (cached between runs); one build
    at a time, as the files that need the images may run at once."""
    require_tool("podman")
    with taking_turns("build"):
        run_script("podman-setup", timeout=60)
        run_script("build-images", "--no-setup", timeout=800)


def tear_down(pod: str, manifest: Path, volumes: Iterable[str]) -> None:
    """``pod`` and its volumes gone, whatever state they were left in."""
    if exists("pod", pod):
        podman("kube", "down", str(manifest))
    if exists("pod", pod):
        podman("pod", "rm", "--force", pod)
    for volume in volumes:
        if exists("volume", volume):
            podman("volume", "rm", "--force", volume)


def play(manifest: Path, server: str, client: str, client_line: str) -> None:
    """``podman kube play --network none`` of ``manifest``, then wait, with a deadline, until the
    ``client`` container logs ``client_line``; a failure shows both containers' logs."""
    ok("kube", "play", "--network", "none", str(manifest))

    def client_done() -> bool:
        if client_line in logs(client):
            return True
        state = ok("inspect", "--format", "{{.State.Status}}", client).strip()
        assert state == "running", f"client container is {state}:\n" + "\n".join(logs(client))
        return False

    try:
        wait_until(client_done, timeout=90, interval=0.1, what="the client's round trip")
    except AssertionError as exc:
        shown = "".join(f"\n--- {c} ---\n" + "\n".join(logs(c)) for c in (server, client))
        raise AssertionError(f"{exc}{shown}") from None
