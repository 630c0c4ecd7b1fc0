"""Scripted policies shared by the engine tests (real and emulated workers): they say exactly
where and how long each request runs, so a test can drive moves, SP changes and batches."""

from __future__ import annotations

from genserve.policies import Plan, Policy
from genserve.policies.base import Assignment
from genserve.request import Request


class Route(Policy):
    """Each request runs along its route: legs of (GPU set, steps), counted from its start (the
    last leg takes what is left).  A request rolled back goes back to the leg of its step."""

    name = "route"

    def __init__(self, routes: dict[str, list[tuple[tuple[int, ...], int]]]):
        super().__init__()
        self.routes = routes

    def schedule(self, s):
        plan, free = Plan(), set(s.free_gpus)
        for r in sorted(s.queue, key=lambda r: r.id):
            end = 0
            for gpus, n in self.routes[r.id]:
                end += n
                if r.steps_done < end:
                    break
            if set(gpus) <= free:
                free -= set(gpus)
                steps = min(end - r.steps_done, r.remaining_steps)
                plan.assignments.append(Assignment(gpus, (r.id,), steps))
            else:
                plan.wake_at = s.now + 0.05
        return plan


class Pinned(Policy):
    """Runs every queued request to completion at once: requests of one shape share one
    assignment (one batch) on the GPUs `place(request)` names (default: the lowest free GPU), with
    all the steps the batch has left."""

    name = "pinned"

    def __init__(self, place=None):
        super().__init__()
        self.place = place

    def schedule(self, s):
        plan = Plan()
        free = sorted(s.free_gpus)
        groups: dict[tuple, list[Request]] = {}
        for r in sorted(s.queue, key=lambda r: r.id):
            gpus = self.place(r) if self.place else None
            groups.setdefault((r.shape, gpus), []).append(r)
        for (_, gpus), rs in groups.items():
            if gpus is None:
                if not free:
                    continue
                gpus = tuple(rs[0].gpus) if rs[0].gpus and set(rs[0].gpus) <= set(free) else (
                    free[0],)
            if not set(gpus) <= set(free):
                continue
            free = [g for g in free if g not in gpus]
            plan.assignments.append(Assignment(tuple(gpus), tuple(r.id for r in rs),
                                               min(r.remaining_steps for r in rs)))
        return plan
