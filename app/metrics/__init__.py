"""Prometheus metrics: the per-request recorder, the exposition, and the ``--workers`` files."""
