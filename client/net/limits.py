"""The open-file limit, and the connection cap that fits under it."""

from __future__ import annotations

import contextlib
import resource

FD_RESERVE = 64  # descriptors kept free beyond the connections: listening socket, logs, event loop


def raise_open_file_limit() -> tuple[int, int]:
    """Raise ``RLIMIT_NOFILE``'s soft limit (often 1024) to the hard one; return ``(soft, hard)``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit above the kernel's nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def connection_cap(
    requested: int | None, soft_limit: int, *, reserve: int = FD_RESERVE, files_each: int = 1
) -> int:
    """``requested`` (None: no wish), at most the connections of ``files_each`` that fit; at least 1."""
    if soft_limit < 0 or soft_limit == resource.RLIM_INFINITY:
        room = 1 << 30
    else:
        room = max(1, (soft_limit - reserve) // files_each)
    return room if requested is None else max(1, min(requested, room))
