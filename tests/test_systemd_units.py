"""deploy/systemd: the units pass ``systemd-analyze verify`` and ``security``, hold what the Pod holds,
and their command line serves under systemd-socket-activate with a stand-in NOTIFY_SOCKET."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from benchmarks._spawn import ServerProcess as Spawned
from tests.support import ROOT, require_tool, short_tmpdir, wait_until

UNITS = ROOT / "deploy" / "systemd"
UDS_SERVER = str(Path(sys.executable).parent / "uds-server")
Unit = dict[str, dict[str, list[str]]]


def _parse(path: Path) -> Unit:
    """A unit file's ``[Section]`` -> key -> every value given, in order."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture
def tmp() -> Iterator[Path]:
    directory = short_tmpdir("us")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _copies(tmp: Path) -> tuple[Path, Path]:
    """The units with ExecStart pointing at this venv's uds-server (verify checks that it exists)."""
    service = (UNITS / "uds-example.service").read_text()
    assert "ExecStart=/opt/uds-example/bin/uds-server " in service
    (tmp / "uds-example.service").write_text(service.replace("/opt/uds-example/bin/uds-server", UDS_SERVER))
    shutil.copy(UNITS / "uds-example.socket", tmp)
    return tmp / "uds-example.socket", tmp / "uds-example.service"


def test_units_pass_systemd_analyze_verify(tmp: Path) -> None:
    """No error and no warning (an unknown key or a bad value is only a warning: any output fails)."""
    analyze = require_tool("systemd-analyze")
    units = _copies(tmp)
    done = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_service_is_hardened(tmp: Path) -> None:
    analyze = require_tool("systemd-analyze")
    _, service = _copies(tmp)
    done = subprocess.run(
        [analyze, "security", "--offline=true", str(service)], capture_output=True, text=True, check=False
    )
    found = re.search(r"Overall exposure level for uds-example\.service: ([0-9.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 1.0, done.stdout  # systemd rates 0-10; below 1.0 is its "SAFE"


def test_units_hold_what_the_pod_holds() -> None:
    sock = _parse(UNITS / "uds-example.socket")["Socket"]
    service = _parse(UNITS / "uds-example.service")["Service"]
    pod = yaml.safe_load((ROOT / "k8s" / "pod.yaml").read_text())
    server = next(c for c in pod["spec"]["containers"] if c["name"] == "uds-server")
    assert "--socket-mode=0660" in server["args"]
    assert sock["SocketMode"] == ["0660"]
    # The Pod's shared group (10000) is a named group on a host, made by the sysusers file.
    sysusers = (UNITS / "uds-example.sysusers").read_text().split("\n")
    assert f"g {sock['SocketGroup'][0]} -" in sysusers
    assert sock["ListenStream"][0].startswith("/run/")
    assert service["Type"] == ["notify"]
    assert service["DynamicUser"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert service["StateDirectory"] == ["uds-example"]
    assert "UDS_DATA_DIR=%S/uds-example" in service["Environment"]
    # The address the logs and a local uds-client name is the socket unit's.
    assert f"UDS_SOCKET=unix://{sock['ListenStream'][0]}" in service["Environment"]
    # The stop timeout covers the drain, as terminationGracePeriodSeconds does in the Pod.
    timeout = float(shlex.split(service["ExecStart"][0])[1].split("=")[1])
    assert timeout < float(service["TimeoutStopSec"][0]) == pod["spec"]["terminationGracePeriodSeconds"]


def test_the_units_command_serves_under_socket_activation(tmp: Path) -> None:
    """The service's ExecStart and Environment, run by systemd-socket-activate on the socket unit's
    mode: READY=1 reaches the stand-in NOTIFY_SOCKET and curl gets its answer."""
    activate = require_tool("systemd-socket-activate")
    curl = require_tool("curl")
    service = _parse(UNITS / "uds-example.service")["Service"]
    command = shlex.split(service["ExecStart"][0])
    command[0] = UDS_SERVER
    path = str(tmp / "csi.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    notify.settimeout(30)
    env = [value.replace("%S", str(tmp)) for value in service["Environment"]]
    env += [f"NOTIFY_SOCKET={tmp / 'notify'}", "PYTHONUNBUFFERED=1"]
    setenv = [arg for value in env for arg in ("-E", value)]
    log = (tmp / "out.log").open("wb")
    with notify, Spawned([activate, "--listen", path, *setenv, *command], socket=path, stdout=log) as server:
        # It logs this once the socket listens (a connection before it would be refused).
        wait_until(lambda: "Listening on" in (tmp / "out.log").read_text(), what="systemd-socket-activate")
        answer = subprocess.Popen(
            [curl, "-sS", "--unix-socket", path, "http://localhost/healthz"], stdout=subprocess.PIPE
        )
        ready = notify.recv(4096).decode().split("\n")
        assert "READY=1" in ready
        assert "STATUS=Serving on /" + path.lstrip("/") in ready
        assert json.loads(answer.communicate(timeout=30)[0])["status"] == "ok"
        assert server.stop() == 0
        assert "STOPPING=1" in notify.recv(4096).decode().split("\n")
    log.close()
    assert (tmp / "uds-example").is_dir()  # UDS_DATA_DIR=%S/uds-example: the state directory
    assert f"🔌 Server listening on {path}\n" in (tmp / "out.log").read_text()
