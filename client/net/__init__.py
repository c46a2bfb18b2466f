"""Connection mechanisms shared by the server's protocol and ``uds-client proxy`` (stdlib only)."""
