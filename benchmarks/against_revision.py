"""(g) POST /messages throughput of this tree's server against another revision's, over the socket.

What a change costs the hot path: both servers run from the same venv on the same machine, the
other one from a temporary ``git worktree`` of ``--rev``, and autocannon alternates between them
round by round (10 connections, the server pinned to the first CPU). Not part of ``run_all.py``:
it needs a revision to compare with. ``--path /v1/messages`` sends this tree's requests to the
versioned path (the other revision always gets ``/messages``, which every revision serves).

    .venv/bin/python benchmarks/against_revision.py --rev 15c0cee [--rounds 9] [--path /v1/messages]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from _common import ROOT, Row, Server, autocannon, compare, paired
from _spawn import split_cpus


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached checkout of ``rev`` in a temporary directory, removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix="ub-rev-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)


def run(rev: str, rounds: int, duration: float, path: str = "/messages", warmup: float = 1.0) -> Row:
    split = split_cpus()
    server_cpus, generator_cpus = split if split else (None, None)
    with worktree(rev) as other_tree:
        # Both on the memory store: an older revision has no other, and like is compared with like.
        ours = Server(cpus=server_cpus, store="memory")
        theirs = Server(cpus=server_cpus, source=other_tree, store="memory")
        try:
            ours.ready()
            theirs.ready()
            runs = paired(
                rounds,
                lambda: autocannon(ours, 10, duration, warmup, generator_cpus, path),
                lambda: autocannon(theirs, 10, duration, warmup, generator_cpus),
            )
        finally:
            ours.close()
            theirs.close()
    return compare(
        "g",
        f"req/s over UDS, autocannon 10 conns: this tree (POST {path}) vs {rev} (POST /messages)",
        ("this tree", rev),
        runs,
        "rps",
        "req/s",
        ">= 0.95x",
        lambda r: r >= 0.95,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=9, help="paired rounds (default 9)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (default 1)")
    parser.add_argument("--path", default="/messages", help="this tree's POST path (default /messages)")
    args = parser.parse_args()
    print(json.dumps(run(args.rev, args.rounds, args.duration, args.path, args.warmup).as_dict()))


if __name__ == "__main__":
    main()
