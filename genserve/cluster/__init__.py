"""Running the workers on a Ray cluster (several nodes); see `ray_pool.py` and docs/ray.md."""

from .ray_pool import RayWorkerPool

__all__ = ["RayWorkerPool"]
