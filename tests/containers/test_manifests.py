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


def validate_strict(manifest: Path, version: str) -> str:
    """``kubernetes-validate --strict`` of ``manifest`` against ``version``, which must pass; its output."""
    result = subprocess.run(
        [kubernetes_validate(), "--strict", "-k", version, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


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
    output = validate_strict(manifest, version)
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
    assert volumes == [
        {"name": "csi-socket", "emptyDir": {"sizeLimit": "1Mi"}},
        {"name": "state", "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    # Only the server may create, replace or remove entries in /csi; the client connects read-only
    # and never sees the server's store.
    mounts = {name: c["volumeMounts"] for name, c in containers(pod).items()}
    assert mounts == {
        "uds-server": [
            {"name": "csi-socket", "mountPath": "/csi"},
            {"name": "state", "mountPath": server_settings(containers(pod)["uds-server"]).data_dir},
        ],
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


# --- k8s/deployment.yaml: many Pods of the same pair -------------------------------------------

DEPLOYMENT = K8S / "deployment.yaml"
METRICS_PORT = 9102
POLICY_DIR = "/etc/uds-example"
DEPLOYMENT_KINDS = ["ConfigMap", "Deployment", "PodDisruptionBudget", "NetworkPolicy"]


def documents(path: Path) -> dict[str, Spec]:
    """The manifest's documents by kind (each kind once)."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), f"{path.name}: a kind appears twice: {kinds}"
    return {d["kind"]: d for d in docs}


def pod_template(path: Path) -> Spec:
    """The Pod a manifest describes: the Pod itself, or the Deployment's template."""
    if path == DEPLOYMENT:
        template: Spec = documents(path)["Deployment"]["spec"]["template"]
        return template
    return load(path)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_deployment_passes_kubernetes_validate_strict(version: str) -> None:
    output = validate_strict(DEPLOYMENT, version)
    for kind in DEPLOYMENT_KINDS:
        assert f"passed for resource {kind.lower()}/uds-example against version {version}" in output, output


def test_deployment_selects_its_own_pods_and_not_the_demo_pod() -> None:
    docs = documents(DEPLOYMENT)
    assert list(docs) == DEPLOYMENT_KINDS
    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert not selector.items() <= load(POD)["metadata"]["labels"].items(), "it would adopt uds-demo"
    assert docs["ConfigMap"]["metadata"]["labels"] == deployment["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        doc = docs[kind]
        assert doc["metadata"]["labels"] == deployment["metadata"]["labels"], kind
        chosen = doc["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
        assert chosen == {"matchLabels": selector}, kind
    # A drain may take one replica at a time, never all of them.
    budget = docs["PodDisruptionBudget"]["spec"]
    assert budget.keys() == {"maxUnavailable", "selector"}
    assert 1 <= budget["maxUnavailable"] < deployment["spec"]["replicas"]
    # A rollout starts the new Pod before it stops an old one.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_deployment_serves_metrics_where_prometheus_looks() -> None:
    template = pod_template(DEPLOYMENT)
    server = containers(template)["uds-server"]
    [port] = server["ports"]
    assert port == {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
    assert "hostPort" not in port
    settings = server_settings(server)
    assert settings.metrics_listen == f"0.0.0.0:{METRICS_PORT}"
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    assert "ports" not in containers(template)["uds-client"]


def test_deployment_reads_its_policy_from_the_configmap() -> None:
    from app.api.policy import parse_policy

    template = pod_template(DEPLOYMENT)
    server = containers(template)["uds-server"]
    settings = server_settings(server)
    assert settings.policy == f"{POLICY_DIR}/policy.toml"
    assert settings.allow_gid == ()  # the shorthand would grant every scope to the whole group
    text = documents(DEPLOYMENT)["ConfigMap"]["data"]["policy.toml"]
    policy = parse_policy(text.encode(), "policy.toml")  # the server's own parser: it would start
    client_uid = containers(template)["uds-client"]["securityContext"]["runAsUser"]
    server_uid = server["securityContext"]["runAsUser"]
    assert policy.scopes(client_uid, SHARED_GID) == {"read", "write", "events"}
    assert policy.scopes(server_uid, SHARED_GID) == {"read"}
    assert policy.scopes(4242, 4242) == set()


def test_network_policy_admits_only_the_metrics_port() -> None:
    spec = documents(DEPLOYMENT)["NetworkPolicy"]["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    # One ingress rule, for the named port and nothing else; no egress rule, so no egress at all.
    assert spec["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    assert "egress" not in spec


def test_state_volume_is_where_the_server_keeps_its_data() -> None:
    template = pod_template(DEPLOYMENT)
    server = containers(template)["uds-server"]
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["state"] == {"name": "state", "mountPath": server_settings(server).data_dir}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert set(volumes["state"]) == {"name", "emptyDir"}
    # Only the server sees the store; the client has the socket and nothing else.
    assert [m["name"] for m in containers(template)["uds-client"]["volumeMounts"]] == ["csi-socket"]


def test_the_private_state_emptydir_is_declared_so(pod: Spec) -> None:
    """An emptyDir is 0777, which the server refuses as a data directory unless told that only it
    can reach the directory: true here, as the state volume is mounted into the server alone."""
    server = containers(pod)["uds-server"]
    assert server_settings(server).data_dir_private is True
    users = [
        name for name, c in containers(pod).items() if any(m["name"] == "state" for m in c["volumeMounts"])
    ]
    assert users == ["uds-server"]
    assert "emptyDir" in {v["name"]: v for v in pod["spec"]["volumes"]}["state"]


# --- drift: one pair, three descriptions ------------------------------------------------------


# (labels, Pod spec without its containers, containers by name)
Pair = tuple[Spec, Spec, dict[str, Spec]]


def pair_without_allowed_differences(path: Path) -> Pair:
    """The pair as PATH describes it, minus what only that manifest may have.

    Each removal asserts its exact value, so the allowed differences are listed here and nowhere
    else; whatever is left must equal k8s/pod.yaml's.
    """
    template = pod_template(path)
    metadata = template["metadata"]
    labels = dict(metadata["labels"])
    spec = {k: v for k, v in template["spec"].items() if k not in ("containers", "initContainers")}
    pair = {name: dict(c) for name, c in containers(template).items()}
    if path == SIDECAR:
        # A native sidecar: the server is an init container that the kubelet keeps running.
        assert [c["name"] for c in template["spec"]["initContainers"]] == ["uds-server"]
        assert pair["uds-server"].pop("restartPolicy") == "Always"
    if path == DEPLOYMENT:
        # Its own instance, so that its selector leaves the demo Pod alone.
        assert labels.pop("app.kubernetes.io/instance") == "uds-example"
        # Only the Deployment serves metrics over TCP (with its NetworkPolicy). The demo Pods stay
        # without a port: podman 4.3 publishes every containerPort on the host, which the
        # `podman kube play --network none k8s/pod.yaml` of scripts/pod-demo refuses.
        assert set(metadata["annotations"]) == {f"prometheus.io/{k}" for k in ("scrape", "port", "path")}
        server = pair["uds-server"]
        assert server.pop("ports") == [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
        metrics_env = {"name": "UDS_METRICS_LISTEN", "value": f"0.0.0.0:{METRICS_PORT}"}
        assert metrics_env in server["env"]
        server["env"] = [e for e in server["env"] if e != metrics_env]
        # Per-scope rules from the ConfigMap replace pod.yaml's UDS_ALLOW_GID (which grants every
        # scope; test_deployment_reads_its_policy_from_the_configmap).
        mounts = server["volumeMounts"]
        assert mounts[-1] == {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True}
        server["volumeMounts"] = mounts[:-1]
        policy_env = {"name": "UDS_POLICY", "value": f"{POLICY_DIR}/policy.toml"}
        assert policy_env in server["env"]
        env = [e for e in server["env"] if e != policy_env]
        server["env"] = [*env[:1], {"name": "UDS_ALLOW_GID", "value": str(SHARED_GID)}, *env[1:]]
        assert spec["volumes"][-1] == {"name": "policy", "configMap": {"name": "uds-example"}}
        spec["volumes"] = spec["volumes"][:-1]
        # Replicas spread over nodes; one Pod has nothing to spread.
        assert spec.pop("topologySpreadConstraints")[0]["topologyKey"] == "kubernetes.io/hostname"
    else:
        labels.pop("app.kubernetes.io/instance")
        assert "annotations" not in metadata
    return labels, spec, pair


def differences(parts: Pair, want: Pair) -> list[str]:
    """The fields in which two descriptions of the pair differ: labels, spec.FIELD, CONTAINER.FIELD."""
    (labels, spec, pair), (want_labels, want_spec, want_pair) = parts, want
    found = [] if labels == want_labels else ["labels"]
    found += [f"spec.{k}" for k in sorted(set(spec) | set(want_spec)) if spec.get(k) != want_spec.get(k)]
    for name in sorted(set(pair) | set(want_pair)):
        mine, theirs = pair.get(name, {}), want_pair.get(name, {})
        found += [f"{name}.{k}" for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    return found


@pytest.mark.parametrize("manifest", [SIDECAR, DEPLOYMENT], ids=lambda p: p.name)
def test_the_pair_does_not_drift_between_manifests(manifest: Path) -> None:
    """Every field of both containers (image, args, env, mounts, securityContext, resources, probes,
    ports), the volumes and the other Pod-level settings equal pod.yaml's, but for the differences
    listed in pair_without_allowed_differences."""
    found = differences(pair_without_allowed_differences(manifest), pair_without_allowed_differences(POD))
    assert found == [], f"{manifest.name} differs from pod.yaml in {', '.join(found)}"


def test_drift_check_names_each_changed_field() -> None:
    """The comparison has teeth: one changed field, one new env entry, one new volume are each named."""
    pod = pair_without_allowed_differences(POD)
    labels, spec, pair = pair_without_allowed_differences(POD)
    pair["uds-server"]["resources"] = {"limits": {"memory": "256Mi"}}
    pair["uds-client"]["env"] = [*pair["uds-client"]["env"], {"name": "UDS_EXTRA", "value": "1"}]
    spec["volumes"] = [*spec["volumes"], {"name": "scratch", "emptyDir": {}}]
    found = differences((labels, spec, pair), pod)
    assert found == ["spec.volumes", "uds-client.env", "uds-server.resources"]
