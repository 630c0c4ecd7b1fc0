"""Sequence parallelism: Ulysses attention over explicit process groups (needs torch), and the
worker pool that runs it.  The attention names load on first use, so that the driver's modules
of this package (`protocol`, `channel`, `world`, `workers`) import without torch."""

__all__ = ["GroupCache", "shard", "ulysses_attention", "unshard"]


def __getattr__(name: str):
    if name in __all__:
        from . import ulysses

        return getattr(ulysses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
