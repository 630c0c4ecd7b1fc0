"""Baselines, each as strong as its idea allows (their free parameters are tuned by `sweep --tune`).

- fcfs / sjf / edf: non-preemptive list schedulers with a fixed SP degree per model (how xDiT-style
  servers run); a request runs to completion on its group.  `backfill` lets later requests use GPUs
  the head of the queue cannot use yet.
- static: GPUs split into an image pool and a video pool, each a list scheduler.
- tetriserve: round-based step-level SP choice (the degree that meets the deadline with the least
  GPU time), re-chosen every round, without cross-request preemption or batching.
"""

from __future__ import annotations

from operator import attrgetter

from ..request import Kind, Request, Status
from .base import (NO_GPU, QUEUED_BEHIND, WRONG_POOL, Assignment, Plan, Policy, SchedulerState,
                   register)
from .common import GpuPool, finish_cost, fixed_sp


_by_deadline = attrgetter("deadline", "id")
_by_arrival = attrgetter("arrival", "id")


class _ListScheduler(Policy):
    params = {"image_sp": int, "video_sp": int, "backfill": bool}
    defaults = {"image_sp": 0, "video_sp": 0, "backfill": True}

    def key(self, r: Request, state: SchedulerState) -> tuple:
        raise NotImplementedError

    def sort_key(self, state: SchedulerState):
        return lambda r: self.key(r, state)

    def schedule(self, state: SchedulerState) -> Plan:
        plan = Plan()
        pool = GpuPool(state.free_gpus, state.cluster)
        self._continue_running(state, pool, plan)
        self.place([r for r in state.queue if r.status is not Status.RUNNING], state, pool, plan)
        return plan

    @staticmethod
    def _continue_running(state: SchedulerState, pool: GpuPool, plan: Plan) -> None:
        # Non-preemptive: anything between quanta (only after a batch-mate finished) goes on as is.
        for r in state.queue:
            if r.status is Status.RUNNING:
                gpus = pool.take(len(r.gpus), prefer=r.gpus)
                plan.assignments.append(Assignment(gpus, (r.id,), r.remaining_steps))

    def place(self, reqs: list[Request], state: SchedulerState, pool: GpuPool, plan: Plan,
              cap: int | None = None) -> None:
        c = self.config
        blocked = False
        for r in sorted(reqs, key=self.sort_key(state)):
            if blocked or not len(pool):
                # The rest of the queue waits for the same reason; stop early (big queues).
                plan.reasons[r.id] = QUEUED_BEHIND if blocked else NO_GPU
                break
            k = fixed_sp(r, state.latency, state.cluster, c["image_sp"], c["video_sp"], cap)
            gpus = pool.take(k)
            if gpus is None:
                plan.reasons[r.id] = NO_GPU
                blocked = not c["backfill"]
                continue
            plan.assignments.append(Assignment(gpus, (r.id,), r.remaining_steps))


@register("fcfs")
class FCFS(_ListScheduler):
    def key(self, r: Request, state: SchedulerState) -> tuple:
        return (r.arrival, r.id)

    def sort_key(self, state: SchedulerState):
        return _by_arrival


@register("sjf")
class SJF(_ListScheduler):
    """Shortest job first by remaining seconds at the request's fixed SP degree."""

    def __init__(self, **params):
        super().__init__(**params)
        self._step: dict[str, float] = {}  # per request: seconds per step at its fixed degree

    def key(self, r: Request, state: SchedulerState) -> tuple:
        t = self._step.get(r.id)
        if t is None:
            c = self.config
            k = fixed_sp(r, state.latency, state.cluster, c["image_sp"], c["video_sp"])
            t = self._step[r.id] = state.latency.request_step_time(r, 1, k)
        return (r.remaining_steps * t, r.arrival, r.id)


@register("edf")
class EDF(_ListScheduler):
    def key(self, r: Request, state: SchedulerState) -> tuple:
        return (r.deadline, r.id)

    def sort_key(self, state: SchedulerState):
        return _by_deadline


