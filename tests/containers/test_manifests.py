"""Static proof for the Kubernetes manifests in k8s/: schema-valid, hardened, consistent with the images.

Every manifest passes ``kubernetes-validate --strict`` for the oldest and newest Kubernetes we
support; the security design (0660 socket, shared group, different uids) is checked field by field,
and the container args are parsed by the real ``uds-server`` and ``uds-client`` parsers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.__main__ import build_parser as server_parser
from app.config import Settings
from client.address import DEFAULT_ADDRESS
from client.cli import build_parser as client_parser
from tests.support import ROOT

K8S = ROOT / "k8s"
POD = K8S / "pod.yaml"
SIDECAR = K8S / "pod-native-sidecar.yaml"
MANIFESTS = [POD, SIDECAR]
KUBERNETES_VERSIONS = ["1.30", "1.33"]
SHARED_GID = 10000

Spec = dict[str, Any]


def load(path: Path) -> Spec:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one Pod, found {len(docs)} documents"
    doc: Spec = docs[0]
    return doc


def containers(pod: Spec) -> dict[str, Spec]:
    """Every container of the Pod (init containers included), by name."""
    spec = pod["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec.get("containers", [])]}


def kubernetes_validate() -> str:
    found = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    assert Path(found).exists(), "kubernetes-validate is not installed; pip install '.[test]'"
    return found


def env_of(container: Spec) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def server_settings(container: Spec) -> Settings:
    """The Settings uds-server would run with: the manifest's env and args through the real parser."""
    args = server_parser().parse_args(container.get("args", []))
    flags = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    return Settings.from_env(env_of(container), **flags)


@pytest.fixture(params=MANIFESTS, ids=lambda p: p.name)
def pod(request: pytest.FixtureRequest) -> Spec:
    return load(request.param)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_validate_strict(manifest: Path, version: str) -> None:
    result = subprocess.run(
        [kubernetes_validate(), "--strict", "-k", version, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"passed for resource pod/uds-demo against version {version}" in output, output


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The check above has teeth: a misspelt field fails --strict."""
    import kubernetes_validate as kv

    bad = load(POD)
    bad["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.30", strict=True)


def test_pod_names_labels_and_volume(pod: Spec) -> None:
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["name"] == "uds-demo"
    labels = pod["metadata"]["labels"]
    for key in ("name", "instance", "version", "component", "part-of"):
        assert labels.get(f"app.kubernetes.io/{key}"), f"missing label app.kubernetes.io/{key}"
    assert set(containers(pod)) == {"uds-server", "uds-client"}
    volumes = pod["spec"]["volumes"]
    assert volumes == [{"name": "csi-socket", "emptyDir": {"sizeLimit": "1Mi"}}]
    # Only the server may create, replace or remove entries in /csi; the client connects read-only.
    mounts = {name: c["volumeMounts"] for name, c in containers(pod).items()}
    assert mounts == {
        "uds-server": [{"name": "csi-socket", "mountPath": "/csi"}],
        "uds-client": [{"name": "csi-socket", "mountPath": "/csi", "readOnly": True}],
    }


def test_no_host_access_anywhere(pod: Spec) -> None:
    text = yaml.safe_dump(pod)
    for forbidden in ("hostPath", "hostNetwork", "hostPID", "hostIPC", "privileged: true", "hostPort"):
        assert forbidden not in text


def test_pod_security_context_shares_one_group(pod: Spec) -> None:
    spec = pod["spec"]
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsGroup"] == SHARED_GID
    assert sc["fsGroup"] == SHARED_GID
    assert SHARED_GID in sc["supplementalGroups"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Always"


def test_each_container_is_hardened_with_its_own_uid(pod: Spec) -> None:
    uids = []
    for name, c in containers(pod).items():
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc.get("privileged", False) is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["runAsUser"] > 0, name
        uids.append(sc["runAsUser"])
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, f"{name} {kind}"
    assert len(set(uids)) == len(uids), f"containers share a uid: {uids}"


def test_images_are_pinned(pod: Spec) -> None:
    for name, c in containers(pod).items():
        image = c["image"]
        assert re.fullmatch(r"[a-z0-9./-]+:\d+\.\d+\.\d+", image), f"{name}: image {image!r} is not pinned"
        assert c["imagePullPolicy"] == "IfNotPresent", name


def test_server_serves_the_shared_socket_for_the_group(pod: Spec) -> None:
    server = containers(pod)["uds-server"]
    settings = server_settings(server)
    assert env_of(server)["UDS_SOCKET"] == DEFAULT_ADDRESS
    assert settings.socket == "/csi/csi.sock"
    assert settings.socket_mode == 0o660
    assert settings.socket_group == SHARED_GID
    assert settings.allow_gid == (SHARED_GID,)
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.shutdown_timeout


def test_server_probes_exec_uds_client_health(pod: Spec) -> None:
    server = containers(pod)["uds-server"]
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    probes = {kind: server[kind]["exec"]["command"] for kind in kinds}
    assert probes == {
        "startupProbe": ["uds-client", "health"],
        "readinessProbe": ["uds-client", "health", "--ready"],
        "livenessProbe": ["uds-client", "health"],
    }
    for kind in probes:
        # The probe's own argv must parse, and its timeout must leave room for Python to start.
        client_parser("health").parse_args(server[kind]["exec"]["command"][1:])
        assert server[kind]["timeoutSeconds"] >= 2, kind


def test_client_sends_the_demo_message_and_stays_up(pod: Spec) -> None:
    client = containers(pod)["uds-client"]
    assert env_of(client)["UDS_SOCKET"] == DEFAULT_ADDRESS
    args = client_parser("send").parse_args(client["args"])
    assert args.command == "send"
    assert args.text == "Hello from client"
    assert args.wait > 0
    # It must not exit after the send, or restartPolicy Always would restart it forever.
    assert args.then_wait or args.every, "the client would exit and crash-loop"
    assert "livenessProbe" not in client
    assert client["readinessProbe"]["exec"]["command"] == ["uds-client", "health"]


def test_native_sidecar_runs_the_server_as_a_restartable_init_container() -> None:
    pod, sidecar = load(POD), load(SIDECAR)
    init = sidecar["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["uds-server"]
    assert init[0]["restartPolicy"] == "Always"
    assert "startupProbe" in init[0]
    assert [c["name"] for c in sidecar["spec"]["containers"]] == ["uds-client"]
    # Apart from where the server sits, the two manifests are the same Pod.
    server = dict(init[0])
    del server["restartPolicy"]
    assert server == containers(pod)["uds-server"]
    assert sidecar["spec"]["containers"][0] == containers(pod)["uds-client"]
    for key in set(pod["spec"]) | set(sidecar["spec"]):
        if key not in ("containers", "initContainers"):
            assert sidecar["spec"].get(key) == pod["spec"].get(key), key
    assert sidecar["metadata"] == pod["metadata"]


@pytest.mark.parametrize(
    ("dockerfile", "name"), [("Dockerfile.server", "uds-server"), ("Dockerfile.client", "uds-client")]
)
def test_image_user_matches_the_manifest(dockerfile: str, name: str) -> None:
    """The image's USER is what the Pod runs as, so `docker run` behaves like the Pod."""
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", (ROOT / dockerfile).read_text(), re.MULTILINE)
    assert len(users) == 1, users
    uid, gid = map(int, users[0])
    pod = load(POD)
    assert containers(pod)[name]["securityContext"]["runAsUser"] == uid
    assert pod["spec"]["securityContext"]["runAsGroup"] == gid
