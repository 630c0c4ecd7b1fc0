"""Prometheus metrics of a serving process (one registry per service, so tests stay apart).

Counts add up: every request submitted ends in exactly one outcome of
`genserve_requests_ended_total` (finished / failed / cancelled); requests refused at admission are
counted in `genserve_rejections_total` by reason and never reach the engine.
"""

from __future__ import annotations

import threading

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()  # the *_created series only double the output

from ..request import Request, Status

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class ServeMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.state = Gauge("genserve_requests", "Requests in the engine by state",
                           ["state"], registry=r)
        self.submitted_total = Counter("genserve_requests_submitted_total",
                                       "Requests admitted to the engine", ["kind"], registry=r)
        self.ended_total = Counter("genserve_requests_ended_total",
                                   "Requests that ended, by outcome", ["kind", "outcome"],
                                   registry=r)
        self.preemptions_total = Counter("genserve_preemptions_total",
                                         "Times a running request was paused", registry=r)
        self.slo_total = Counter("genserve_slo_total", "Finished requests by SLO outcome",
                                 ["model", "outcome"], registry=r)
        self.rejections_total = Counter("genserve_rejections_total",
                                        "Requests refused at admission, by reason",
                                        ["reason", "kind"], registry=r)
        self.queue_time = Histogram("genserve_queue_time_seconds",
                                    "Arrival to first step", ["kind"],
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("genserve_e2e_latency_seconds",
                                 "Arrival to finished: its file encoded (by its worker), not yet "
                                 "written", ["kind"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        # Workers lost and not yet placed again (Ray: a node gone and no room elsewhere), and
        # workers replaced since start: read from the engine at scrape time.
        self.workers_down = Gauge("genserve_workers_down",
                                  "Workers lost and not yet back; plans leave them out",
                                  registry=r)
        self.worker_restarts = Gauge("genserve_worker_restarts",
                                     "Workers replaced since the server started", registry=r)
        self.workers_hung = Gauge("genserve_workers_hung_total",
                                  "Workers declared hung (silent, or no progress on a job, for "
                                  "--worker-timeout), killed and replaced", registry=r)
        self.output_bytes = Gauge("genserve_output_bytes",
                                  "Bytes of finished outputs (PNG / MP4 files, encoded on the "
                                  "workers) that reached the server", registry=r)
        self.correction = Gauge("genserve_latency_correction",
                                "Observed / profiled step time per model, as the policy now "
                                "plans with it (1: the profile holds; --no-latency-feedback: "
                                "absent)", ["model"], registry=r)
        for s in ("waiting", "running", "preempted"):
            self.state.labels(s).set(0)
        self._last: dict[str, Status] = {}
        self._lock = threading.Lock()

    def watch_engine(self, engine, hung=lambda: 0, models=()) -> None:
        self.workers_hung.set_function(hung)
        estimate = getattr(engine.latency, "estimate", None)
        for m in models if estimate is not None else ():
            self.correction.labels(m).set_function(lambda m=m: estimate(m))
        self.workers_down.set_function(lambda: len(engine.down_workers))
        self.worker_restarts.set_function(lambda: engine.res.restarts
                                          if hasattr(engine, "res") else 0)
        self.output_bytes.set_function(lambda: engine.res.output_bytes
                                       if hasattr(engine, "res") else 0)

    def submitted(self, kind: str) -> None:
        self.submitted_total.labels(kind).inc()

    def rejected(self, reason: str, kind: str) -> None:
        self.rejections_total.labels(reason, kind).inc()

    def observe(self, r: Request) -> None:
        """Called on every change the engine reports for `r`."""
        with self._lock:
            before = self._last.get(r.id)
            now = r.status
            if before is now:
                return
            if before is not None and not before.is_final:
                self.state.labels(before.value).dec()
            if now.is_final:
                self._last.pop(r.id, None)
            else:
                self._last[r.id] = now
                self.state.labels(now.value).inc()
        kind = r.kind.value
        if before is Status.RUNNING and now is Status.PREEMPTED:
            self.preemptions_total.inc()
        if now is Status.RUNNING and before is Status.WAITING:
            self.queue_time.labels(kind).observe(max(r.history[-1][0] - r.arrival, 0.0))
        if now.is_final:
            self.ended_total.labels(kind, now.value).inc()
        if now is Status.FINISHED:
            self.latency.labels(kind).observe(r.latency)
            self.slo_total.labels(r.model, "met" if r.met_deadline else "missed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
