"""SIGHUP asks for a reload (policy file, audit log); at no moment of the start may it kill the server.

Its default action ends the process, and the handler is set only once the server runs: a
``logrotate`` postrotate or ``systemctl reload`` that meets a (re)starting server killed it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from client import ConnectError
from tests.support import PYTHON, ROOT, ServerProcess, short_tmpdir, socket_accepts

_MAIN_THEN_SHOW = """
import signal, sys
from app.__main__ import main
code = main(sys.argv[1:])
print(code, signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)
"""


def test_main_ignores_sighup_before_it_reads_anything() -> None:
    """A start that stops early (here: a missing policy file) has SIGHUP ignored from main() on."""
    shown = subprocess.run(
        [PYTHON, "-c", _MAIN_THEN_SHOW, "--policy", "/nonexistent/policy.toml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert shown.stdout.split() == ["2", "True"], shown.stdout + shown.stderr


def _handles_hangup(pid: int) -> bool:
    """Whether process ``pid`` ignores or catches SIGHUP (``SigIgn``/``SigCgt`` in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    masks = {name: int(fields[name], 16) for name in ("SigIgn", "SigCgt")}
    bit = 1 << (signal.SIGHUP - 1)
    return bool((masks["SigIgn"] | masks["SigCgt"]) & bit)


def test_a_sighup_storm_during_the_start_never_kills_the_server() -> None:
    """From the moment ``uds-server`` runs its own code (SIGHUP no longer default) until its two
    workers serve, a SIGHUP every millisecond or so: it serves, and stops cleanly."""
    directory = short_tmpdir("hup")
    path = str(directory / "s.sock")
    with ServerProcess(["--socket", path, "--workers", "2"], socket_path=path) as server:
        pid = server.proc.pid
        sent = 0
        deadline = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                if _handles_hangup(pid):
                    server.signal(signal.SIGHUP)
                    sent += 1
                    if sent % 20 == 0 and Path(path).exists() and socket_accepts(path):
                        break
            except (OSError, AssertionError, ConnectError):
                pass  # not serving yet (the probe times out while the workers start)
            time.sleep(0.001)
        assert server.proc.poll() is None, (
            f"killed by SIGHUP during the start ({sent} sent):\n{server.output}"
        )
        server.wait_ready()
        assert server.stop() == 0, server.output
