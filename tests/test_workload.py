import json

import numpy as np
import pytest

from genserve.catalog import ShapeError, get_model
from genserve.request import Kind, Request
from genserve.workload import (MixItem, WorkloadConfig, arrival_times, default_mix, generate,
                               load_trace, parse_mix, save_trace, standalone_sp)
from genserve.spec import GenSpec


# ----- arrivals -----

@pytest.mark.parametrize("arrival,cv,expected_cv", [
    ("poisson", 2.0, 1.0),   # cv is ignored for poisson
    ("gamma", 2.0, 2.0),
    ("gamma", 0.5, 0.5),
    ("gamma", 1.0, 1.0),
])
def test_arrival_rate_and_cv(arrival, cv, expected_cv):
    cfg = WorkloadConfig(rate=10.0, duration=20000.0, arrival=arrival, cv=cv, seed=7)
    t = arrival_times(cfg, np.random.default_rng(7))
    assert t.min() >= 0.0 and t.max() < cfg.duration
    assert np.all(np.diff(t) >= 0)  # gamma gaps can round to 0 at t ~ 1e4
    assert len(t) / cfg.duration == pytest.approx(cfg.rate, rel=0.05)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(expected_cv, rel=0.10)


def test_gamma_cv_differs_from_poisson():
    """Guards against gamma silently falling back to exponential gaps."""
    cvs = {}
    for arrival in ("poisson", "gamma"):
        cfg = WorkloadConfig(rate=5.0, duration=20000.0, arrival=arrival, cv=3.0)
        g = np.diff(arrival_times(cfg, np.random.default_rng(0)))
        cvs[arrival] = g.std() / g.mean()
    assert cvs["gamma"] > 2 * cvs["poisson"]


def test_arrival_times_span_duration_beyond_first_batch():
    # a low rate with a short first draw still covers the whole window
    cfg = WorkloadConfig(rate=0.5, duration=2000.0, arrival="poisson")
    t = arrival_times(cfg, np.random.default_rng(3))
    assert t.max() > 0.95 * cfg.duration
    assert len(t) == pytest.approx(cfg.rate * cfg.duration, rel=0.15)


# ----- generate -----

def _sig(reqs):
    return [r.to_trace() for r in reqs]


def test_same_seed_same_requests(latency):
    cfg = WorkloadConfig(rate=0.5, duration=600.0, seed=11)
    a = generate(cfg, latency, 8)
    b = generate(WorkloadConfig(rate=0.5, duration=600.0, seed=11), latency, 8)
    assert len(a) > 50
    assert _sig(a) == _sig(b)


def test_different_seed_different_requests(latency):
    a = generate(WorkloadConfig(rate=0.5, duration=600.0, seed=1), latency, 8)
    b = generate(WorkloadConfig(rate=0.5, duration=600.0, seed=2), latency, 8)
    assert [r.arrival for r in a[:5]] != [r.arrival for r in b[:5]]
    assert _sig(a) != _sig(b)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 1.0])
def test_video_share_respected(latency, share):
    reqs = generate(WorkloadConfig(rate=5.0, duration=1000.0, video_share=share, seed=4),
                    latency, 8)
    assert len(reqs) > 3000
    frac = sum(r.kind is Kind.VIDEO for r in reqs) / len(reqs)
    assert frac == pytest.approx(share, abs=0.03)
    for r in reqs:
        assert get_model(r.model).kind is r.kind


def test_requests_are_well_formed(latency):
    reqs = generate(WorkloadConfig(rate=1.0, duration=600.0, seed=5), latency, 8)
    assert len({r.id for r in reqs}) == len(reqs)
    assert [r.arrival for r in reqs] == sorted(r.arrival for r in reqs)
    for r in reqs:
        spec = get_model(r.model)
        spec.validate_shape(r.height, r.width, r.frames, r.steps)
        assert r.steps == spec.steps
        assert r.standalone > 0


