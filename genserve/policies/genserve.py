"""GenServe's SLO-aware policy: step-level preemption, elastic SP, step-level batching, joint admission.

At every decision point (arrival, a quantum done, a wake-up) the whole queue is re-planned, in
phases (the method that does each in brackets):

1. Classify (`_classify`).  For each request and SP degree k: finish = now + encode/decode +
   remaining steps x step(k).  `need` is the least degree that meets the deadline (elastic SP:
   re-chosen every step, so GPUs a video does not need go to others); none means the request can no
   longer make it and is demoted to best effort (served only on GPUs nobody else wants).
2. Place images (`_place_images`), earliest deadline first, on their `need` degree.  A compatible
   image joins a batch already planned (any step positions) when the batched step still meets every
   member's deadline and the join is cheap (launch-bound shapes) or no GPU is free.  Images run to
   completion.
3. A reserve of GPUs (`reserve`) is kept from new videos for images: the larger of the recent mean
   image load times a headroom and the peak image demand in a sliding window (arrivals are bursty; a
   video step must not hold the last free GPU when an image with a one-second SLO arrives).
4. Admit videos (`_admit_videos`); they are re-planned every step, earliest deadline first.  Each
   takes its `need` degree from the GPUs images left; one that finds none at its step boundary is
   paused there (its state stays where it is): that is the preemption.  Admitted videos are
   committed: they take their need wherever GPUs are free.  A new video is admitted only if its
   need fits next to the videos placed before it (and those still in flight) within the cluster
   minus the reserve, so admitted videos do not crowd each other out.  A new video due earlier
   goes before admitted ones due later: they have the slack to wait for it (admitting in a fixed
   order of commitment instead left short videos queued behind long ones until they missed).  A
   video whose laxity is nearly gone may use the reserve.
5. Hold (`_hold`, EASY backfilling): when the first new video in that order cannot start, the
   policy computes when enough GPUs come back for it to still meet its deadline and lets later
   videos start only if they finish before then.  The held video itself stays out of the image
   reserve until it is critical, like any other.
6. Boost (`_boost`): spare GPUs within the video share speed admitted videos up (Ulysses scales
   videos almost linearly, so this is nearly free in GPU time and buys slack for later preemptions).
7. Best effort (`_best_effort`): demoted work runs on what is left beyond the reserve (a late
   image may use the reserve: it is for images, and idle it starved them).
8. CFG split (`_choose_cfg_split`): each assignment runs its GPUs the faster way for its batch.

A degree above is a GPU count.  Under classifier-free guidance 2k GPUs can also run the two
guidance branches side by side, each at half the batch with Ulysses degree k, exchanging only the
noise predictions (`Assignment.cfg_split`): a second elastic dimension, chosen per step like the
SP degree.  Each count is priced at the faster of the two ways (`_config`), and counts no faster
than a smaller one are not used, so `need` stays the least GPU time that meets the deadline.

Topology (`_take`, clusters of several nodes).  GPUs are placed inside one node (NVLink) when one
has room.  When the degree a request wants fits in no node, SP spans nodes only if it pays: the
cross-node step time at that degree (all-to-all over the slow link) must be strictly below the
intra-node step time of the largest allowed degree that fits in one node, else that smaller degree
is taken inside one node (fewer GPUs and at least as fast).

Mechanisms switch off for ablation: preempt (started videos always continue), elastic_sp (videos
keep their default degree), cfg_split, batch, reserve, peak, hold, topology (topology-blind
placement: lowest-index free GPUs, wherever they are); `video_order=admitted` places admitted
videos first (least laxity first), then new ones lightest first.

The phases pass `Candidate`s (a request, its shape's constants, the degree it needs now) and write
into one `_Decision` (the free GPUs, the plan, the videos placed so far).  All the policy carries
from one call to the next is in `GenServe.memory` (a `_Memory`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

from ..request import Kind, Request, Status
from .base import (BEST_EFFORT, HELD_FOR_EARLIER, NO_GPU, NOT_ADMITTED, PREEMPTED_FOR_URGENT,
                   Assignment, Cluster, Plan, Policy, SchedulerState, register, typed_params)
from .common import GpuPool, tokens_of
from .shapes import ShapeInfo, gpu_config, shape_info


@dataclass(frozen=True)
class GenServeParams:
    """The policy's parameters (`genserve:key=value`), in the order `describe` lists them."""

    preempt: bool = True            # pause a started video at a step boundary for others
    elastic_sp: bool = True         # re-choose a video's SP degree every step
    batch: bool = True              # images join compatible planned batches
    reserve: bool = True            # keep GPUs from new videos for images
    # "deadline": all videos earliest deadline first; "admitted": admitted videos first (least
    # laxity first), then new ones lightest first.
    video_order: str = "deadline"
    window_s: float = 120.0         # sliding window of image load and peak image demand
    headroom: float = 2.0           # reserve >= mean image load x headroom
    min_reserve: int = 1
    hold: bool = True               # hold GPUs for the first new video that cannot start
    peak: bool = True               # reserve >= peak image demand in the window
    boost_efficiency: float = 0.75  # least speed-up per GPU added for a boost to be worth it
    max_batch: int = 8
    be_step_s: float = 2.0          # longest step best-effort work takes, so it stays preemptible
    topology: bool = True           # node-aware placement (else lowest-index free GPUs)
    cfg_split: bool = True          # CFG branches side by side on two GPU halves where faster
    late_images: bool = True        # images past saving may use the image reserve

    def validate(self) -> None:
        problems = []
        if not self.window_s > 0:
            problems.append(f"window_s must be > 0 (the image-load window), got {self.window_s}")
        if not self.headroom >= 0:
            problems.append(f"headroom must be >= 0, got {self.headroom}")
        if self.video_order not in ("deadline", "admitted"):
            problems.append(f"video_order must be deadline or admitted, got {self.video_order!r}")
        if self.max_batch < 1:
            problems.append(f"max_batch must be >= 1 (1 means no batching), got {self.max_batch}")
        if problems:
            raise ValueError("policy genserve: " + "; ".join(problems))


