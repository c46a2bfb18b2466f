"""uds-example client: a typed library and the uds-client command for a Unix-socket REST server."""