@pytest.mark.parametrize("slo_scale,gpus", [(2.0, 8), (1.0, 8), (3.5, 2)])
def test_deadline_is_arrival_plus_scaled_standalone(latency, slo_scale, gpus):
    cfg = WorkloadConfig(rate=0.5, duration=600.0, slo_scale=slo_scale, video_share=0.5, seed=9)
    reqs = generate(cfg, latency, gpus)
    assert reqs
    for r in reqs:
        sp = standalone_sp(r.model, r.height, r.width, r.frames, latency, gpus)
        assert sp <= gpus
        assert r.standalone == pytest.approx(latency.standalone(r, sp), rel=1e-12)
        assert r.deadline == pytest.approx(r.arrival + slo_scale * r.standalone, rel=1e-12)


def test_standalone_sp_follows_default_and_cluster(latency):
    assert standalone_sp("wan2.1-14b", 720, 1280, 81, latency, 8) == 8
    assert standalone_sp("wan2.1-14b", 720, 1280, 81, latency, 2) == 2
    assert standalone_sp("wan2.1-1.3b", 480, 832, 81, latency, 8) == 2
    assert standalone_sp("sd3-medium", 1024, 1024, 1, latency, 8) == 1


def test_mix_overrides_video_share(latency):
    cfg = WorkloadConfig(rate=2.0, duration=1000.0, video_share=0.9, seed=1,
                         mix="sd3-medium@512x512=3,wan2.1-14b@832x480x81=1")
    reqs = generate(cfg, latency, 8)
    shapes = {(r.model, r.height, r.width, r.frames) for r in reqs}
    assert shapes == {("sd3-medium", 512, 512, 1), ("wan2.1-14b", 480, 832, 81)}
    frac = sum(r.model == "wan2.1-14b" for r in reqs) / len(reqs)
    assert frac == pytest.approx(0.25, abs=0.03)


def test_generate_validates_config(latency):
    with pytest.raises(ValueError, match="rate"):
        generate(WorkloadConfig(rate=0.0), latency, 8)


# ----- mixes -----

def test_parse_mix():
    items = parse_mix("sd3-medium@512x512=3,wan2.1-14b@832x480x81=1")
    assert items == [MixItem("sd3-medium", 512, 512, 1, 3.0),
                     MixItem("wan2.1-14b", 832, 480, 81, 1.0)]
    assert [i.label for i in items] == ["sd3-medium@512x512", "wan2.1-14b@832x480x81"]


def test_parse_mix_defaults_and_whitespace():
    items = parse_mix(" flux-dev@1024x768 , wan2.1-1.3b@832x480 ,")
    assert items == [MixItem("flux-dev", 1024, 768, 1, 1.0),
                     MixItem("wan2.1-1.3b", 832, 480, 81, 1.0)]
    assert parse_mix("sd3-medium@512x512=0.5")[0].weight == 0.5
    assert parse_mix("sd3-medium@512x512=2e-1")[0].weight == pytest.approx(0.2)


@pytest.mark.parametrize("text", [
    "",
    ",",
    "sd3-medium",
    "sd3-medium@512",
    "sd3-medium@512x512=",
    "sd3-medium@512x512=abc",
    "sd3-medium 512x512",
    "sd3-medium@512x512:3",
    "sd3-medium@512x512=3,bogus",
])
def test_parse_mix_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_mix(text)


@pytest.mark.parametrize("text,field", [
    ("sd3-medium@500x512=1", "width"),
    ("sd3-medium@512x500=1", "height"),
    ("sd3-medium@512x512x5=1", "frames"),
    ("wan2.1-14b@832x480x80=1", "frames"),
    ("wan2.1-14b@4000x480x81=1", "width"),
])
def test_parse_mix_rejects_bad_shapes(text, field):
    with pytest.raises(ShapeError, match=rf"^{field}="):
        parse_mix(text)


def test_parse_mix_rejects_unknown_model():
    with pytest.raises(ValueError, match="sdxl"):
        parse_mix("sdxl@512x512=1")


@pytest.mark.parametrize("weight", ["0", "0.0", "-1", "-0.5", "1e999"])
def test_parse_mix_rejects_bad_weights(weight):
    with pytest.raises(ValueError, match="weight"):
        parse_mix(f"sd3-medium@512x512={weight}")


def test_default_mix_shares():
    items = default_mix(0.2)
    by_kind = {}
    for it in items:
        by_kind.setdefault(get_model(it.model).kind, 0.0)
        by_kind[get_model(it.model).kind] += it.weight
    assert by_kind[Kind.IMAGE] == pytest.approx(0.8)
    assert by_kind[Kind.VIDEO] == pytest.approx(0.2)
    assert all(get_model(it.model).kind is Kind.IMAGE for it in default_mix(0.0))
    assert all(get_model(it.model).kind is Kind.VIDEO for it in default_mix(1.0))