@dataclass(slots=True)
class Candidate:
    """A request that can still meet its deadline, at one decision point.  (Not frozen: one is
    made per queued request per decision, and a frozen dataclass's constructor costs twice.)"""

    request: Request
    info: ShapeInfo
    sp: int  # the degree it needs now (least that meets the deadline; a pinned video: its own)


@dataclass
class _Planned:
    """A video placed at this decision; boost may still widen its assignment."""

    cand: Candidate
    assignment: Assignment


@dataclass
class _Batch:
    """Images planned to step together.  Every image offered to it has its members' shape, so
    whether one more may join depends on the batch size alone as far as its members are
    concerned: the step time and the cheapness of a join are kept per size, and a batch whose
    members cannot take one more is closed for the rest of the decision."""

    gpus: tuple[int, ...]
    members: list[Request]
    tokens: int
    decode: float = 0.0  # the members' decodes, run one after another
    closed: bool = False
    # Members + 1 -> (step seconds with it, step seconds without it).
    step: dict[int, tuple[float, float]] = field(default_factory=dict)


@dataclass
class _Decision:
    """What one call to `schedule` builds up as its phases run."""

    s: SchedulerState
    pool: GpuPool
    plan: Plan = field(default_factory=Plan)
    reserve: int = 0
    # GPUs video work may still take outside the reserve (what boost may hand out).
    budget: int = 0
    planned: list[_Planned] = field(default_factory=list)  # videos placed, in placement order
    wake: list[float] = field(default_factory=list)
    hold_until: float | None = None  # when GPUs come back for the video being held for
    # When running work gives its GPUs back: (time, GPUs), the same for every `_hold` try.
    returns: list[tuple[float, int]] | None = None


