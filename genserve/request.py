"""The one request object and its status machine.

Only the executor (`genserve.executor`, under the simulator and the engine) calls the transition
methods; policies read requests and never mutate them.  Every transition checks the prior status
and records the time, so a request's timeline can always be reconstructed and an illegal move
fails loudly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from .kinds import Kind
from .spec import GenSpec


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"
    REJECTED = "rejected"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({Status.FINISHED, Status.CANCELLED, Status.FAILED, Status.REJECTED})


class InvalidTransition(RuntimeError):
    """A status change that the state machine does not allow (a bug in the caller)."""


def _from_spec(name: str) -> property:
    # attrgetter: read in C, policies read these hundreds of thousands of times a second
    return property(attrgetter(f"spec.{name}"), doc=f"`spec.{name}`")


@dataclass(eq=False)
class Request:
    """One generation request: what to make (`spec`) and when it is due.  `deadline` is absolute
    (seconds on the engine's clock)."""

    id: str
    kind: Kind
    spec: GenSpec
    arrival: float = 0.0
    deadline: float = float("inf")
    steps_done: int = 0
    status: Status = Status.WAITING
    # GPUs holding this request's step state (empty before its first step).
    gpus: tuple[int, ...] = ()
    # (time, status) for every transition, starting with the arrival.
    history: list[tuple[float, Status]] = field(default_factory=list)
    finish_time: float | None = None
    reason: str | None = None  # why it ended as FAILED / REJECTED / CANCELLED
    # Filled in by the workload: seconds alone on the model's default SP degree; used to normalise.
    standalone: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.kind, str):
            self.kind = Kind(self.kind)
        if not self.history:
            self.history.append((self.arrival, self.status))
        self._shape = self.spec.batch_key

    # ----- the spec's fields, read by policies and the latency model (read-only) -----
    model = _from_spec("model")
    height = _from_spec("height")
    width = _from_spec("width")
    frames = _from_spec("frames")
    steps = _from_spec("steps")
    guidance = _from_spec("guidance")
    seed = _from_spec("seed")
    prompt = _from_spec("prompt")

    # ----- derived, read by policies -----
    @property
    def remaining_steps(self) -> int:
        return self.steps - self.steps_done

    @property
    def started(self) -> bool:
        return self.steps_done > 0 or self.status is Status.RUNNING

    @property
    def shape(self) -> tuple:
        """Requests with equal shape may share one batched step: the spec's batch key, the key
        the model adapters group states by (CFG on or off included)."""
        return self._shape

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival

    @property
    def met_deadline(self) -> bool:
        return self.status is Status.FINISHED and self.finish_time is not None and (
            self.finish_time <= self.deadline + 1e-9)

    # ----- transitions: the engine's only way to change status -----
    def _move(self, now: float, allowed: tuple[Status, ...], new: Status) -> None:
        if self.status not in allowed:
            raise InvalidTransition(
                f"request {self.id}: cannot go {self.status.value} -> {new.value}")
        self.status = new
        self.history.append((now, new))

    def start(self, now: float, gpus: tuple[int, ...]) -> None:
        self._move(now, (Status.WAITING,), Status.RUNNING)
        self.gpus = tuple(gpus)

    def preempt(self, now: float) -> None:
        self._move(now, (Status.RUNNING,), Status.PREEMPTED)

    def resume(self, now: float, gpus: tuple[int, ...]) -> None:
        self._move(now, (Status.PREEMPTED,), Status.RUNNING)
        self.gpus = tuple(gpus)

    def move_to(self, gpus: tuple[int, ...]) -> None:
        """Record that a running request's state now lives on another GPU set."""
        if self.status is not Status.RUNNING:
            raise InvalidTransition(f"request {self.id}: moved while {self.status.value}")
        self.gpus = tuple(gpus)

    def advance(self, n: int) -> None:
        """Record n denoising steps done (status stays RUNNING)."""
        if self.status is not Status.RUNNING:
            raise InvalidTransition(f"request {self.id}: steps advanced while {self.status.value}")
        if n < 1 or self.steps_done + n > self.steps:
            raise InvalidTransition(
                f"request {self.id}: cannot advance {n} steps from {self.steps_done}/{self.steps}")
        self.steps_done += n

    def relocate(self, gpus: tuple[int, ...]) -> None:
        """Record where a request's state now lives between two quanta (fewer GPUs after a worker
        died)."""
        if self.status not in (Status.RUNNING, Status.PREEMPTED):
            raise InvalidTransition(f"request {self.id}: relocated while {self.status.value}")
        self.gpus = tuple(gpus)

    def rollback(self, now: float, steps_done: int) -> None:
        """The state was lost with a worker: go back to a checkpoint at `steps_done` (0: start
        over) and wait to be planned again."""
        if not 0 <= steps_done <= self.steps_done:
            raise InvalidTransition(f"request {self.id}: cannot roll back to step {steps_done} "
                                    f"from {self.steps_done}")
        self._move(now, (Status.RUNNING, Status.PREEMPTED), Status.PREEMPTED)
        self.steps_done, self.gpus = steps_done, ()

    def finish(self, now: float) -> None:
        if self.steps_done != self.steps:
            raise InvalidTransition(
                f"request {self.id}: finished with {self.steps_done}/{self.steps} steps")
        self._move(now, (Status.RUNNING,), Status.FINISHED)
        self.finish_time = now

    def cancel(self, now: float, reason: str = "cancelled") -> None:
        self._move(now, (Status.WAITING, Status.RUNNING, Status.PREEMPTED), Status.CANCELLED)
        self.finish_time, self.reason = now, reason

    def fail(self, now: float, reason: str) -> None:
        self._move(now, (Status.WAITING, Status.RUNNING, Status.PREEMPTED), Status.FAILED)
        self.finish_time, self.reason = now, reason

    def reject(self, now: float, reason: str) -> None:
        self._move(now, (Status.WAITING,), Status.REJECTED)
        self.finish_time, self.reason = now, reason

    # ----- trace I/O -----
    def to_trace(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "kind": self.kind.value,
                "height": self.height, "width": self.width, "frames": self.frames,
                "steps": self.steps, "guidance": self.guidance, "seed": self.seed,
                "prompt": self.prompt, "arrival": self.arrival, "deadline": self.deadline,
                "standalone": self.standalone,
                **({"negative_prompt": self.spec.negative_prompt}
                   if self.spec.negative_prompt else {}),
                **({"image": self.spec.image} if self.spec.image else {})}

    @classmethod
    def from_trace(cls, d: dict[str, Any]) -> "Request":
        missing = {"id", "model", "kind", "height", "width", "arrival", "deadline"} - d.keys()
        if missing:
            raise ValueError(f"trace record lacks {sorted(missing)}: {d}")
        spec = GenSpec(**{k: d[k] for k in _SPEC_KEYS if k in d})
        return cls(id=d["id"], kind=d["kind"], spec=spec,
                   **{k: d[k] for k in ("arrival", "deadline", "standalone") if k in d})


_SPEC_KEYS = ("model", "height", "width", "frames", "steps", "guidance", "seed", "prompt",
              "negative_prompt", "image")
