"""(e) One-shot commands, wall time from exec to exit: ``uds-client health``/``send`` against
``curl --unix-socket`` doing the same request, interleaved, medians.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence

from _common import BIN, BODY, BenchError, Row, main_for, median, servers


def wall(command: Sequence[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, timeout=30
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchError(
            f"{command[0]} exited with {result.returncode}: {result.stderr.decode().strip()[-200:]}"
        )
    return elapsed


def run(quick: bool) -> list[Row]:
    runs = 3 if quick else 21
    curl = shutil.which("curl")
    if curl is None:
        raise BenchError("curl is needed: apt-get install curl")
    cli = str(BIN / "uds-client")
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
        }
        for command in commands.values():
            wall(command)  # page cache and bytecode warm, as on a node that runs the probe every few seconds
        times: dict[str, list[float]] = {name: [] for name in commands}
        for index in range(runs):
            order = list(commands.items())
            for name, command in order if index % 2 == 0 else reversed(order):
                times[name].append(wall(command))
    health, curl_health = median(times["uds-client health"]), median(times["curl health"])
    send, curl_send = median(times["uds-client send"]), median(times["curl send"])
    rounds = [{k: v[i] for k, v in times.items()} for i in range(runs)]
    return [
        Row(
            "e",
            "one-shot health check, wall time",
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
            "one-shot send, wall time",
            "uds-client send",
            send,
            "curl --unix-socket",
            curl_send,
            "s",
            send / curl_send,
            "<= 0.1 s",
            send <= 0.1,
            [],
        ),
    ]


if __name__ == "__main__":
    main_for(run)
