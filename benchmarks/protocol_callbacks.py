"""(n) The protocol's own cost per ``POST /messages``: this tree's ``PeerCredProtocol`` vs another revision's.

Both protocols run in this process on a stand-in transport, with no application (starting the
request's task is skipped), so what is measured is parsing, the checks and the bookkeeping of
``app/connection/protocol.py`` alone. Rounds alternate between the two, each timing 10,000 requests on one
connection by CPU time; the result is the median of the per-round ratios. The other revision's
``app/connection/protocol.py`` is loaded from git (it must import only what this tree still has). Not part
of ``run_all.py``: it needs a revision to compare with.

    .venv/bin/python benchmarks/protocol_callbacks.py --rev d966361 [--rounds 21]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from _common import ROOT
from uvicorn.config import Config
from uvicorn.server import ServerState

import app.connection.protocol

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


def at_revision(rev: str) -> ModuleType:
    """``app/connection/protocol.py`` as it was at ``rev``, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:app/connection/protocol.py"], capture_output=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="ub-pc-")) / "peercred_at_rev.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("peercred_at_rev", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_request(protocol_class: type, loop: asyncio.AbstractEventLoop, config: Config, count: int) -> float:
    """CPU µs per request for ``count`` requests, each parsed and then marked answered."""
    protocol = protocol_class(config, ServerState(), {}, loop)
    protocol._start_asgi_task = lambda cycle, app: None  # no application: the protocol alone
    protocol.connection_made(Transport())
    started = time.process_time()
    for _ in range(count):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--requests", type=int, default=10_000, help="requests per round and side")
    args = parser.parse_args(argv)
    other = at_revision(args.rev).PeerCredProtocol
    ours = app.connection.protocol.PeerCredProtocol
    loop = asyncio.new_event_loop()
    config = Config(app=_app, log_level="warning", access_log=False)
    config.load()
    per_request(ours, loop, config, 2000)  # warm up both
    per_request(other, loop, config, 2000)
    this_tree, revision = [], []
    for index in range(args.rounds):
        order = [(ours, this_tree), (other, revision)]
        for protocol_class, results in order if index % 2 == 0 else reversed(order):
            results.append(per_request(protocol_class, loop, config, args.requests))
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
