"""k8s/deployment.yaml, played by podman as far as podman 4.3 plays a Deployment.

The module fixture builds the images (scripts/build-images, cached as in test_pod_e2e.py), plays
all three documents of the manifest once with --network none, changed only where podman 4.3 cannot
follow it (see ``for_podman``), and waits, with a deadline, for the client's round trip. The last
test runs `podman kube down` and checks that nothing is left; the fixture tears down in any case.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.containers.podman import build_images, exists, logs, ok, play, podman, tear_down
from tests.support import ROOT, short_tmpdir, wait_until

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(900)]

MANIFEST = ROOT / "k8s" / "deployment.yaml"
# podman names the Pods of a Deployment NAME-pod-0, NAME-pod-1, ... and their containers POD-CONTAINER.
POD = "uds-example-pod-0"
SERVER = f"{POD}-uds-server"
CLIENT = f"{POD}-uds-client"
VOLUMES = ("csi-socket", "state")
DEMO_LINES = {
    SERVER: ["🔌 Server listening on /csi/csi.sock", "📩 Server received: Hello from client"],
    CLIENT: ["📥 Client received: Hello from server via UDS"],
}
METRICS = "http://127.0.0.1:9102"

Spec = dict[str, Any]


def for_podman(text: str) -> list[Spec]:
    """The manifest's documents as podman 4.3 can play them; two changes to the Deployment only.

    - ``replicas: 1``. podman makes one Pod per replica, but turns each emptyDir into a named
      volume, one per name, that all of them share: a second server would find the first one's
      live socket in ``csi-socket`` (and its database in ``state``), refuse to start and crash-loop.
    - No container ``ports``. podman 4.3 publishes every containerPort on the host's port of the
      same number, which ``--network none`` refuses (and which a second replica, or anything else
      on that host port, would make fail). In a cluster the port only names 9102 for Prometheus;
      the server listens there all the same (``UDS_METRICS_LISTEN``), on the Pod's own network.

    The ConfigMap stays in (podman mounts it as the policy file, as the kubelet does); the
    PodDisruptionBudget and the NetworkPolicy too: podman skips kinds it does not play.
    """
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    deployment["spec"]["replicas"] = 1
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        container.pop("ports", None)
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "PodDisruptionBudget", "NetworkPolicy"]
    return docs


@pytest.fixture(scope="module")
def played() -> Iterator[Path]:
    """The Deployment's one Pod running, the client's round trip done; yields the played file."""
    build_images()
    directory = short_tmpdir("deploy")
    manifest = directory / "deployment.yaml"
    manifest.write_text(yaml.safe_dump_all(for_podman(MANIFEST.read_text(encoding="utf-8"))))
    tear_down(POD, manifest, VOLUMES)
    try:
        play(manifest, SERVER, CLIENT, DEMO_LINES[CLIENT][0])
        yield manifest
    finally:
        tear_down(POD, manifest, VOLUMES)
        shutil.rmtree(directory, ignore_errors=True)


def test_podman_plays_one_pod_of_both_containers(played: Path) -> None:
    pods = ok("pod", "ps", "--format", "{{.Name}}", "--filter", "name=^uds-example-pod-").split()
    assert pods == [POD]
    names = ok("ps", "--format", "{{.Names}}", "--filter", f"pod={POD}").split()
    assert {SERVER, CLIENT} <= set(names), names


def test_logs_show_the_three_demo_lines(played: Path) -> None:
    for container, expected in DEMO_LINES.items():
        lines = logs(container)
        for line in expected:
            assert lines.count(line) == 1, f"{container}: {line!r} not once in:\n" + "\n".join(lines)
    server = logs(SERVER)
    assert server.index(DEMO_LINES[SERVER][0]) < server.index(DEMO_LINES[SERVER][1])


def mounts(container: str) -> dict[str, str]:
    """Destination -> volume name of a container's named volumes."""
    found = json.loads(ok("inspect", "--format", "{{json .Mounts}}", container))
    return {m["Destination"]: m.get("Name", "") for m in found}


def test_state_volume_is_the_servers_alone(played: Path) -> None:
    assert mounts(SERVER) == {
        "/csi": "csi-socket",
        "/var/lib/uds-example": "state",
        "/etc/uds-example": "uds-example",  # the ConfigMap's policy, read-only
    }
    assert mounts(CLIENT) == {"/csi": "csi-socket"}
    # The server (uid 10001) can write there, with the root filesystem read-only.
    done = podman("exec", SERVER, "sh", "-c", "test -w /var/lib/uds-example && ! test -w /")
    assert done.returncode == 0, done.stderr


def test_the_configmap_policy_is_in_force(played: Path) -> None:
    """The client container (uid 10002) holds the scopes the ConfigMap's policy grants it."""
    done = podman("exec", CLIENT, "uds-client", "whoami", "--json")
    assert done.returncode == 0, done.stderr
    me = json.loads(done.stdout)
    assert me["uid"] == 10002
    assert sorted(me["scopes"]) == ["events", "read", "write"]


# From the client container: another process on the Pod's network, as Prometheus is from outside.
FETCH = """
import sys, urllib.error, urllib.request
url, method = sys.argv[1:]
request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
try:
    with urllib.request.urlopen(request, timeout=5) as answer:
        print(answer.status, answer.headers.get("content-type", ""))
        print(answer.read().decode())
except urllib.error.HTTPError as error:
    print(error.code, error.headers.get("content-type", ""))
except urllib.error.URLError as error:
    print(0, error.reason)
"""


def fetch(path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of METHOD METRICS+PATH, sent from inside the Pod."""
    head, _, body = ok("exec", CLIENT, "python", "-c", FETCH, METRICS + path, method).partition("\n")
    status, _, content_type = head.partition(" ")
    if status == "0":
        raise ConnectionError(f"{method} {METRICS}{path} from {CLIENT}: {content_type}")
    return int(status), content_type, body


def test_metrics_port_serves_metrics_and_nothing_else(played: Path) -> None:
    status, content_type, body = wait_until(
        lambda: fetch("/metrics"), timeout=30, interval=0.2, what="/metrics on port 9102 in the Pod"
    )
    assert status == 200
    assert content_type.startswith("text/plain"), content_type
    # The client's POST /messages is counted.
    counted = [line for line in body.splitlines() if line.startswith("uds_requests_total{")]
    assert any('method="POST"' in line and "/messages" in line for line in counted), body
    # The API stays on the socket.
    assert fetch("/messages", "POST")[0] == 404
    assert fetch("/v1/messages")[0] == 404


def test_kube_down_leaves_nothing(played: Path) -> None:
    ok("kube", "down", str(played))
    assert not exists("pod", POD)
    for container in (SERVER, CLIENT):
        assert not exists("container", container)
    for volume in VOLUMES:
        assert not exists("volume", volume), volume
