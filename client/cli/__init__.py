"""The ``uds-client`` command and its tools: the only part of ``client`` that prints or exits.

``_main`` is the entry point, ``_commands`` the API commands; ``proxy`` and ``docs_export`` are
imported only when their command runs.
"""

from client.cli._main import build_parser, main

__all__ = ["build_parser", "main"]
