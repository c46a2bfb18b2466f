"""Serving: the listening socket, the uvicorn server on it, and ``--workers`` supervision."""
