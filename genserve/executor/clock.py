"""The two clocks of the executor: virtual (the simulator, the parity test) and real."""

from __future__ import annotations

import time


class VirtualClock:
    """Time that moves only when told to, and never backwards."""

    virtual = True

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance_to(self, t: float) -> None:
        if t > self.t:
            self.t = t

    def seconds_until(self, t: float) -> float:
        return 0.0


class RealClock:
    """Seconds since `restart()`, scaled: `time_scale` clock seconds pass per wall second (a
    trace replayed faster than it was recorded)."""

    virtual = False

    def __init__(self, time_scale: float = 1.0):
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.time_scale = time_scale
        self.t0 = time.monotonic()

    def restart(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return (time.monotonic() - self.t0) * self.time_scale

    def advance_to(self, t: float) -> None:
        raise TypeError("the real clock cannot be advanced")

    def seconds_until(self, t: float) -> float:
        """Wall seconds until clock time `t` (0 if it has passed)."""
        return max((t - self()) / self.time_scale, 0.0)
