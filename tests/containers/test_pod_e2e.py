"""The uds-demo Pod, run for real: podman builds both images from this repo and plays k8s/pod.yaml.

The module fixture configures podman (scripts/podman-setup), builds the base image and both images
(scripts/build-images: cached, offline inside the build), removes any leftover Pod, plays the
manifest unchanged with --network none (the Pod needs only its socket) and waits, with a deadline,
for the client's round trip. One test kills the server's process and checks that podman restarts it
with its history; the last one stops the Pod and checks that `podman kube down` leaves nothing
behind; the fixture tears down in any case. Fails, never skips, without podman.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.containers.podman import build_images, exists, logs, ok, play, podman, tear_down
from tests.support import ROOT, short_tmpdir, wait_until

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(900)]

MANIFEST = ROOT / "k8s" / "pod.yaml"
POD = "uds-demo"
SERVER = f"{POD}-uds-server"
CLIENT = f"{POD}-uds-client"
# podman 4.3 turns each emptyDir into a named volume of that name.
VOLUMES = ("csi-socket", "state")
BASE_IMAGE = "localhost/uds-example-base:bookworm-python3.11"
SERVER_LINES = ("🔌 Server listening on /csi/csi.sock", "📩 Server received: Hello from client")
CLIENT_LINE = "📥 Client received: Hello from server via UDS"


@pytest.fixture(scope="module")
def images() -> None:
    """podman configured, the base image and both images built (cached between runs)."""
    build_images()


@pytest.fixture(scope="module")
def pod(images: None) -> Iterator[None]:
    tear_down(POD, MANIFEST, VOLUMES)
    try:
        play(MANIFEST, SERVER, CLIENT, CLIENT_LINE)
        yield
    finally:
        tear_down(POD, MANIFEST, VOLUMES)


def exec_in(container: str, *argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    return podman("exec", *(["--user", user] if user else []), container, *argv)


def test_server_logs_show_listening_and_received(pod: None) -> None:
    lines = logs(SERVER)
    for expected in SERVER_LINES:
        assert expected in lines, "\n".join(lines)
    assert lines.index(SERVER_LINES[0]) < lines.index(SERVER_LINES[1])


def test_client_log_shows_the_reply(pod: None) -> None:
    lines = logs(CLIENT)
    assert lines.count(CLIENT_LINE) == 1, "\n".join(lines)
    # --then-wait: the client stays up after its send instead of exiting into a restart loop.
    state = ok("inspect", "--format", "{{.State.Status}} {{.RestartCount}}", CLIENT).split()
    assert state == ["running", "0"]


def test_socket_has_the_intended_mode_owner_and_group(pod: None) -> None:
    stat = ok("exec", SERVER, "stat", "-c", "%a %u %g %F", "/csi/csi.sock").strip()
    assert stat == "660 10001 10000 socket"
    # Each container runs as its own uid, sharing only the group.
    assert ok("exec", SERVER, "id", "-u").strip() == "10001"
    assert ok("exec", CLIENT, "id", "-u").strip() == "10002"
    for container in (SERVER, CLIENT):
        assert ok("exec", container, "id", "-g").strip() == "10000"


def test_probes_pass(pod: None) -> None:
    for container, argv in (
        (SERVER, ["uds-client", "health"]),
        (SERVER, ["uds-client", "health", "--ready"]),
        (CLIENT, ["uds-client", "health"]),
    ):
        result = exec_in(container, *argv)
        assert result.returncode == 0, f"{container}: {' '.join(argv)}: {result.stderr}"
        assert result.stdout == "", "a probe is quiet when healthy"
    # podman's own translation of the Pod's liveness probe runs as well.
    ok("healthcheck", "run", SERVER)


def test_containers_are_confined(pod: None) -> None:
    for container in (SERVER, CLIENT):
        assert ok("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", container).strip() == "true"
        write = exec_in(container, "touch", "/tmp/probe")
        assert write.returncode != 0
        assert "Read-only file system" in write.stderr
        proc_status = ok("exec", container, "cat", "/proc/1/status").splitlines()
        status = dict(line.split(":\t", 1) for line in proc_status if ":\t" in line)
        assert status["CapEff"].strip() == "0000000000000000", container
        assert status["NoNewPrivs"].strip() == "1", container
        assert status["Seccomp"].strip() == "2", container  # a seccomp filter is active
    assert ok("inspect", "--format", "{{.HostConfig.Memory}}", SERVER).strip() == str(128 * 1024 * 1024)


def test_only_the_shared_group_gets_in(pod: None) -> None:
    # Another uid outside group 10000: the 0660 socket refuses it before HTTP starts.
    outsider = exec_in(CLIENT, "uds-client", "health", user="10003:10003")
    assert outsider.returncode == 3, outsider.stderr
    assert "permission denied" in outsider.stderr
    # The socket's owner with the wrong gid may open the file, but the peer allowlist
    # (UDS_ALLOW_GID, from SO_PEERCRED) answers 403.
    wrong_gid = exec_in(SERVER, "uds-client", "send", "hi", user="10001:10003")
    assert wrong_gid.returncode == 1, wrong_gid.stderr
    assert "403" in wrong_gid.stderr
    # Another uid in the group is welcome.
    member = exec_in(CLIENT, "uds-client", "send", "Hello again", user="10003:10000")
    assert member.returncode == 0, member.stderr
    assert member.stdout.strip() == CLIENT_LINE


# Keyed POSTs through the client library in the client container; prints each stored message's id.
SEND_KEYED = """
import sys
from client import Client
with Client() as client:
    for key, text in zip(sys.argv[1::2], sys.argv[2::2]):
        print(client.send(text, idempotency_key=key).id)
