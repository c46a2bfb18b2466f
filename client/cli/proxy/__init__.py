"""``uds-client proxy``: the command (:mod:`.command`), the access decision (:mod:`.access`), who the
caller is (:mod:`.caller`, :mod:`.permissions`), the cap (:mod:`.capacity`), the connections
(:mod:`.forwarding`)."""
