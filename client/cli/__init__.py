"""The ``uds-client`` command (``_main``, with the API commands in ``_commands``; ``proxy`` and
``docs_export`` load only when they run): the only part of ``client`` that prints or exits."""

from client.cli._main import build_parser as build_parser
from client.cli._main import main as main
