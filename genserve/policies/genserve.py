"""GenServe's SLO-aware policy: step-level preemption, elastic SP, step-level batching, joint admission.

At every decision point (arrival, a quantum done, a wake-up) the whole queue is re-planned:

1. Feasibility.  For each request and SP degree k: finish = now + encode/decode + remaining steps x
   step(k).  `need` is the least degree that meets the deadline (elastic SP: re-chosen every step,
   so GPUs a video does not need go to others); none means the request can no longer make it and is
   demoted to best effort (served only on GPUs nobody else wants).
2. Images first, earliest deadline first, on their `need` degree.  A compatible image joins a
   batch already planned (any step positions) when the batched step still meets every member's
   deadline and the join is cheap (launch-bound shapes) or no GPU is free.  Images run to completion.
3. A reserve of GPUs is kept from new videos for images: the larger of the recent mean image load
   times a headroom and the peak image demand in a sliding window (arrivals are bursty; a video step
   must not hold the last free GPU when an image with a one-second SLO arrives).
4. Videos are re-planned every step.  Admitted videos are committed: least laxity first, each takes
   its `need` degree from the GPUs images left; one that finds none at its step boundary is paused
   there (its state stays where it is): that is the preemption.  A new video is admitted only if the
   admitted videos' needs plus its own fit in the cluster minus the reserve, so admitted videos do
   not crowd each other out.  Choosing whom to admit is a knapsack with weight = GPUs and value =
   1 per deadline met; for unit values lightest-first attains the optimum count (exchange argument),
   so the DP collapses to a sort by GPU time.  A video whose laxity is nearly gone may use the
   reserve.
5. Hold (EASY backfilling): when the first new video in admission order cannot start, the policy
   computes when enough GPUs come back for it to still meet its deadline and lets later videos start
   only if they finish before then.
6. Spare GPUs within the video share speed admitted videos up (Ulysses scales videos almost
   linearly, so this is nearly free in GPU time and buys slack for later preemptions), then
   best-effort work runs on what is left beyond the reserve.

7. Topology (clusters of several nodes).  GPUs are placed inside one node (NVLink) when one has
   room.  When the degree a request wants fits in no node, SP spans nodes only if it pays: the
   cross-node step time at that degree (all-to-all over the slow link) must be strictly below the
   intra-node step time of the largest allowed degree that fits in one node, else that smaller
   degree is taken inside one node (fewer GPUs and at least as fast).

Mechanisms switch off for ablation: preempt (started videos always continue), elastic_sp (videos
keep their default degree), batch, reserve, peak, admission (deadline order instead), hold,
topology (topology-blind placement: lowest-index free GPUs, wherever they are).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from ..request import Kind, Request, Status
from .base import (BEST_EFFORT, HELD_FOR_EARLIER, NO_GPU, NOT_ADMITTED, PREEMPTED_FOR_URGENT,
                   Assignment, Plan, Policy, SchedulerState, register)
from .common import GpuPool, default_sp, degrees_for, tokens_of


@dataclass
class _Info:
    """Constants of one request shape on one cluster, computed once."""

    tokens: int
    degrees: tuple[int, ...]
    step: dict[int, float]     # seconds per step alone, by SP degree
    decode: float
    encode: float
    fixed: int                 # default SP degree (used when elastic SP is off)


@dataclass
class _Batch:
    gpus: tuple[int, ...]
    members: list[Request]
    tokens: int


@register("genserve")
@register("genserve-nopreempt", preempt=False)
@register("genserve-nosp", elastic_sp=False)
@register("genserve-nobatch", batch=False)
@register("genserve-blind", topology=False)
class GenServe(Policy):
    params = {"preempt": bool, "elastic_sp": bool, "batch": bool, "reserve": bool,
              "admission": bool, "hold": bool, "peak": bool, "window_s": float,
              "headroom": float, "min_reserve": int, "boost_efficiency": float, "max_batch": int,
              "be_step_s": float, "topology": bool}
    defaults = {"preempt": True, "elastic_sp": True, "batch": True, "reserve": True,
                "admission": True, "window_s": 120.0, "headroom": 2.0, "min_reserve": 1,
                "hold": True, "peak": True, "boost_efficiency": 0.75, "max_batch": 8,
                "be_step_s": 2.0, "topology": True}

    def __init__(self, **params):
        super().__init__(**params)
        if self.config["window_s"] <= 0 or self.config["headroom"] < 0:
            raise ValueError("policy genserve: window_s must be > 0 and headroom >= 0")
        if self.config["max_batch"] < 1:
            raise ValueError("policy genserve: max_batch must be >= 1")
        self._info: dict[tuple, _Info] = {}
        self._info_cluster = None
        self._seen: set[str] = set()
        self._recent: deque[tuple[float, str, float]] = deque()  # (arrival, id, GPU-seconds)
        self._load_sum = 0.0
        self._admitted: set[str] = set()
        self._hopeless: set[str] = set()  # once a deadline is out of reach it stays so
        self._held: str | None = None  # the waiting video GPUs are being held for
        self._peak: deque[tuple[float, int]] = deque()  # (time, image GPU demand), decreasing
        self._calls = 0

    # ----- per-request facts -----
    def info(self, r: Request, s: SchedulerState) -> _Info:
        # Everything here depends on the shape (and the cluster, checked once per decision).
        key = r.shape
        inf = self._info.get(key)
        if inf is None:
            lat = s.latency
            degs = degrees_for(r, lat, s.cluster)
            t = tokens_of(r)
            inf = _Info(t, degs, {k: lat.step_time(r.model, t, 1, k) for k in degs},
                        lat.decode_time(r.model, r.height, r.width, r.frames),
                        lat.encode_time(r.model), default_sp(r, lat, s.cluster))
            self._info[key] = inf
        return inf

    def _fin(self, r: Request, inf: _Info) -> float:
        return inf.decode + (inf.encode if r.steps_done == 0 else 0.0)

    def _options(self, r: Request, inf: _Info) -> tuple[int, ...]:
        if r.kind is Kind.VIDEO and not self.config["elastic_sp"]:
            return (inf.fixed,)
        return inf.degrees

    def need(self, r: Request, inf: _Info, now: float) -> int | None:
        """Least SP degree that meets the deadline if the request runs from now on."""
        left = r.deadline - now - self._fin(r, inf)
        rem = r.remaining_steps
        for k in self._options(r, inf):
            if rem * inf.step[k] <= left:
                return k
        return None

    def laxity(self, r: Request, inf: _Info, now: float) -> float:
        """Seconds the request can still wait and then meet its deadline at its fastest degree."""
        k = self._options(r, inf)[-1]
        return r.deadline - now - self._fin(r, inf) - r.remaining_steps * inf.step[k]

    # ----- image load estimate -----
    def _observe(self, s: SchedulerState) -> None:
        horizon = s.now - self.config["window_s"]
        for r in s.queue:
            if r.kind is Kind.IMAGE and r.id not in self._seen and r.arrival >= horizon:
                inf = self.info(r, s)
                gs = r.steps * inf.step[inf.degrees[0]] + inf.decode + inf.encode
                self._seen.add(r.id)
                self._recent.append((r.arrival, r.id, gs))
                self._load_sum += gs
        while self._recent and self._recent[0][0] < horizon:
            _, rid, gs = self._recent.popleft()
            self._seen.discard(rid)
            self._load_sum -= gs

    def reserve(self, s: SchedulerState) -> int:
        if not self.config["reserve"]:
            return 0
        load = max(self._load_sum, 0.0) / self.config["window_s"]  # mean GPUs busy with images
        want = max(math.ceil(load * self.config["headroom"]), self.config["min_reserve"])
        if self.config["peak"] and self._peak:
            # Bursty arrivals: keep room for the largest image demand seen in the window.
            want = max(want, self._peak[0][1])
        return min(want, s.cluster.num_gpus - 1)

    def _track_peak(self, s: SchedulerState, images) -> None:
        """Window maximum of image GPU demand (running + waiting), as a monotonic deque."""
        kinds = {r.id: r.kind for r in s.running}
        demand = sum(len(j.gpus) for j in s.inflight if kinds.get(j.requests[0]) is Kind.IMAGE)
        demand += sum(k for _, _, k in images)
        horizon = s.now - self.config["window_s"]
        while self._peak and self._peak[-1][1] <= demand:
            self._peak.pop()
        self._peak.append((s.now, demand))
        while self._peak[0][0] < horizon:
            self._peak.popleft()

    # ----- the plan -----
    def schedule(self, s: SchedulerState) -> Plan:
        self._calls += 1
        if self._calls % 2000 == 0:
            live = {r.id for r in s.queue} | {r.id for r in s.running}
            self._admitted &= live
            self._hopeless &= live
        if s.cluster != self._info_cluster:
            self._info, self._info_cluster = {}, s.cluster
        self._observe(s)
        now = s.now
        plan = Plan()
        pool = GpuPool(s.free_gpus, s.cluster, aware=self.config["topology"])
        images, videos, hopeless = [], [], []
        pinned_ok = not self.config["preempt"]
        for r in s.queue:
            if r.id in self._hopeless:
                hopeless.append(r)
                continue
            inf = self.info(r, s)
            k = self.need(r, inf, now)
            if k is None and pinned_ok and r.status is Status.RUNNING:
                k = len(r.gpus)  # without preemption a started video runs on, late or not
                self._admitted.add(r.id)
            if k is None:
                hopeless.append(r)
                self._hopeless.add(r.id)
                self._admitted.discard(r.id)
                if self._held == r.id:
                    self._held = None
                plan.reasons[r.id] = BEST_EFFORT
            else:
                (images if r.kind is Kind.IMAGE else videos).append((r, inf, k))

        self._track_peak(s, images)
        reserve = self.reserve(s)
        videos_running = {r.id for r in s.running if r.kind is Kind.VIDEO}
        video_inflight = sum(len(j.gpus) for j in s.inflight if j.requests[0] in videos_running)
        budget = s.cluster.num_gpus - reserve - video_inflight
        planned: list[tuple[Request, _Info, Assignment]] = []
        wake: list[float] = []

        if not self.config["preempt"]:
            # Without preemption a started video goes on before anything else is placed.
            started = [v for v in videos if v[0].status is Status.RUNNING]
            videos = [v for v in videos if v[0].status is not Status.RUNNING]
            for r, inf, k in started:
                k = max(k, len(r.gpus)) if self.config["elastic_sp"] else len(r.gpus)
                gpus = (self._take(r, inf, k, pool, s)
                        or self._take(r, inf, len(r.gpus), pool, s))
                if gpus is not None:
                    budget -= len(gpus)
                    planned.append((r, inf, Assignment(gpus, (r.id,), 1)))

        self._place_images(images, pool, plan, s)

        admitted = [v for v in videos if v[0].id in self._admitted]
        fresh = [v for v in videos if v[0].id not in self._admitted]
        admitted.sort(key=lambda v: (self.laxity(v[0], v[1], now), v[0].id))
        if self.config["admission"]:
            # Knapsack with unit values: lightest (least GPU time) first attains the most deadlines.
            fresh.sort(key=lambda v: (v[2] * v[0].remaining_steps * v[1].step[v[2]], v[0].id))
        else:
            fresh.sort(key=lambda v: (v[0].deadline, v[0].id))
        # Admission keeps the admitted videos' current needs within the video share of the cluster,
        # so admitted videos do not crowd each other out (no ping-pong between half-served videos).
        committed = sum(k for _, _, k in admitted)
        for q in s.running:
            if q.id in self._admitted and q.kind is Kind.VIDEO:
                qi = self.info(q, s)
                committed += self.need(q, qi, now) or len(q.gpus)
        video_share = s.cluster.num_gpus - reserve
        hold_until: float | None = None
        for r, inf, k in admitted + fresh:
            if not len(pool):
                # Nothing left to hand out; GPUs coming back will bring the next decision.
                plan.reasons[r.id] = (PREEMPTED_FOR_URGENT if r.status is Status.RUNNING
                                      else NO_GPU)
                continue
            is_fresh = r.id not in self._admitted
            margin = self.laxity(r, inf, now) - 2 * inf.step[self._options(r, inf)[-1]]
            critical = margin <= 1e-6
            # A critical video, or the one GPUs are being held for, may dip into the image reserve.
            privileged = critical or r.id == self._held
            if is_fresh and hold_until is not None and not critical and (
                    now + self._fin(r, inf) + r.remaining_steps * inf.step[k] > hold_until):
                plan.reasons[r.id] = HELD_FOR_EARLIER
                wake.append(now + margin)
                continue  # backfill only what is done before the held video's GPUs are due
            gpus = None
            # Admitted videos are committed: they take their need wherever GPUs are free (only
            # images come before them).  A new one must fit next to them in the video share; one
            # that is critical or held for may use the whole cluster.
            fits = not is_fresh or committed + k <= (s.cluster.num_gpus if privileged
                                                     else video_share)
            if fits:
                gpus = self._take(r, inf, k, pool, s)
            if gpus is None:
                if not is_fresh:
                    plan.reasons[r.id] = (PREEMPTED_FOR_URGENT if r.status is Status.RUNNING
                                          else NO_GPU)
                else:
                    plan.reasons[r.id] = NOT_ADMITTED if not fits else NO_GPU
                    if hold_until is None and self.config["hold"]:
                        hold_until = self._start_time(r, inf, pool, planned, s)
                        if hold_until is not None:
                            self._held = r.id
                if not critical:
                    wake.append(now + margin)
                continue
            if is_fresh:
                self._admitted.add(r.id)
                committed += k
            if r.id == self._held:
                self._held = None
            budget -= len(gpus)
            planned.append((r, inf, Assignment(gpus, (r.id,), 1)))

        if self.config["elastic_sp"] and hold_until is None:
            planned.sort(key=lambda v: self.laxity(v[0], v[1], now))
            self._boost(planned, pool, max(budget, 0))
        plan.assignments.extend(a for _, _, a in planned)
        self._best_effort(hopeless, pool, plan, s, reserve)
        if wake:
            plan.wake_at = min(wake)
        return plan

    def _take(self, r: Request, inf: _Info, k: int, pool: GpuPool, s: SchedulerState
              ) -> tuple[int, ...] | None:
        """Take `k` GPUs for `r`, spanning nodes only if it pays.

        The pool stays inside one node whenever one has `k` free.  When none has, `k` GPUs over
        several nodes pay all-to-all over the slow link every step; the largest allowed degree that
        fits in one node is the alternative.  Span only if the spanning step is strictly faster:
        otherwise the smaller degree is at least as fast on fewer GPUs, and the rest stay free for
        others.  (Batch of 1: placement starts an assignment alone, images join it later.)
        """
        if not self.config["topology"] or len(pool) < k or pool.max_in_node() >= k:
            return pool.take(k, prefer=r.gpus)  # blind, no room at all, or fits in one node
        inside = [d for d in self._options(r, inf) if d <= pool.max_in_node()]
        if inside and not (s.latency.step_time(r.model, inf.tokens, 1, k, cross_node=True)
                           < inf.step[inside[-1]]):
            return pool.take(inside[-1], prefer=r.gpus)
        return pool.take(k, prefer=r.gpus)  # spanning is faster (or the only degree allowed)

    def _start_time(self, r: Request, inf: _Info, pool: GpuPool, planned, s: SchedulerState
                    ) -> float | None:
        """Earliest time enough GPUs free up for `r` to still meet its deadline, or None.

        GPUs come back as running work finishes (videos at their current degree, images at the end
        of their quantum); like EASY backfilling, later videos may only use them meanwhile if they
        are done before then.
        """
        now = s.now
        events: list[tuple[float, int]] = []
        by_id = {q.id: q for q in s.running}
        for j in s.inflight:
            q = by_id.get(j.requests[0])
            if q is None:
                continue
            if q.kind is Kind.IMAGE or len(j.requests) > 1:
                events.append((j.end, len(j.gpus)))
            else:
                qi = self.info(q, s)
                left = q.remaining_steps - 1  # this quantum is one step
                k = len(j.gpus)
                events.append((j.end + left * qi.step.get(k, qi.step[qi.degrees[0]]) + qi.decode,
                               k))
        for q, qi, a in planned:
            k = len(a.gpus)
            events.append((now + q.remaining_steps * qi.step[k] + qi.decode, k))
        events.sort()
        free = len(pool)
        rem, fin = r.remaining_steps, self._fin(r, inf)
        for t, n in events:
            free += n
            for k in self._options(r, inf):
                if k > free:
                    break
                if t + fin + rem * inf.step[k] <= r.deadline:
                    return t
        return None

    def _place_images(self, images, pool: GpuPool, plan: Plan, s: SchedulerState) -> None:
        batches: dict[tuple, list[_Batch]] = {}
        images.sort(key=lambda v: (v[0].deadline, v[0].id))
        for r, inf, k in images:
            if self.config["batch"] and self._join(r, inf, batches.get(r.shape, ()), pool, s):
                continue
            gpus = self._take(r, inf, k, pool, s)
            if gpus is None:  # waits for the next GPUs to free up
                plan.reasons[r.id] = NO_GPU
                continue
            batches.setdefault(r.shape, []).append(_Batch(gpus, [r], inf.tokens))
        for group in batches.values():
            for b in group:
                steps = min(m.remaining_steps for m in b.members)
                plan.assignments.append(Assignment(b.gpus, tuple(m.id for m in b.members), steps))

    def _join(self, r: Request, inf: _Info, batches, pool: GpuPool, s: SchedulerState) -> bool:
        lat, now = s.latency, s.now
        for b in batches:
            n = len(b.members) + 1
            if n > self.config["max_batch"]:
                continue
            k, cross = len(b.gpus), s.cluster.spans_nodes(b.gpus)  # a spanning batch pays more
            t_new = lat.step_time(r.model, b.tokens, n, k, cross)
            t_cur = lat.step_time(r.model, b.tokens, n - 1, k, cross)
            cheap = (t_new - t_cur) <= 0.25 * inf.step.get(k, t_new)
            if not cheap and len(pool) > 0:
                continue
            members = b.members + [r]
            # Members' decodes run one after another at the end of the quantum.
            decode = sum(self.info(m, s).decode for m in members)
            if all(now + self._fin(m, self.info(m, s)) - self.info(m, s).decode + decode
                   + m.remaining_steps * t_new <= m.deadline for m in members):
                b.members.append(r)
                return True
        return False

    def _boost(self, planned, pool: GpuPool, budget: int) -> None:
        """Give spare GPUs within the video budget to planned videos, least laxity first.

        (Lending the image reserve to short-step video degrees was tried and measured no gain.)
        """
        eff = self.config["boost_efficiency"]
        for i, (r, inf, a) in enumerate(planned):
            k = len(a.gpus)
            while budget > 0:
                k2 = next((d for d in inf.degrees if d > k), None)
                if k2 is None or k2 - k > budget or len(pool) < k2 - k:
                    break
                if (inf.step[k] / inf.step[k2]) / (k2 / k) < eff:
                    break
                pool.give_back(a.gpus)
                gpus = pool.take(k2, prefer=a.gpus, allow_span=False)
                if gpus is None:
                    pool.take_exact(a.gpus)
                    break
                budget -= k2 - k
                a = Assignment(gpus, a.requests, a.steps)
                k = k2
            planned[i] = (r, inf, a)

    def _best_effort(self, hopeless, pool: GpuPool, plan: Plan, s: SchedulerState,
                     reserve: int) -> None:
        """Demoted requests use GPUs beyond the reserve; with nothing else running, any GPU."""
        idle_system = not s.inflight and not plan.assignments
        if not hopeless or (len(pool) <= reserve and not idle_system):
            return
        hopeless.sort(key=lambda r: (r.remaining_steps * self.info(r, s).step[1], r.id))
        for r in hopeless:
            inf = self.info(r, s)
            spare = len(pool) if idle_system else len(pool) - reserve
            if spare <= 0:
                break
            opts = [k for k in self._options(r, inf) if k <= spare]
            if not opts:
                continue
            # Short steps keep best-effort work preemptible; images just run to completion.
            k = next((d for d in opts if inf.step[d] <= self.config["be_step_s"]), opts[-1])
            gpus = self._take(r, inf, k, pool, s)
            if gpus is None:
                continue
            steps = r.remaining_steps if r.kind is Kind.IMAGE else 1
            plan.assignments.append(Assignment(gpus, (r.id,), steps))
            idle_system = False