@register("static")
class Static(_ListScheduler):
    """GPUs [0, image_gpus) serve images only, the rest videos only; each pool FCFS or EDF."""

    params = {**_ListScheduler.params, "image_gpus": int, "order": str}
    defaults = {**_ListScheduler.defaults, "image_gpus": 0, "order": "fcfs"}

    def __init__(self, **params):
        super().__init__(**params)
        if self.config["order"] not in ("fcfs", "edf"):
            raise ValueError(f"policy static: order must be fcfs or edf, got {self.config['order']!r}")
        if self.config["image_gpus"] < 0:
            raise ValueError("policy static: image_gpus must be >= 0 (0 = a quarter of the GPUs)")

    def split(self, n: int) -> int:
        if n < 2:
            raise ValueError("policy static needs at least 2 GPUs to split")
        want = self.config["image_gpus"] or max(1, n // 4)
        if want >= n:
            raise ValueError(f"policy static: image_gpus={want} leaves no GPU for videos "
                             f"(cluster has {n})")
        return want

    def key(self, r: Request, state: SchedulerState) -> tuple:
        return ((r.deadline if self.config["order"] == "edf" else r.arrival), r.id)

    def schedule(self, state: SchedulerState) -> Plan:
        n_img = self.split(state.cluster.num_gpus)
        plan = Plan()
        pools = {Kind.IMAGE: GpuPool([g for g in state.free_gpus if g < n_img], state.cluster),
                 Kind.VIDEO: GpuPool([g for g in state.free_gpus if g >= n_img], state.cluster)}
        caps = {Kind.IMAGE: n_img, Kind.VIDEO: state.cluster.num_gpus - n_img}
        for kind, pool in pools.items():
            mine = [r for r in state.queue if r.kind is kind]
            self._continue_running(
                SchedulerState(state.now, state.cluster, (), mine, [], state.latency), pool, plan)
            self.place([r for r in mine if r.status is not Status.RUNNING], state, pool, plan,
                       cap=caps[kind])
        for r in state.queue:
            if r.id in plan.reasons and plan.reasons[r.id] == NO_GPU and not len(pools[r.kind]):
                plan.reasons[r.id] = WRONG_POOL
        return plan


@register("tetriserve")
class TetriServe(Policy):
    """Step-level SP degrees chosen each round to meet deadlines with the least GPU time.

    Started requests keep running (no cross-request preemption): each round they are re-planned
    first, taking the degree they need where GPUs allow.  Waiting ones start in deadline order.
    """

    params = {"round_s": float}
    defaults = {"round_s": 0.5}

    def _degree(self, r: Request, state: SchedulerState, limit: int) -> int:
        lat, now = state.latency, state.now
        left = r.deadline - now - finish_cost(r, lat)
        options = [k for k in lat.degrees(r.model) if k <= limit]
        if not options:
            return 0
        times = {k: r.remaining_steps * lat.request_step_time(r, 1, k) for k in options}
        ok = [k for k in options if times[k] <= left]
        if ok:
            return min(ok, key=lambda k: (k * times[k], k))
        return max(options)  # cannot make it: finish as soon as possible

    def schedule(self, state: SchedulerState) -> Plan:
        plan = Plan()
        pool = GpuPool(state.free_gpus, state.cluster)
        started = [r for r in state.queue if r.status is not Status.WAITING]
        waiting = sorted((r for r in state.queue if r.status is Status.WAITING),
                         key=_by_deadline)
        for r in sorted(started, key=lambda r: (r.deadline, r.id)) + waiting:
            if not len(pool):
                plan.reasons[r.id] = NO_GPU
                break
            k = self._degree(r, state, len(pool))
            gpus = pool.take(k, prefer=r.gpus) if k else None
            if gpus is None and r.status is not Status.WAITING:
                # Never drop a started request: shrink it onto what is free.
                k = self._degree(r, state, pool.max_in_node() or len(pool))
                gpus = pool.take(k, prefer=r.gpus) if k else None
            if gpus is None:
                plan.reasons[r.id] = NO_GPU
                continue
            step = state.latency.request_step_time(r, 1, len(gpus))
            steps = max(1, min(r.remaining_steps, int(self.config["round_s"] / step)))
            plan.assignments.append(Assignment(gpus, (r.id,), steps))
        return plan
