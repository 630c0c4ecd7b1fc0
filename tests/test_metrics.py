from collections import Counter
from types import SimpleNamespace

import pytest

from genserve.metrics import summarize
from genserve.request import Kind, Request
from genserve.spec import GenSpec


def req(i, kind="image", arrival=0.0, deadline=10.0, standalone=2.0, finish=None, end=None):
    """finish=t: FINISHED at t; end=('cancel'|'fail'|'reject'|'running'|'preempted'|None)."""
    model, h, w, f = (("sd3-medium", 512, 512, 1) if kind == "image"
                      else ("wan2.1-14b", 480, 832, 81))
    r = Request(f"r{i}", Kind(kind), GenSpec(model, h, w, frames=f, steps=2), arrival=arrival,
                deadline=deadline, standalone=standalone)
    if finish is not None:
        r.start(arrival, (0,))
        r.advance(2)
        r.finish(finish)
    elif end == "cancel":
        r.cancel(arrival + 1)
    elif end == "fail":
        r.fail(arrival + 1, "oom")
    elif end == "reject":
        r.reject(arrival + 1, "late")
    elif end in ("running", "preempted"):
        r.start(arrival, (0,))
        r.advance(1)
        if end == "preempted":
            r.preempt(arrival + 1)
    return r


def result(reqs, **kw):
    base = dict(requests=reqs, num_gpus=4, busy_gpu_s=40.0, end_time=100.0, preemptions=3,
                migrations=1, decisions=17, reasons=Counter({"no_free_gpu": 2, "batch_wait": 5}))
    base.update(kw)
    return SimpleNamespace(**base)


def test_attainment_counts_only_finished_by_deadline():
    reqs = [
        req(0, finish=4.0),                       # met
        req(1, finish=10.0),                      # met exactly at the deadline
        req(2, finish=12.0),                      # finished late
        req(3, end="cancel"),                     # ended early, not finished
        req(4, end="fail"),
        req(5, end="reject"),
        req(6, end="running"),                    # still going
        req(7, end=None),                         # never started
    ]
    m = summarize(result(reqs))
    assert m["count"] == 8
    assert m["met"] == 2
    assert m["finished"] == 3
    assert m["slo_attainment"] == pytest.approx(2 / 8)


def test_per_kind_split():
    reqs = [
        req(0, "image", finish=1.0), req(1, "image", finish=2.0), req(2, "image", finish=20.0),
        req(3, "video", finish=5.0), req(4, "video", end="preempted"),
    ]
    m = summarize(result(reqs))
    img, vid = m["image"], m["video"]
    assert (img["count"], img["met"], img["finished"]) == (3, 2, 3)
    assert (vid["count"], vid["met"], vid["finished"]) == (2, 1, 1)
    assert img["slo_attainment"] == pytest.approx(2 / 3, abs=1e-4)
    assert vid["slo_attainment"] == pytest.approx(0.5)
    assert m["met"] == 3 and m["slo_attainment"] == pytest.approx(0.6)


def test_kind_with_no_requests():
    m = summarize(result([req(0, "image", finish=1.0)]))
    assert m["video"]["count"] == 0
    assert m["video"]["slo_attainment"] is None
    assert m["video"]["p50_norm_latency"] is None and m["video"]["p99_norm_latency"] is None
    assert m["image"]["slo_attainment"] == 1.0


def test_normalised_latency_percentiles():
    # latency / standalone = 1, 2, ..., 10
    reqs = [req(i, arrival=0.0, deadline=100.0, standalone=2.0, finish=2.0 * (i + 1))
            for i in range(10)]
    m = summarize(result(reqs))
    assert m["p50_norm_latency"] == 6.0   # "higher": rank 0.5 * 9 = 4.5 rounds up to index 5
    assert m["p99_norm_latency"] == 10.0


def test_p99_none_when_unfinished_land_there():
    reqs = [req(i, finish=2.0) for i in range(9)] + [req(9, end="running")]
    m = summarize(result(reqs))
    assert m["p50_norm_latency"] == pytest.approx(1.0)
    assert m["p99_norm_latency"] is None


def test_p99_finite_when_unfinished_are_rare():
    reqs = [req(i, finish=2.0) for i in range(199)] + [req(199, end="cancel")]
    m = summarize(result(reqs))
    assert m["p99_norm_latency"] == pytest.approx(1.0)


def test_late_but_finished_counts_in_latency_not_attainment():
    reqs = [req(0, finish=30.0, deadline=10.0, standalone=3.0)]
    m = summarize(result(reqs))
    assert m["met"] == 0 and m["finished"] == 1
    assert m["p99_norm_latency"] == pytest.approx(10.0)


def test_p50_none_when_most_unfinished():
    reqs = [req(0, finish=2.0)] + [req(i, end="fail") for i in range(1, 4)]
    assert summarize(result(reqs))["p50_norm_latency"] is None


def test_run_level_figures():
    reqs = [req(0, arrival=0.0, finish=1.0), req(1, arrival=50.0, deadline=60.0, finish=55.0),
            req(2, arrival=100.0, deadline=101.0, finish=200.0)]
    m = summarize(result(reqs))
    assert m["goodput_rps"] == pytest.approx(2 / 100.0)   # met over the arrival window
    assert m["gpu_busy"] == pytest.approx(40.0 / (4 * 100.0))
    assert (m["preemptions"], m["migrations"], m["decisions"]) == (3, 1, 17)
    assert m["defer_reasons"] == {"batch_wait": 5, "no_free_gpu": 2}
    assert list(m["defer_reasons"]) == ["batch_wait", "no_free_gpu"]


def test_single_request_and_zero_span():
    m = summarize(result([req(0, end="running")], end_time=0.0, busy_gpu_s=0.0))
    assert m["goodput_rps"] is None
    assert m["gpu_busy"] == 0.0
    assert m["slo_attainment"] == 0.0


def test_empty_run():
    m = summarize(result([], end_time=0.0, busy_gpu_s=0.0))
    assert m["count"] == 0 and m["slo_attainment"] is None
    assert m["p99_norm_latency"] is None and m["goodput_rps"] is None
