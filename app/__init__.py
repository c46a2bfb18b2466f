"""uds-example server: FastAPI over a Unix domain socket."""

__version__ = "1.0.0"