"""


def send_keyed(keys: list[str], texts: list[str]) -> list[int]:
    argv = [word for pair in zip(keys, texts, strict=True) for word in pair]
    return [int(line) for line in ok("exec", CLIENT, "python", "-c", SEND_KEYED, *argv).split()]


def history() -> dict[int, str]:
    listed = json.loads(ok("exec", CLIENT, "uds-client", "messages", "--json"))
    return {m["id"]: m["text"] for m in listed["messages"]}


def test_a_killed_server_is_restarted_with_its_history(pod: None) -> None:
    """SIGKILL to the server's process, as the OOM killer sends it: podman restarts the container
    (restartPolicy: Always), and the history and the keys, in the `state` emptyDir, survive."""
    keys = [str(uuid.uuid4()) for _ in range(5)]
    texts = [f"kept across a crash {n}" for n in range(5)]
    ids = send_keyed(keys, texts)
    before = history()
    assert dict(zip(ids, texts, strict=True)).items() <= before.items()
    restarts = int(ok("inspect", "--format", "{{.RestartCount}}", SERVER))
    # From the host, by pid: `podman kill` marks the container as stopped by its user, so its
    # restart policy would not apply, and inside the container the kernel ignores a SIGKILL to PID 1.
    os.kill(int(ok("inspect", "--format", "{{.State.Pid}}", SERVER)), signal.SIGKILL)

    def serving_again() -> bool:
        status, count = ok("inspect", "--format", "{{.State.Status}} {{.RestartCount}}", SERVER).split()
        if status != "running" or int(count) <= restarts:
            return False
        return exec_in(SERVER, "uds-client", "health", "--ready").returncode == 0

    wait_until(serving_again, timeout=60, interval=0.2, what="podman to restart the server and it to serve")
    assert history() == before
    # Retrying each key answers with the message first stored for it, and stores nothing new.
    assert send_keyed(keys, texts) == ids
    assert history() == before
    assert logs(SERVER).count(SERVER_LINES[0]) == 2, "\n".join(logs(SERVER))
    client = ok("inspect", "--format", "{{.State.Status}} {{.RestartCount}}", CLIENT).split()
    assert client == ["running", "0"], "the client should be left alone"


def test_stop_and_kube_down_leave_nothing(pod: None) -> None:
    # SIGTERM reaches both entrypoints (exec form, PID 1): both exit 0 well within the grace period.
    ok("pod", "stop", "--time", "30", POD, timeout=60)
    for container in (SERVER, CLIENT):
        state = ok("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container).split()
        assert state == ["exited", "0"], f"{container}: {state}\n" + "\n".join(logs(container))
    ok("kube", "down", str(MANIFEST))
    assert not exists("pod", POD)
    for container in (SERVER, CLIENT):
        assert not exists("container", container)
    for volume in VOLUMES:
        assert not exists("volume", volume), volume
    assert ok("ps", "--all", "--quiet", "--filter", f"pod={POD}") == ""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def package_index(wheels: Path) -> Iterator[str]:
    """A PEP 503 "simple" index of ``wheels`` served over HTTP on 127.0.0.1; yields its URL."""
    root = short_tmpdir("index")
    files = root / "files"
    shutil.copytree(wheels, files, ignore=shutil.ignore_patterns(".*"))
    projects: dict[str, list[str]] = {}
    for wheel in sorted(files.glob("*.whl")):
        name = re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()
        projects.setdefault(name, []).append(wheel.name)
    for name, names in projects.items():
        page = root / "simple" / name / "index.html"
        page.parent.mkdir(parents=True)
        links = "".join(f'<a href="../../files/{html.escape(n)}">{html.escape(n)}</a>\n' for n in names)
        page.write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        shutil.rmtree(root, ignore_errors=True)


def test_client_image_builds_from_a_package_index_without_wheels(images: None) -> None:
    """The path a cluster build takes: no build/wheels in the context, packages from an index.

    The index serves the same wheels over HTTP (PIP_INDEX_URL), standing in for PyPI here.
    """
    context = short_tmpdir("context")
    tag = "localhost/uds-example-client:index-test"
    try:
        for name in ("pyproject.toml", ".dockerignore"):
            shutil.copy2(ROOT / name, context / name)
        for package in ("app", "client"):
            shutil.copytree(ROOT / package, context / package, ignore=shutil.ignore_patterns("__pycache__"))
        with package_index(ROOT / "build" / "wheels") as url:
            ok(
                "build",
                "--format",
                "docker",
                "--pull=never",
                "--network",
                "host",
                "--no-cache",
                "--build-arg",
                f"BASE_IMAGE={BASE_IMAGE}",
                "--build-arg",
                f"PIP_INDEX_URL={url}",
                "-f",
                str(ROOT / "Dockerfile.client"),
                "-t",
                tag,
                str(context),
                timeout=600,
            )
        version = ok("run", "--rm", "--network", "none", tag, "--version").strip()
        assert version.endswith("1.0.0"), version
        listing = ok(
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "ls",
            tag,
            "/opt/venv/lib/python3.11/site-packages",
        ).split()
        assert "httpx2" in listing
        assert "fastapi" not in listing
    finally:
        podman("rmi", "--force", tag)
        shutil.rmtree(context, ignore_errors=True)
