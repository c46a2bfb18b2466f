"""(e) One-shot commands, wall time from exec to exit, as a Pod runs them: ``uds-client health``
and ``send`` against ``curl --unix-socket`` doing the same request, and what importing ``Client``
(the httpx2 stack) adds to a Python start. Interleaved runs, medians.

The commands run from a regular install: the project installed (not editable) into its own venv
under ``.cache/``, with its dependencies and no test extras, like the client image. The test
extras pull in trio, which httpcore2 imports when present (~45 ms), and an editable install adds
an import hook; neither is on a node. ``--quick`` uses the development venv instead (no install).
"""

from __future__ import annotations

import hashlib
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _common import BIN, BODY, ROOT, BenchError, Row, main_for, median, servers

REGULAR_VENV = ROOT / ".cache" / "bench-regular-venv"


def wall(command: Sequence[str], cpu: list[float] | None = None) -> float:
    """Seconds from exec to exit; the child's own CPU seconds (user + system) go to ``cpu``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, timeout=30
    )
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if result.returncode != 0:
        raise BenchError(
            f"{command[0]} exited with {result.returncode}: {result.stderr.decode().strip()[-200:]}"
        )
    return elapsed


def _source_digest() -> str:
    digest = hashlib.sha256()
    files = [ROOT / "pyproject.toml", *sorted((ROOT / "client").rglob("*.py"))]
    for path in [*files, *sorted((ROOT / "app").rglob("*.py"))]:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def regular_install() -> Path:
    """The ``bin`` directory of a regular (non-editable) install of this tree, rebuilt when it changed."""
    stamp = REGULAR_VENV / "installed-from"
    digest = _source_digest()
    if stamp.exists() and stamp.read_text() == digest:
        return REGULAR_VENV / "bin"
    shutil.rmtree(REGULAR_VENV, ignore_errors=True)
    venv_python = REGULAR_VENV / "bin" / "python"
    steps = [
        [str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", str(REGULAR_VENV)],
        [str(venv_python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, check=False, timeout=600)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"building the regular install failed at {' '.join(step[:3])}: {last}")
    stamp.write_text(digest)
    return REGULAR_VENV / "bin"


def run(quick: bool) -> list[Row]:
    runs = 1 if quick else 21
    curl = shutil.which("curl")
    if curl is None:
        raise BenchError("curl is needed: apt-get install curl")
    bin_dir = BIN if quick else regular_install()
    where = "development venv" if quick else "regular install"
    cli = str(bin_dir / "uds-client")
    python = str(bin_dir / "python")
    with servers(("ours", False)) as (server,):
        path = str(server.socket)
        commands = {
            "curl health": [curl, "-sf", "--unix-socket", path, "http://localhost/healthz"],
            "uds-client health": [cli, "--socket", path, "health"],
            "curl send": [
                curl,
                "-sf",
                "--unix-socket",
                path,
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                BODY,
                "http://localhost/messages",
            ],
            "uds-client send": [cli, "--socket", path, "send", "Hello from client"],
            "import client": [python, "-c", "import client"],
            "import Client": [python, "-c", "from client import Client"],
        }
        for command in commands.values():
            wall(command)  # page cache and bytecode warm, as on a node that runs the probe every few seconds
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for index in range(runs):
            order = list(commands.items())
            for name, command in order if index % 2 == 0 else reversed(order):
                times[name].append(wall(command, cpu[name]))
    health, curl_health = median(times["uds-client health"]), median(times["curl health"])
    send, curl_send = median(times["uds-client send"]), median(times["curl send"])
    full, bare = median(times["import Client"]), median(times["import client"])
    send_cpu, curl_send_cpu = median(cpu["uds-client send"]), median(cpu["curl send"])
    rounds = [
        {k: v[i] for k, v in times.items()} | {f"{k} cpu": v[i] for k, v in cpu.items()} for i in range(runs)
    ]
    return [
        Row(
            "e",
            f"one-shot health check, wall time ({where})",
            "uds-client health",
            health,
            "curl --unix-socket",
            curl_health,
            "s",
            health / curl_health,
            "<= 5x curl",
            health / curl_health <= 5,
            rounds,
        ),
        Row(
            "e",
            f"one-shot send through Client (httpx2), wall time ({where})",
            "uds-client send",
            send,
            "curl --unix-socket",
            curl_send,
            "s",
            send / curl_send,
            "<= 0.12 s",
            send <= 0.12,
            [],
        ),
        Row(
            "e",
            f"the same, CPU time of the process (user + system) ({where})",
            "uds-client send",
            send_cpu,
            "curl --unix-socket",
            curl_send_cpu,
            "s",
            send_cpu / curl_send_cpu,
            "reported",
            True,
            [],
        ),
        Row(
            "e",
            f"python -c 'from client import Client' vs 'import client' ({where}): the httpx2 stack",
            "import Client",
            full,
            "import client",
            bare,
            "s",
            full / bare,
            "reported",
            True,
            [],
        ),
    ]


if __name__ == "__main__":
    main_for(run)
