"""The ``--workers`` metrics files (``app.metrics.files``) in process: records, a full file, a full
disk, and folding a dead worker's file in without a count seen twice or missed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from app.metrics.files import ABSORBED, SIZE, CellFile, absorb, read_all, read_file
from tests.support import small_tmpfs


def _totals(directory: Path) -> dict[tuple[object, ...], list[float]]:
    entries, _ = read_all(str(directory))
    totals: dict[tuple[object, ...], list[float]] = {}
    for labels, values in entries:
        kept = totals.setdefault(labels, [0.0] * len(values))
        for index, value in enumerate(values):
            kept[index] += value
    return totals


def test_records_are_shared_through_the_file(tmp_path: Path) -> None:
    file = CellFile(str(tmp_path))
    assert Path(file.path).stat().st_size == SIZE  # allocated whole when made
    assert Path(file.path).stat().st_mode & 0o777 == 0o600
    cell = file.record(("cell", "POST", "/v1/messages", "201", True, True), 3)
    assert cell is not None
    cell[0] += 2
    cell[2] += 0.5
    file.set_gauges(4, 1)
    assert read_file(file.path)[0] == [(("cell", "POST", "/v1/messages", "201", True, True), (2.0, 0.0, 0.5))]
    entries, gauges = read_all(str(tmp_path))
    assert gauges == (4.0, 1.0)  # this process is alive
    assert len(entries) == 1


def test_a_full_file_takes_no_more_records(tmp_path: Path) -> None:
    file = CellFile(str(tmp_path))
    made = 0
    while file.record(("cell", "GET", f"/r{made}", "200", False, True), 13) is not None:
        made += 1
    assert 300 < made < SIZE // (13 * 8)
    assert len(read_file(file.path)[0]) == made  # what it took is whole


def test_a_full_disk_refuses_the_file_not_a_page_later(tmp: Path) -> None:
    with small_tmpfs(tmp / "small", "256k", 0o700) as small:
        made = [CellFile(str(small)) for _ in range(4)]  # 4 x 64 KiB: the disk is full
        with pytest.raises(OSError, match="No space left on device"):
            CellFile(str(small))
        assert len(list(small.iterdir())) == len(made)  # the refused one is not left behind
        cell = made[0].record(("refused", "GET", 400), 1)
        assert cell is not None
        cell[0] += 1  # its pages are on disk: a write is no SIGBUS


def test_a_dead_workers_counts_fold_into_one_file(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = tmp_path / f"cells-{finished.pid}-00.db"
    live = CellFile(str(tmp_path))
    labels = ("cell", "GET", "/healthz", "200", False, True)
    mine = live.record(labels, 2)
    assert mine is not None
    mine[0] += 5
    live.set_gauges(1, 0)
    other = CellFile(str(tmp_path))
    theirs = other.record(labels, 2)
    assert theirs is not None
    theirs[0] += 7
    other.set_gauges(3, 2)
    os.rename(other.path, dead)  # as if written by the dead worker
    before = _totals(tmp_path)
    assert before[labels] == [12.0, 0.0]
    assert read_all(str(tmp_path))[1] == (1.0, 0.0)  # a dead worker's gauges do not count
    absorb(str(tmp_path), finished.pid)
    assert not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ABSORBED, Path(live.path).name])
    assert _totals(tmp_path) == before  # nothing seen twice, nothing missed
    mine[0] += 1
    assert _totals(tmp_path)[labels] == [13.0, 0.0]


def test_a_reader_that_listed_a_file_before_it_was_folded_counts_it_once(tmp_path: Path) -> None:
    """A reader holding the dead file's bytes and then reading absorbed.db skips the file it lists."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    other = CellFile(str(tmp_path))
    labels = ("refused", "GET", 400)
    counts = other.record(labels, 1)
    assert counts is not None
    counts[0] += 9
    dead = tmp_path / f"cells-{finished.pid}-00.db"
    os.rename(other.path, dead)
    kept = dead.read_bytes()
    absorb(str(tmp_path), finished.pid)
    dead.write_bytes(kept)  # the reader's view: the file still listed, absorbed.db already written
    assert _totals(tmp_path)[labels] == [9.0]
