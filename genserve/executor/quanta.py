"""What both executors do with a policy's plan, as plain functions over requests and quanta.

A quantum is one assignment carried out: `steps` denoising steps of a batch on a GPU set.  Its
cost (`quantum_cost`) is the one latency estimate of the system: the simulator advances its
virtual clock by it, and the engine sets `InFlight.end` from it, so the policy sees the same
picture of running work under either clock.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from ..latency import LatencyModel
from ..policies.base import Assignment, Cluster, InFlight, Plan
from ..policies.common import tokens_of
from ..request import Request, Status

log = logging.getLogger("genserve.executor")


class PlanError(RuntimeError):
    """The policy returned a plan that cannot be carried out (a policy bug)."""


@dataclass
class Quantum:
    """An assignment in flight: started at `start`, expected to take `cost` seconds."""

    key: int
    assignment: Assignment
    start: float
    cost: float
    cross_node: bool
    step_s: float = 0.0  # the part of `cost` that is steps (the rest: dispatch, encode, moves, decode)
    step_key: tuple = ()  # what its step time depends on (`step_key`)

    @property
    def gpus(self) -> tuple[int, ...]:
        return self.assignment.gpus

    @property
    def requests(self) -> tuple[str, ...]:
        return self.assignment.requests

    @property
    def end(self) -> float:
        return self.start + self.cost

    def in_flight(self) -> InFlight:
        return InFlight(self.gpus, self.requests, self.end)


def validate_assignment(a: Assignment, free: set[int], queue: dict[str, Request],
                        latency: LatencyModel) -> list[Request]:
    """The checks every executor applies to a policy's assignment; returns the member requests.
    Raises PlanError: a bad plan is a policy bug, never silently fixed."""
    if not a.gpus or not a.requests or a.steps < 1:
        raise PlanError(f"empty or zero-step assignment {a}")
    if len(set(a.gpus)) != len(a.gpus) or not free.issuperset(a.gpus):
        raise PlanError(f"assignment uses busy or duplicate GPUs {a.gpus} (free: {sorted(free)})")
    members = []
    for rid in a.requests:
        r = queue.get(rid)
        if r is None:
            raise PlanError(f"request {rid!r} is not plannable now (unknown, running or done)")
        members.append(r)
    if len(set(a.requests)) != len(a.requests):
        raise PlanError(f"request listed twice in {a}")
    lead = members[0]
    if any(r.shape != lead.shape for r in members):
        raise PlanError(f"incompatible batch {a.requests}: shapes differ")
    if a.steps > min(r.remaining_steps for r in members):
        raise PlanError(f"{a.steps} steps exceed a member's remaining steps in {a.requests}")
    if a.cfg_split:
        if not lead.shape[-1]:  # the batch key's CFG flag
            raise PlanError(f"cfg_split for {a.requests}: {lead.model} at guidance "
                            f"{lead.guidance:g} runs no unconditional branch")
        if len(a.gpus) not in latency.cfg_split_sizes(lead.model):
            raise PlanError(f"cfg_split on {len(a.gpus)} GPUs not allowed for {lead.model}: "
                            f"{latency.cfg_split_sizes(lead.model)}")
    elif len(a.gpus) not in latency.degrees(lead.model):
        raise PlanError(f"SP degree {len(a.gpus)} not allowed for {lead.model}")
    return members


def quantum_cost(a: Assignment, members: list[Request], cluster: Cluster,
                 latency: LatencyModel) -> float:
    """Seconds from dispatch to result, as the engine carries an assignment out: one job round
    trip; a new member encoded inside the job; a state held elsewhere moved in (from its GPUs, or
    from a host checkpoint after a loss); the steps of the batch; decode of members that finish.
    Call it before the members are placed: it reads where their states are."""
    other, steps, _ = quantum_parts(a, members, cluster, latency)
    return other + steps


def step_key(a: Assignment, members: list[Request], cluster: Cluster) -> tuple:
    """What a quantum's step time depends on: (model, tokens, batch, GPUs, cross-node, CFG
    split), the arguments of `LatencyModel.step_time`."""
    lead = members[0]
    return (lead.model, tokens_of(lead), len(members), len(a.gpus), cluster.spans_nodes(a.gpus),
            a.cfg_split)


def quantum_parts(a: Assignment, members: list[Request], cluster: Cluster,
                  latency: LatencyModel) -> tuple[float, float, tuple]:
    """`quantum_cost` as (everything but the steps, the steps), and the steps' `step_key`."""
    lat = latency
    setup = lat.dispatch_time(len(a.gpus))
    for r in members:
        if not r.gpus and r.steps_done == 0:
            setup += lat.encode_time(r.model)
        elif r.gpus and not set(a.gpus) <= set(r.gpus):
            # Resumed on a subset of its holders: each already has a copy, nothing moves.
            setup += lat.move_time(r, cluster.spans_nodes(r.gpus + a.gpus))
        elif not r.gpus:  # back from a host checkpoint
            setup += lat.move_time(r, False)
    key = step_key(a, members, cluster)
    steps = a.steps * lat.step_time(*key)
    setup += sum(lat.decode_time(r.model, r.height, r.width, r.frames)
                 for r in members if r.remaining_steps == a.steps)
    return setup, steps, key


def place_members(members: list[Request], gpus: tuple[int, ...], now: float,
                  queue: dict[str, Request]) -> int:
    """Move a validated assignment's requests onto `gpus` (start, resume or stay running) and out
    of the plannable queue; returns how many had their state on another GPU set."""
    moved = 0
    for r in members:
        if r.gpus and set(r.gpus) != set(gpus):
            moved += 1
        if r.status is Status.WAITING:
            r.start(now, gpus)
        elif r.status is Status.PREEMPTED:
            r.resume(now, gpus)
        else:
            r.move_to(gpus)
        del queue[r.id]
    return moved


def pause_unplanned(queue: dict[str, Request], now: float) -> list[Request]:
    """Requests that ran the last quantum and were not re-planned are paused; returns them."""
    paused = [r for r in queue.values() if r.status is Status.RUNNING]
    for r in paused:
        r.preempt(now)
    return paused


def count_reasons(plan: Plan, last: dict[str, str], counter: Counter, now: float) -> None:
    """Count each change of a request's defer reason once (not once per decision)."""
    for rid, why in plan.reasons.items():
        if last.get(rid) != why:
            last[rid] = why
            counter[why] += 1
            log.debug("t=%.3f %s deferred: %s", now, rid, why)
