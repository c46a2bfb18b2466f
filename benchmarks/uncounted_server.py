"""``uds-server`` with its request counting switched off: the "off" side of ``metrics.py`` (k).

The same server, with the recorder ``app.metrics.exposition.Metrics`` builds switched off, so that (k)
measures what counting costs. Not for anything but that benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import app.metrics.core
import app.metrics.exposition


class _Off(app.metrics.core.Recorder):
    __slots__ = ()

    def __init__(self, on: bool = True, *args: Any, **kwargs: Any) -> None:
        super().__init__(False, *args, **kwargs)


app.metrics.exposition.Recorder = _Off  # type: ignore[misc]

from app.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
