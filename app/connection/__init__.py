"""The connection layer: uvicorn's HTTP/1.1 protocol with peer credentials, limits and deadlines."""
