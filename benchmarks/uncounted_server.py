"""``uds-server`` with its request counting switched off: the "off" side of ``metrics.py`` (k).

The same server, its protocol given no recorder (``/metrics`` still answers, counting nothing), so
that (k) measures what counting costs. Not for anything but that benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import app.serving.server

_build_config = app.serving.server.build_config


def _uncounted(settings: Any, app: Any, recorder: Any = None, max_connections: int | None = None) -> Any:
    return _build_config(settings, app, None, max_connections)  # a protocol without a recorder counts nothing


app.serving.server.build_config = _uncounted

from app.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
