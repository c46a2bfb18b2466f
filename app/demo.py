"""``uds-demo``: the Pod in one process tree. Runs ``uds-server`` on a socket in a fresh temp directory
and ``uds-client send "Hello from client"`` once, prints both sides' lines as ``kubectl logs`` would,
stops the server with SIGTERM (it must exit 0). Exit 0 when all of that worked, else 1 and why."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import IO

from app.serving.spawn import ServerProcess, SpawnError, app_command, python_command

MESSAGE = "Hello from client"
RECEIVED = f"📩 Server received: {MESSAGE}"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


_PRINTING = threading.Lock()  # one child's line at a time: the two children's lines never mix


def _print(label: str, line: str) -> bool:
    """Print one labelled line; False once stdout's reader is gone (``| head``)."""
    try:
        with _PRINTING:
            print(f"[{label}] {line}", flush=True)
    except (BrokenPipeError, ValueError):
        return False
    return True


class _Lines(threading.Thread):
    """Print a child's output lines as they come, labelled; ``settled`` once :data:`RECEIVED` or the
    end of the output is seen, ``received`` whether it was the former."""

    def __init__(self, label: str, stream: IO[str]) -> None:
        super().__init__(daemon=True)
        self.label = label
        self.stream = stream
        self.received = False
        self.settled = threading.Event()
        self.start()

    def run(self) -> None:
        shown = True
        try:
            for raw in self.stream:
                line = raw.rstrip("\n")
                shown = shown and _print(self.label, line)  # past a closed stdout, keep reading quietly
                if RECEIVED in line:
                    self.received = True
                    self.settled.set()
        finally:
            self.stream.close()
            self.settled.set()


def _run_client(command: list[str], server: _Lines) -> None:
    """Run the client; print its lines after the server's line about its message, as kubectl shows them."""
    env = {k: v for k, v in os.environ.items() if k != "UDS_SOCKET"}
    try:
        client = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", env=env, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise DemoError("uds-client did not finish within 30s") from None
    server.settled.wait(10.0)
    received = server.received
    for line in client.stdout.splitlines():
        if not _print("uds-client", line):
            break
    if client.returncode != 0:
        raise DemoError(f"uds-client exited with code {client.returncode}")
    if not received:
        raise DemoError(f"uds-server never logged {RECEIVED!r}")


def run() -> None:
    """Run the demo; raise :class:`DemoError` on the first step that fails."""
    with tempfile.TemporaryDirectory(prefix="uds-demo-", dir="/tmp") as directory:
        path = os.path.join(directory, "csi.sock")
        with ServerProcess(
            app_command("--socket", path),
            socket=path,
            stdout=subprocess.PIPE,
            text=True,
            env={"UDS_SOCKET": None},
            data_dir=os.path.join(directory, "data"),  # the durable store, removed with the directory
        ) as server:
            assert server.proc.stdout is not None
            lines = _Lines("uds-server", server.proc.stdout)
            try:
                server.wait_ready(START_TIMEOUT)
                _run_client(python_command("client", "--socket", path, "send", MESSAGE), lines)
                code = server.stop(timeout=STOP_TIMEOUT)
            except SpawnError as exc:
                raise DemoError(str(exc)) from exc
            lines.join(5)
            if code != 0:
                raise DemoError(f"uds-server exited with code {code} after SIGTERM (expected 0)")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if words:
        print(
            f"Error: uds-demo takes no arguments (got {' '.join(words)}); try uds-demo --help",
            file=sys.stderr,
        )
        return 2
    try:
        run()
    except DemoError as exc:
        print(f"Error: demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        print("Demo finished: the server and the client talked over the socket.", flush=True)
    except BrokenPipeError:
        # stdout's reader is gone (uds-demo | head): the demo itself succeeded and cleaned up.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the exit-time flush quiet
    return 0


if __name__ == "__main__":
    sys.exit(main())
