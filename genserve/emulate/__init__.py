"""Emulated GPUs: the whole serving stack at real speeds and sizes, on any machine.

An emulated worker (`worker.py`) is a worker process that honours the worker protocol
(`parallel/protocol.py`) like the real one, but instead of running a transformer it takes each
job's time from a latency profile (the shipped H200 one by default) and carries states and
outputs of the real sizes (`state.py`, `frames.py`).  Everything above it (the pools, engine,
policies, checkpoints, cancellation, failures, HTTP, metrics) runs unchanged: `WorkerPool(...,
emulate=Emulation(...))`.  No torch in an emulated worker, so one costs tens of MB: 64 of them
fit a small machine.  Outputs are placeholders that say what they stand for.
"""

from .spec import Emulation, emulation_for

__all__ = ["Emulation", "emulation_for"]
