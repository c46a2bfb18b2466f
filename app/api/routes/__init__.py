"""The API's routers, one per noun."""

from __future__ import annotations

from app.api.routes import docs, health, messages

__all__ = ["docs", "health", "messages"]
