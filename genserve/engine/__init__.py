"""The real engine: the same policies driving worker processes on a real clock (needs torch)."""

from .engine import Engine, EngineResult

__all__ = ["Engine", "EngineResult"]
