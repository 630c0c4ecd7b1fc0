"""genserve: co-serving text-to-image and text-to-video diffusion models under latency SLOs."""

__version__ = "0.1.0"
