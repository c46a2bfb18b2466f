"""(n) The protocol's own cost per ``POST /messages``: this tree's ``PeerCredProtocol`` vs another revision's.

Both protocols run on a stand-in transport with no application (starting the request's task is
skipped), so what is measured is parsing, the checks and the bookkeeping of ``app/connection/``
alone. The other revision's ``app`` and ``client`` are exported from git to a temporary directory;
each side runs in a process of its own, the two alternating round by round, each round timing
10,000 requests on one connection by CPU time; the result is the median of the per-round ratios.
Not part of ``run_all.py``: it needs a revision to compare with.

    .venv/bin/python benchmarks/protocol_callbacks.py --rev d966361 [--rounds 21]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PYTHON, ROOT

BODY = b'{"text": "Hello from client"}'
REQUEST = (
    b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: */*\r\n"
    b"User-Agent: python-httpx/0.28\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


class Transport(asyncio.Transport):
    """Takes every write; the peer reads at once."""

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


def at_revision(rev: str) -> Path:
    """``app`` and ``client`` as they were at ``rev``, in a temporary directory."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "app", "client"], capture_output=True, check=True
    ).stdout
    where = Path(tempfile.mkdtemp(prefix="ub-pc-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where)  # our own repository's archive
    return where


def per_request(root: str, count: int) -> float:
    """CPU µs per request of the protocol under ``root``, each request parsed and marked answered."""
    sys.path.insert(0, root)
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from app.connection.protocol import PeerCredProtocol

    loop = asyncio.new_event_loop()
    config = Config(app=_app, log_level="warning", access_log=False)
    config.load()
    elapsed = 0.0
    for warm_up in (True, False):
        protocol: Any = PeerCredProtocol(config, ServerState(), {}, loop)
        protocol._start_asgi_task = lambda cycle, app: None  # no application: the protocol alone
        protocol.connection_made(Transport())
        started = time.process_time()
        for _ in range(count // 5 if warm_up else count):
            protocol.data_received(REQUEST)
            protocol.cycle.response_complete = True
            protocol.on_response_complete()
            keep_alive = protocol.timeout_keep_alive_task
            if keep_alive is not None:
                keep_alive.cancel()
                protocol.timeout_keep_alive_task = None
        elapsed = time.process_time() - started
        protocol.connection_lost(None)
    return elapsed / count * 1e6


def _round(root: Path, count: int) -> float:
    command = [PYTHON, __file__, "--measure", str(root), "--requests", str(count)]
    return float(subprocess.run(command, capture_output=True, check=True, text=True).stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--requests", type=int, default=10_000, help="requests per round and side")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one round, in a process of its own
    args = parser.parse_args(argv)
    if args.measure:
        print(per_request(args.measure, args.requests))
        return 0
    if not args.rev:
        parser.error("--rev is required")
    other = at_revision(args.rev)
    this_tree, revision = [], []
    for index in range(args.rounds):
        order = [(ROOT, this_tree), (other, revision)]
        for root, results in order if index % 2 == 0 else reversed(order):
            results.append(_round(root, args.requests))
    ratios = [a / b for a, b in zip(this_tree, revision, strict=True)]
    json.dump(
        {
            "compares": f"PeerCredProtocol callbacks per POST /messages, this tree vs {args.rev}",
            "this_tree_us": round(statistics.median(this_tree), 3),
            "revision_us": round(statistics.median(revision), 3),
            "ratio": round(statistics.median(ratios), 3),
            "rounds": args.rounds,
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
