"""Storage and events: the message stores and the hub that feeds the event streams."""
