"""The client image runs every ``uds-client`` command docs/api.md documents for it.

A real ``uds-server`` runs on this machine with its socket in a directory bind-mounted at /csi in
a client container (``--network none``, the image's own user 10002 in the socket's group 10000);
each command then runs in that container with ``podman exec``. The commands that need more than
the client (``docs``) fail there with a one-line usage error
that says so, as docs/api.md states. The images come from scripts/build-images, as in
test_pod_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.podman import build_images, ok, podman
from tests.support import ROOT, ServerProcess, short_tmpdir, wait_until

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(900)]

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"localhost/uds-example-client:{VERSION}"
CONTAINER = "uds-example-client-commands"
REPLY_LINE = "📥 Client received: Hello from server via UDS"


def uds_client(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return podman("exec", CONTAINER, "uds-client", *argv, timeout=timeout)


def succeeds(*argv: str) -> str:
    """``uds-client ARGV`` in the container: exit 0, nothing on stderr; returns stdout."""
    done = uds_client(*argv)
    assert done.returncode == 0, f"uds-client {' '.join(argv)} exited {done.returncode}: {done.stderr}"
    assert done.stderr == "", done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def box() -> Iterator[Path]:
    """A server on the host at DIR/csi.sock (group 10000, 0660) and an idle client container."""
    build_images()
    directory = short_tmpdir("cimg")
    os.chmod(directory, 0o711)  # the container's user may pass through, not list or write
    path = str(directory / "csi.sock")
    podman("rm", "--force", CONTAINER)
    with ServerProcess(["--socket", path, "--socket-group", "10000"], socket_path=path) as server:
        try:
            server.wait_ready()
            ok(
                "run",
                "--detach",
                "--rm",
                "--name",
                CONTAINER,
                "--network",
                "none",
                "--volume",
                f"{directory}:/csi",
                "--entrypoint",
                "sleep",
                IMAGE,
                "600",
            )
            yield directory
        finally:
            podman("rm", "--force", "--time", "0", CONTAINER)
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)


def test_the_image_holds_the_client_library_and_not_the_server(box: Path) -> None:
    check = (
        "import importlib.util, pkgutil, client, client.cli; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(client.__path__, 'client.') "
        "if not m.name.endswith('__main__')]; "
        "print(*(n for n in ('app', 'fastapi', 'starlette', 'uvicorn', 'pydantic') "
        "if importlib.util.find_spec(n)))"
    )
    done = podman("exec", CONTAINER, "python", "-c", check)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the client image carries server packages: {done.stdout}"


def test_help_and_version(box: Path) -> None:
    assert succeeds("--version").strip().endswith(VERSION)
    listed = succeeds("--help")
    for command in ("send", "messages", "version", "openapi", "get", "health", "proxy", "docs"):
        assert command in listed, command


def test_api_commands(box: Path) -> None:
    assert succeeds("send", "Hello from client").strip() == REPLY_LINE
    sent = json.loads(succeeds("send", "--json", "second"))
    assert sent["text"] == "second"
    assert "second" in succeeds("messages", "--limit", "1")
    assert json.loads(succeeds("messages", "--json"))["messages"][-1]["text"] == "second"
    assert json.loads(succeeds("version", "--json"))["app"] == VERSION
    assert json.loads(succeeds("openapi"))["paths"]
    succeeds("openapi", "--output", "/tmp/spec.json")
    assert json.loads(ok("exec", CONTAINER, "cat", "/tmp/spec.json"))["openapi"].startswith("3.")
    assert json.loads(succeeds("get", "/healthz")) == {"status": "ok"}


def test_probes(box: Path) -> None:
    assert succeeds("health") == ""
    assert succeeds("health", "--ready") == ""


def test_proxy_serves_the_api_on_loopback_and_stops_on_sigterm(box: Path) -> None:
    proxy = subprocess.Popen(
        ["podman", "exec", CONTAINER, "uds-client", "proxy", "--quiet", "--listen", "127.0.0.1:8080"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fetch = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/healthz').read().decode())"
    # SIGTERM to the proxy, found by its command line (processes may exit while /proc is read).
    term = (
        "import os, signal\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        line = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if b'/uds-client\\0proxy\\0' in line:\n"
        "        os.kill(int(pid), signal.SIGTERM)\n"
    )
    try:
        body = wait_until(
            lambda: ok("exec", CONTAINER, "python", "-c", fetch),
            timeout=15,
            interval=0.2,
            what="the proxy to answer inside the container",
        )
        assert json.loads(body) == {"status": "ok"}
        ok("exec", CONTAINER, "python", "-c", term)
        _, err = proxy.communicate(timeout=60)
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.communicate()
    assert proxy.returncode == 0, f"proxy exited {proxy.returncode}: {err}"


def test_a_command_that_needs_the_server_package_says_so(box: Path) -> None:
    """The docs export renders the server's pages: in the client image it says what is missing."""
    needs = "fastapi-offline"
    done = uds_client("docs", "--output", "/tmp/docs")
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("Error: "), line
    assert needs in line, line