# ----- config validation -----

def test_default_config_valid():
    WorkloadConfig().validate()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(rate=-1.0), "rate"),
    (dict(rate=0.0), "rate"),
    (dict(rate=float("nan")), "rate"),
    (dict(duration=0.0), "duration"),
    (dict(arrival="uniform"), "arrival"),
    (dict(arrival="gamma", cv=0.0), "cv"),
    (dict(video_share=1.5), "video_share"),
    (dict(video_share=-0.1), "video_share"),
    (dict(slo_scale=0.0), "slo_scale"),
])
def test_config_validate_single_problem(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        WorkloadConfig(**kwargs).validate()


def test_config_validate_collects_all_problems():
    with pytest.raises(ValueError) as ei:
        WorkloadConfig(rate=-1.0, arrival="bogus", video_share=1.5).validate()
    msg = str(ei.value)
    assert "rate" in msg and "'bogus'" in msg and "video_share" in msg
    assert msg.count(";") == 2
    assert "\n" not in msg


def test_poisson_ignores_cv_in_validation():
    WorkloadConfig(arrival="poisson", cv=0.0).validate()


# ----- traces -----

def test_trace_round_trip(tmp_path, latency):
    reqs = generate(WorkloadConfig(rate=0.3, duration=600.0, video_share=0.5, seed=3), latency, 8)
    p = tmp_path / "t.jsonl"
    save_trace(p, reqs, {"note": "x", "n": len(reqs)})
    back, meta = load_trace(p)
    assert meta == {"note": "x", "n": len(reqs)}
    assert [r.to_trace() for r in back] == [r.to_trace() for r in reqs]
    assert all(isinstance(r, Request) for r in back)
    lines = p.read_text().splitlines()
    assert len(lines) == len(reqs) + 1
    assert json.loads(lines[0]) == {"meta": {"note": "x", "n": len(reqs)}}


def test_trace_without_meta_and_with_blank_lines(tmp_path):
    r = Request("a", Kind.IMAGE, GenSpec("sd3-medium", 512, 512), arrival=1.0, deadline=5.0)
    p = tmp_path / "t.jsonl"
    p.write_text("\n" + json.dumps(r.to_trace()) + "\n\n")
    back, meta = load_trace(p)
    assert meta == {}
    assert [x.to_trace() for x in back] == [r.to_trace()]


def _write(p, lines):
    p.write_text("\n".join(lines) + "\n")


def _good(i="a"):
    return json.dumps(Request(i, Kind.IMAGE, GenSpec("sd3-medium", 512, 512), arrival=1.0,
                              deadline=5.0).to_trace())


def test_load_trace_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    _write(p, [json.dumps({"meta": {}}), _good("a"), "{not json"])
    with pytest.raises(ValueError, match=rf"^{p}:3: not JSON"):
        load_trace(p)


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.pop("deadline"), "deadline"),
    (lambda d: d.update(model="sdxl"), "sdxl"),
    (lambda d: d.update(height=500), "height"),
    (lambda d: d.update(kind="audio"), "audio"),
    (lambda d: d.update(steps=0), "steps"),
])
def test_load_trace_invalid_record_names_file_and_line(tmp_path, mutate, needle):
    d = json.loads(_good("b"))
    mutate(d)
    p = tmp_path / "bad.jsonl"
    _write(p, [_good("a"), json.dumps(d)])
    with pytest.raises(ValueError, match=rf"^{p}:2: .*{needle}"):
        load_trace(p)


@pytest.mark.parametrize("line", ["42", '"text"', "[1, 2]", "null"])
def test_load_trace_non_object_line_names_file_and_line(tmp_path, line):
    p = tmp_path / "bad.jsonl"
    _write(p, [_good("a"), line])
    with pytest.raises(ValueError, match=rf"^{p}:2: "):
        load_trace(p)


def test_load_trace_duplicate_ids(tmp_path):
    p = tmp_path / "dup.jsonl"
    _write(p, [_good("a"), _good("a")])
    with pytest.raises(ValueError, match="unique"):
        load_trace(p)
