"""`genserve serve`: the HTTP API over the engine (see app.py, service.py)."""

from .config import ServeConfig

__all__ = ["ServeConfig"]
