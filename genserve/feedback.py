"""A latency model that corrects itself from what it observes, and one that is wrong on purpose.

Policies plan with a profile measured offline; the hardware, drivers or the load drift from it.
`Corrected` wraps any `LatencyModel` and multiplies its step times by an online estimate of
(observed / profiled), per step key (model, tokens, batch, SP degree, cross-node) and, for keys not
seen yet, per model.  The executor core feeds it every quantum that ends (`observe`): the quantum's
clock time minus the parts that are not steps (dispatch, encode, moves, decode, as predicted) is
the steps' observed time.  The first observation of a key is taken as is, later ones are smoothed
(exponential average of the ratio's log), so one quantum corrects a plain scale error and noise is
damped after.

A policy that caches step times per shape (genserve) reads `version`, which changes only when a
published factor moved by more than `publish_change`, and rebuilds its tables then.

`Scaled` is a profile wrong by known factors (per model), for the experiment where the simulator
executes with the true profile while the policy plans with a wrong one (`bench/profile_error.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .latency import LatencyModel

# model, tokens, requests in the batch, GPUs, cross-node, CFG split (`LatencyModel.step_time`)
StepKey = tuple[str, int, int, int, bool, bool]


class LatencyView(LatencyModel):
    """A latency model equal to `base` except for step times, which `factor` scales.  Everything
    else (encode, decode, moves, degrees, profile data) is the base's."""

    def __init__(self, base: LatencyModel):  # no LatencyModel.__init__: nothing is loaded again
        self.base = base
        self.version = 0

    def __getattr__(self, name: str):
        # Only reached for attributes this object lacks: the base's data (models, costs, meta...).
        base = self.__dict__.get("base")
        if base is None:  # half-built (unpickling, copying)
            raise AttributeError(name)
        return getattr(base, name)

    def factor(self, key: StepKey) -> float:
        return 1.0

    def step_time(self, model: str, tokens: int, n_requests: int = 1, sp: int = 1,
                  cross_node: bool = False, cfg_split: bool = False) -> float:
        return (self.base.step_time(model, tokens, n_requests, sp, cross_node, cfg_split)
                * self.factor((model, tokens, n_requests, sp, cross_node, cfg_split)))


class Scaled(LatencyView):
    """Step times of `base` times a factor per model (`default` for the others)."""

    def __init__(self, base: LatencyModel, per_model: dict[str, float] | None = None,
                 default: float = 1.0):
        super().__init__(base)
        self.per_model, self.default = dict(per_model or {}), default
        bad = {m: f for m, f in {**self.per_model, "*": default}.items() if not f > 0}
        if bad:
            raise ValueError(f"profile error factors must be > 0, got {bad}")

    def factor(self, key: StepKey) -> float:
        return self.per_model.get(key[0], self.default)


def parse_factors(text: str) -> tuple[dict[str, float], float]:
    """`1.3` or `sd3-medium=0.7,wan2.1-14b=1.3[,*=1.1]` -> (per model, default)."""
    per: dict[str, float] = {}
    default = 1.0
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, val = part.rpartition("=")
        try:
            f = float(val)
        except ValueError:
            raise ValueError(f"profile error {part!r}: expected FACTOR or MODEL=FACTOR") from None
        if not eq or name == "*":
            default = f
        else:
            per[name] = f
    return per, default


@dataclass(frozen=True)
class FeedbackConfig:
    alpha: float = 0.3            # weight of a new observation after the first
    publish_change: float = 0.02  # a factor that moved by more than this (relative) is published

    def validate(self) -> None:
        if not 0 < self.alpha <= 1 or not self.publish_change >= 0:
            raise ValueError(f"feedback: alpha must be in (0, 1] and publish_change >= 0, got "
                             f"{self.alpha}, {self.publish_change}")


class Corrected(LatencyView):
    """`base` with step times corrected by what the executor observes."""

    def __init__(self, base: LatencyModel, config: FeedbackConfig | None = None):
        super().__init__(base)
        self.config = config or FeedbackConfig()
        self.config.validate()
        self._log: dict[StepKey, float] = {}       # smoothed log(observed / base) per key
        self._model_log: dict[str, float] = {}     # the same per model (keys not seen yet)
        self._published: dict[object, float] = {}  # factors policies have been shown
        self.observations = 0

    def factor(self, key: StepKey) -> float:
        hit = self._published.get(key)
        if hit is None:
            hit = self._published.get(key[0], 1.0)
        return hit

    def estimate(self, model: str) -> float:
        """The per-model factor policies plan with now (1.0 before any observation)."""
        return self._published.get(model, 1.0)

    def observe(self, key: StepKey, steps: int, seconds: float) -> None:
        """`steps` steps of `key` took `seconds` on the clock."""
        if steps < 1 or not seconds > 0:
            return  # the fixed parts were over-predicted; nothing to learn about the steps
        ratio = math.log(seconds / (steps * self.base.step_time(*key)))
        self.observations += 1
        a = self.config.alpha
        for table, k in ((self._log, key), (self._model_log, key[0])):
            old = table.get(k)
            table[k] = ratio if old is None else (1 - a) * old + a * ratio
            self._publish(k, math.exp(table[k]))

    def _publish(self, k: object, f: float) -> None:
        old = self._published.get(k, 1.0)
        if abs(f / old - 1.0) > self.config.publish_change:
            self._published[k] = f
            self.version += 1