@dataclass
class _Memory:
    """Everything the policy keeps from one decision to the next."""

    calls: int = 0
    # Per-shape constants: a cache, valid for `cluster` only.
    shapes: dict[tuple, ShapeInfo] = field(default_factory=dict)
    cluster: Cluster | None = None
    latency_version: int = 0  # a self-correcting latency model's (`genserve.feedback`)
    # Images that arrived within the window, for the mean image load.
    recent: deque[tuple[float, str, float]] = field(default_factory=deque)  # (arrival, id, GPU-s)
    seen: set[str] = field(default_factory=set)  # ids in `recent`
    load_sum: float = 0.0  # GPU-seconds in `recent`
    # Window maximum of image GPU demand, as a monotonic deque of (time, demand), decreasing.
    peak: deque[tuple[float, int]] = field(default_factory=deque)
    admitted: set[str] = field(default_factory=set)  # videos committed to
    # Once a deadline is out of reach it stays so (until step times are corrected).
    hopeless: set[str] = field(default_factory=set)
    held: str | None = None  # the waiting video GPUs are being held for


@register("genserve")
@register("genserve-nopreempt", preempt=False)
@register("genserve-nosp", elastic_sp=False)
@register("genserve-nobatch", batch=False)
@register("genserve-blind", topology=False)
class GenServe(Policy):
    params, defaults = typed_params(GenServeParams)

    def __init__(self, **params):
        super().__init__(**params)
        self.settings = GenServeParams(**self.config)
        self.settings.validate()
        self.memory = _Memory()

    # ----- per-request facts -----
    def info(self, r: Request, s: SchedulerState) -> ShapeInfo:
        # Everything here depends on the shape (and the cluster, checked once per decision).
        inf = self.memory.shapes.get(r.shape)
        if inf is None:
            inf = self.memory.shapes[r.shape] = shape_info(r, s.latency, s.cluster,
                                                           self.settings.cfg_split)
        return inf

    def _config(self, r: Request, lat, tokens: int, n: int, k: int, cross: bool
                ) -> tuple[float, bool]:
        return gpu_config(r, lat, tokens, n, k, cross, self.settings.cfg_split)

    def _fin(self, r: Request, inf: ShapeInfo) -> float:
        return inf.decode + (inf.encode if r.steps_done == 0 else 0.0)

    def _options(self, r: Request, inf: ShapeInfo) -> tuple[int, ...]:
        if r.kind is Kind.VIDEO and not self.settings.elastic_sp:
            return (inf.fixed,)
        return inf.degrees

    def need(self, r: Request, inf: ShapeInfo, now: float) -> int | None:
        """Least SP degree that meets the deadline if the request runs from now on."""
        left = r.deadline - now - self._fin(r, inf)
        rem = r.remaining_steps
        for k in self._options(r, inf):
            if rem * inf.step[k] <= left:
                return k
        return None

    def laxity(self, r: Request, inf: ShapeInfo, now: float) -> float:
        """Seconds the request can still wait and then meet its deadline at its fastest degree."""
        k = self._options(r, inf)[-1]
        return r.deadline - now - self._fin(r, inf) - r.remaining_steps * inf.step[k]

    # ----- memory: image load and peak demand -----
    def _remember(self, s: SchedulerState) -> None:
        """Bring the memory up to this decision point."""
        mem = self.memory
        mem.calls += 1
        if mem.calls % 2000 == 0:
            # Ids of requests that left the system would pile up; a set per call would cost more.
            live = {r.id for r in s.queue} | {r.id for r in s.running}
            mem.admitted &= live
            mem.hopeless &= live
        if s.cluster != mem.cluster:
            mem.shapes, mem.cluster = {}, s.cluster
        version = getattr(s.latency, "version", 0)
        if version != mem.latency_version:
            # Step times were corrected: a request given up on with the old ones may make it now.
            mem.shapes, mem.latency_version = {}, version
            mem.hopeless.clear()
        horizon = s.now - self.settings.window_s
        for r in s.queue:
            if r.kind is Kind.IMAGE and r.id not in mem.seen and r.arrival >= horizon:
                inf = self.info(r, s)
                gs = r.steps * inf.step[inf.degrees[0]] + inf.decode + inf.encode
                mem.seen.add(r.id)
                mem.recent.append((r.arrival, r.id, gs))
                mem.load_sum += gs
        while mem.recent and mem.recent[0][0] < horizon:
            _, rid, gs = mem.recent.popleft()
            mem.seen.discard(rid)
            mem.load_sum -= gs

    def reserve(self, s: SchedulerState) -> int:
        cfg, mem = self.settings, self.memory
        if not cfg.reserve:
            return 0
        load = max(mem.load_sum, 0.0) / cfg.window_s  # mean GPUs busy with images
        want = max(math.ceil(load * cfg.headroom), cfg.min_reserve)
        if cfg.peak and mem.peak:
            # Bursty arrivals: keep room for the largest image demand seen in the window.
            want = max(want, mem.peak[0][1])
        return min(want, s.cluster.num_gpus - 1)

    def _track_peak(self, s: SchedulerState, images: list[Candidate]) -> None:
        """Window maximum of image GPU demand (running + waiting), as a monotonic deque."""
        peak = self.memory.peak
        kinds = {r.id: r.kind for r in s.running}
        demand = sum(len(j.gpus) for j in s.inflight if kinds.get(j.requests[0]) is Kind.IMAGE)
        demand += sum(c.sp for c in images)
        horizon = s.now - self.settings.window_s
        while peak and peak[-1][1] <= demand:
            peak.pop()
        peak.append((s.now, demand))
        while peak[0][0] < horizon:
            peak.popleft()

    # ----- the plan -----
    def schedule(self, s: SchedulerState) -> Plan:
        self._remember(s)
        d = _Decision(s, GpuPool(s.free_gpus, s.cluster, aware=self.settings.topology))
        images, videos, hopeless = self._classify(d)
        self._track_peak(s, images)
        d.reserve = self.reserve(s)
        videos_running = {r.id for r in s.running if r.kind is Kind.VIDEO}
        video_inflight = sum(len(j.gpus) for j in s.inflight if j.requests[0] in videos_running)
        d.budget = s.cluster.num_gpus - d.reserve - video_inflight
        if not self.settings.preempt:
            videos = self._continue_started(videos, d)
        self._place_images(images, d)
        self._admit_videos(videos, d)
        if self.settings.elastic_sp and d.hold_until is None:
            self._boost(d)
        d.plan.assignments.extend(p.assignment for p in d.planned)
        self._best_effort(hopeless, d)
        self._choose_cfg_split(d)
        if d.wake:
            d.plan.wake_at = min(d.wake)
        return d.plan

    def _classify(self, d: _Decision) -> tuple[list[Candidate], list[Candidate], list[Request]]:
        """Split the queue into images and videos that can still make it, each with the degree it
        needs, and requests demoted to best effort."""
        mem, s, now = self.memory, d.s, d.s.now
        images: list[Candidate] = []
        videos: list[Candidate] = []
        hopeless: list[Request] = []
        pinned_ok = not self.settings.preempt
        for r in s.queue:
            if r.id in mem.hopeless:
                hopeless.append(r)
                continue
            inf = self.info(r, s)
            k = self.need(r, inf, now)
            if k is None and pinned_ok and r.status is Status.RUNNING:
                k = len(r.gpus)  # without preemption a started video runs on, late or not
                mem.admitted.add(r.id)
            if k is None:
                hopeless.append(r)
                mem.hopeless.add(r.id)
                mem.admitted.discard(r.id)
                if mem.held == r.id:
                    mem.held = None
                d.plan.reasons[r.id] = BEST_EFFORT
            else:
                (images if r.kind is Kind.IMAGE else videos).append(Candidate(r, inf, k))
        return images, videos, hopeless

    def _continue_started(self, videos: list[Candidate], d: _Decision) -> list[Candidate]:
        """Without preemption a started video goes on before anything else is placed; returns the
        videos not started yet."""
        for c in videos:
            r = c.request
            if r.status is not Status.RUNNING:
                continue
            k = max(c.sp, len(r.gpus)) if self.settings.elastic_sp else len(r.gpus)
            gpus = (self._take(r, c.info, k, d.pool, d.s)
                    or self._take(r, c.info, len(r.gpus), d.pool, d.s))
            if gpus is not None:
                d.budget -= len(gpus)
                d.planned.append(_Planned(c, Assignment(gpus, (r.id,), 1)))
        return [c for c in videos if c.request.status is not Status.RUNNING]

    def _place_images(self, images: list[Candidate], d: _Decision) -> None:
        batches: dict[tuple, list[_Batch]] = {}
        images.sort(key=lambda c: (c.request.deadline, c.request.id))
        for c in images:
            r = c.request
            if self.settings.batch and self._join(c, batches.get(r.shape, ()), d):
                continue
            gpus = self._take(r, c.info, c.sp, d.pool, d.s)
            if gpus is None:  # waits for the next GPUs to free up
                d.plan.reasons[r.id] = NO_GPU
                continue
            batches.setdefault(r.shape, []).append(_Batch(gpus, [r], c.info.tokens,
                                                          c.info.decode))
        for group in batches.values():
            for b in group:
                steps = min(m.remaining_steps for m in b.members)
                d.plan.assignments.append(
                    Assignment(b.gpus, tuple(m.id for m in b.members), steps))

    def _join(self, c: Candidate, batches, d: _Decision) -> bool:
        """Add image `c` to a planned batch if every member still meets its deadline, and the join
        is cheap or no GPU is free anyway."""
        s, now = d.s, d.s.now
        r, inf = c.request, c.info
        for b in batches:
            if b.closed:
                continue
            n = len(b.members) + 1
            if n > self.settings.max_batch:
                b.closed = True
                continue
            k = len(b.gpus)
            if n not in b.step:
                cross = s.cluster.spans_nodes(b.gpus)  # a spanning batch pays more
                b.step[n] = (self._config(r, s.latency, b.tokens, n, k, cross)[0],
                             self._config(r, s.latency, b.tokens, n - 1, k, cross)[0])
            t_new, t_cur = b.step[n]
            cheap = (t_new - t_cur) <= 0.25 * inf.step.get(k, t_new)
            if not cheap and len(d.pool) > 0:
                continue
            # Members' decodes run one after another at the end of the quantum.
            decode = b.decode + inf.decode

            def meets(m: Request) -> bool:
                return (now + self._fin(m, inf) - inf.decode + decode + m.remaining_steps * t_new
                        <= m.deadline)

            if not all(meets(m) for m in b.members):
                b.closed = True  # the same for any image offered to it from now on
                continue
            if meets(r):
                b.members.append(r)
                b.decode = decode
                return True
        return False

    def _admit_videos(self, videos: list[Candidate], d: _Decision) -> None:
        """Place videos in `video_order`; a new one is admitted only if it fits next to the
        videos committed before it (see the module's phase 4)."""
        mem, s, now = self.memory, d.s, d.s.now
        by_deadline = self.settings.video_order == "deadline"
        # Admitted videos still in flight keep their current need (their GPUs come back later).
        committed = 0
        for q in s.running:
            if q.id in mem.admitted and q.kind is Kind.VIDEO:
                committed += self.need(q, self.info(q, s), now) or len(q.gpus)
        if by_deadline:
            # A new video with an earlier deadline goes before admitted ones due later: they have
            # the slack to wait for it, while a short video queued behind long ones committed
            # minutes before their deadlines misses its own.  It still must fit next to the videos
            # before it; admitted ones after it take their need from what is left.  Deadlines do
            # not move, so neither does the order: no ping-pong between half-served videos.
            order = sorted(videos, key=lambda c: (c.request.deadline, c.request.id))
        else:
            admitted = [c for c in videos if c.request.id in mem.admitted]
            fresh = [c for c in videos if c.request.id not in mem.admitted]
            admitted.sort(key=lambda c: (self.laxity(c.request, c.info, now), c.request.id))
            # Knapsack with unit values: lightest (least GPU time) first meets the most deadlines.
            fresh.sort(key=lambda c: (c.sp * c.request.remaining_steps * c.info.step[c.sp],
                                      c.request.id))
            order = admitted + fresh
            committed += sum(c.sp for c in admitted)  # their needs are reserved up front
        video_share = s.cluster.num_gpus - d.reserve
        for c in order:
            is_fresh = c.request.id not in mem.admitted
            if self._place_video(c, d, is_fresh, committed, video_share) and (
                    is_fresh or by_deadline):
                mem.admitted.add(c.request.id)
                committed += c.sp

    def _place_video(self, c: Candidate, d: _Decision, is_fresh: bool, committed: int,
                     video_share: int) -> bool:
        """Give video `c` its need, or record why not (and when to look again); True if placed."""
        r, inf, k = c.request, c.info, c.sp
        mem, now = self.memory, d.s.now
        if not len(d.pool):
            # Nothing left to hand out; GPUs coming back will bring the next decision.
            d.plan.reasons[r.id] = PREEMPTED_FOR_URGENT if r.status is Status.RUNNING else NO_GPU
            return False
        margin = self.laxity(r, inf, now) - 2 * inf.step[self._options(r, inf)[-1]]
        critical = margin <= 1e-6
        # A critical video may take the whole cluster, image reserve included.  The video GPUs
        # are held for may dip into the reserve but must leave images a GPU: one that needs every
        # GPU would hold them all for its whole run, long before it has to, and an image arriving
        # meanwhile waits a video step, longer than its slack.
        n = d.s.cluster.num_gpus
        limit = n if critical else n - min(d.reserve, 1) if r.id == mem.held else video_share
        if is_fresh and d.hold_until is not None and not critical and (
                now + self._fin(r, inf) + r.remaining_steps * inf.step[k] > d.hold_until):
            d.plan.reasons[r.id] = HELD_FOR_EARLIER
            d.wake.append(now + margin)
            return False  # backfill only what is done before the held video's GPUs are due
        # Admitted videos are committed: they take their need wherever GPUs are free (only images
        # come before them).  A new one must fit next to them within its limit.
        fits = not is_fresh or committed + k <= limit
        gpus = self._take(r, inf, k, d.pool, d.s) if fits else None
        if gpus is None:
            if not is_fresh:
                d.plan.reasons[r.id] = (PREEMPTED_FOR_URGENT if r.status is Status.RUNNING
                                        else NO_GPU)
            else:
                d.plan.reasons[r.id] = NOT_ADMITTED if not fits else NO_GPU
                if d.hold_until is None and self.settings.hold:
                    self._hold(c, d)
            if not critical:
                d.wake.append(now + margin)
            return False
        if r.id == mem.held:
            mem.held = None
        d.budget -= len(gpus)
        d.planned.append(_Planned(c, Assignment(gpus, (r.id,), 1)))
        return True

    def _hold(self, c: Candidate, d: _Decision) -> None:
        """Hold GPUs for `c`, the first new video that cannot start (EASY backfilling): from here on
        a later new video starts only if it is done before `d.hold_until`.

        That is the earliest time GPUs coming back leave enough free for `c` to still meet its
        deadline: running videos finish at their current degree, images and batches at the end of
        their quantum, videos placed at this decision at their planned degree.  No such time, no
        hold.
        """
        r, inf, now = c.request, c.info, d.s.now
        if d.returns is None:
            d.returns = self._returns(d.s)
        events = list(d.returns)
        for p in d.planned:
            q, qi, k = p.cand.request, p.cand.info, len(p.assignment.gpus)
            events.append((now + q.remaining_steps * qi.step[k] + qi.decode, k))
        events.sort()
        free = len(d.pool)
        rem, fin = r.remaining_steps, self._fin(r, inf)
        for t, n in events:
            free += n
            for k in self._options(r, inf):
                if k > free:
                    break
                if t + fin + rem * inf.step[k] <= r.deadline:
                    d.hold_until = t
                    self.memory.held = r.id
                    return

    def _returns(self, s: SchedulerState) -> list[tuple[float, int]]:
        """When the work in flight gives its GPUs back, as (time, GPUs): running videos finish
        at their current degree, images and batches at the end of their quantum."""
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
        return events

    def _boost(self, d: _Decision) -> None:
        """Give spare GPUs within the video budget to planned videos, least laxity first.

        (Lending the image reserve to short-step video degrees was tried and measured no gain.)
        """
        now, pool = d.s.now, d.pool
        d.planned.sort(key=lambda p: self.laxity(p.cand.request, p.cand.info, now))
        budget = max(d.budget, 0)
        eff = self.settings.boost_efficiency
        for p in d.planned:
            inf, a = p.cand.info, p.assignment
            k = len(a.gpus)
            while budget > 0:
                k2 = next((g for g in inf.degrees if g > k), None)
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
            p.assignment = a

    def _best_effort(self, hopeless: list[Request], d: _Decision) -> None:
        """Demoted requests use GPUs beyond the reserve (images: any); with nothing else running,
        any GPU."""
        s, pool, plan = d.s, d.pool, d.plan
        idle_system = not s.inflight and not plan.assignments
        # An image past saving still wants its result soon: it may use the image reserve (left
        # idle otherwise, it starved late images behind a queue of feasible ones for minutes).
        late_images = self.settings.late_images and any(r.kind is Kind.IMAGE for r in hopeless)
        if not hopeless or (len(pool) <= d.reserve and not idle_system and not late_images):
            return
        hopeless.sort(key=lambda r: (r.remaining_steps * self.info(r, s).step[1], r.id))
        for r in hopeless:
            inf = self.info(r, s)
            spare = len(pool) if idle_system or (
                self.settings.late_images and r.kind is Kind.IMAGE) else len(pool) - d.reserve
            if spare <= 0:
                break
            opts = [k for k in self._options(r, inf) if k <= spare]
            if not opts:
                continue
            # Short steps keep best-effort work preemptible; images just run to completion.
            k = next((g for g in opts if inf.step[g] <= self.settings.be_step_s), None)
            if k is None:
                # Only long steps: an image arriving would wait one out and miss, so the reserve
                # stays free even on an idle system, where a degree fits beside it.
                beside = [g for g in opts if g <= len(pool) - d.reserve]
                k = (beside or opts)[-1]
            gpus = self._take(r, inf, k, pool, s)
            if gpus is None:
                continue
            steps = r.remaining_steps if r.kind is Kind.IMAGE else 1
            plan.assignments.append(Assignment(gpus, (r.id,), steps))
            idle_system = False

    def _choose_cfg_split(self, d: _Decision) -> None:
        """Each assignment runs its GPUs the faster way for its batch: Ulysses over all of them or
        the two CFG branches side by side (the GPU counts were chosen by the fastest way alone;
        for a batch the other may win)."""
        s, lat = d.s, d.s.latency
        by_id = {r.id: r for r in s.queue}
        for i, a in enumerate(d.plan.assignments):
            lead = by_id[a.requests[0]]
            if not (self.settings.cfg_split and lead.shape[-1]):
                continue
            split = self._config(lead, lat, tokens_of(lead), len(a.requests), len(a.gpus),
                                 s.cluster.spans_nodes(a.gpus))[1]
            if split:
                d.plan.assignments[i] = replace(a, cfg_split=True)

    def _take(self, r: Request, inf: ShapeInfo, k: int, pool: GpuPool, s: SchedulerState
              ) -> tuple[int, ...] | None:
        """Take `k` GPUs for `r`, spanning nodes only if it pays.

        The pool stays inside one node whenever one has `k` free.  When none has, `k` GPUs over
        several nodes pay all-to-all over the slow link every step; the largest allowed degree that
        fits in one node is the alternative.  Span only if the spanning step is strictly faster:
        otherwise the smaller degree is at least as fast on fewer GPUs, and the rest stay free for
        others.  (Batch of 1: placement starts an assignment alone, images join it later.)
        """
        if not self.settings.topology or len(pool) < k or pool.max_in_node() >= k:
            return pool.take(k, prefer=r.gpus)  # blind, no room at all, or fits in one node
        inside = [g for g in self._options(r, inf) if g <= pool.max_in_node()]
        if inside and not (self._config(r, s.latency, inf.tokens, 1, k, True)[0]
                           < inf.step[inside[-1]]):
            return pool.take(inside[-1], prefer=r.gpus)
        return pool.take(k, prefer=r.gpus)  # spanning is faster (or the only degree allowed)
