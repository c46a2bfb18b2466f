"""``uds-client proxy``: the command (:mod:`.command`), the access decision (:mod:`.access`), who
the caller is (:mod:`.caller`), and the connections (:mod:`.forwarding`)."""
