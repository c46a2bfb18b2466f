"""``python -m client``: the same as ``uds-client``."""

import sys

from client.cli import main

sys.exit(main())
