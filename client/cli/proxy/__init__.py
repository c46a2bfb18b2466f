"""``uds-client proxy``: command, access decision, caller and permissions, capacity, forwarding."""
