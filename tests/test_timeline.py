"""`simulate --timeline` / `replay --timeline` (genserve/timeline.py): the data a chart is drawn
from (bars, pauses, SP changes, moves, misses), the files written, and the errors on bad paths.
Marks are tested on the extracted `Timeline`, not on pixels."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from genserve import timeline
from genserve.catalog import get_model
from genserve.cli import main
from genserve.executor import ExecResult
from genserve.experiment import RunSpec, simulate_one
from genserve.latency import LatencyModel
from genserve.policies import Assignment, Cluster, make_policy
from genserve.request import Request, Status
from genserve.sim import SimConfig, Simulator
from genserve.spec import GenSpec
from genserve.workload import WorkloadConfig

LAT = LatencyModel()  # the shipped H200 profile

SHORT = ["simulate", "--gpus", "4", "--rate", "0.2", "--duration", "120", "--seed", "1",
         "--policy", "genserve", "--jobs", "1"]


def req(rid: str, model: str, h: int, w: int, frames: int = 1, arrival: float = 0.0,
        slo: float = 2.0) -> Request:
    spec = get_model(model)
    r = Request(rid, spec.kind, GenSpec(model, h, w, frames=frames, steps=spec.steps),
                arrival=arrival)
    r.standalone = LAT.standalone(r, 1)
    r.deadline = arrival + slo * r.standalone
    return r


def test_a_video_paused_for_an_urgent_image_gets_a_pause_mark():
    # One GPU: a 1.3B video runs; an image due soon arrives at t=1 and genserve pauses the video
    # at a step boundary for it, then resumes it (tests/test_policies.py, the same situation).
    video = req("video", "wan2.1-1.3b", 480, 832, 33, slo=10.0)
    image = req("image", "sd3-medium", 512, 512, arrival=1.0)
    res = Simulator(Cluster(1), LAT, make_policy("genserve"), SimConfig(drain=True)).run(
        [video, image])
    assert res.preemptions == 1 and image.met_deadline
    tl = timeline.extract(res, gpus_per_node=8)
    pauses = [m for m in tl.marks if m.kind == timeline.PAUSE]
    assert [(m.request, m.gpus) for m in pauses] == [("video", (0,))]
    # at the end of the video's bar where it stopped, which is where the image's bar starts
    t_pause = next(t for t, s in video.history if s is Status.PREEMPTED)
    vbars = [b for b in tl.bars if b.requests == ("video",)]
    ibar = next(b for b in tl.bars if b.requests == ("image",))
    assert pauses[0].time == pytest.approx(t_pause) == pytest.approx(vbars[0].end)
    assert ibar.start == pytest.approx(t_pause) and vbars[1].start >= ibar.end - 1e-9
    # every step of each request is in its bars, however many quanta they were
    assert sum(b.steps for b in vbars) == video.steps
    assert ibar.steps == image.steps
    assert tl.misses == [] and [e.request for e in tl.arrivals] == ["video", "image"]


def _result(requests, record) -> ExecResult:
    return ExecResult(requests=requests, num_gpus=8, busy_gpu_s=0.0, end_time=100.0,
                      decisions=0, preemptions=0, migrations=0, quanta=len(record),
                      quanta_record=record)


def test_bars_merge_back_to_back_quanta_and_sp_changes_and_moves_are_marked():
    # Hand-made record: 2 quanta on GPUs 0-1 (one bar), then the same GPUs with the CFG
    # branches split (an SP change), then GPUs 2-3 (a move); paused at 10 and resumed at 12
    # on 4 GPUs (a pause and an SP change); it misses its deadline.
    v = req("v", "wan2.1-14b", 480, 832, 81)
    v.deadline = 30.0
    a = lambda gpus, steps, cfg=False: Assignment(gpus, ("v",), steps, cfg)  # noqa: E731
    record = [(0.0, 2.0, a((0, 1), 1)), (2.0, 4.0, a((0, 1), 1)), (4.0, 6.0, a((0, 1), 2, True)),
              (6.0, 10.0, a((2, 3), 2, True)), (12.0, 20.0, a((0, 1, 2, 3), 4))]
    v.start(0.0, (0, 1))
    v.preempt(10.0)
    v.resume(12.0, (0, 1, 2, 3))
    tl = timeline.extract(_result([v], record), gpus_per_node=8)
    assert [(b.start, b.end, b.gpus, b.steps, b.quanta, b.cfg_split) for b in tl.bars] == [
        (0.0, 4.0, (0, 1), 2, 2, False), (4.0, 6.0, (0, 1), 2, 1, True),
        (6.0, 10.0, (2, 3), 2, 1, True), (12.0, 20.0, (0, 1, 2, 3), 4, 1, False)]
    assert [(m.kind, m.time, m.gpus) for m in tl.marks] == [
        (timeline.SP_CHANGE, 4.0, (0, 1)), (timeline.MOVE, 6.0, (2, 3)),
        (timeline.PAUSE, 10.0, (2, 3)), (timeline.SP_CHANGE, 12.0, (0, 1, 2, 3))]
    assert [e.time for e in tl.misses] == [30.0]
    # a window keeps what happens in it and cuts the bars at its edges
    w = tl.window(5.0, 11.0)
    assert [(b.start, b.end) for b in w.bars] == [(5.0, 6.0), (6.0, 10.0)]
    assert [m.kind for m in w.marks] == [timeline.MOVE, timeline.PAUSE]


def test_simulate_writes_a_png_and_an_html_with_every_request_that_ran(tmp_path, capsys):
    png, page = tmp_path / "t.png", tmp_path / "t.html"
    assert main(SHORT + ["--timeline", str(png)]) == 0
    assert main(SHORT + ["--timeline", str(page)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    with Image.open(png) as im:
        im.load()
        assert im.width >= 1000 and im.height >= 300
        colours = im.convert("RGB").getcolors(1 << 20)
    assert len(colours) > 50  # bars, marks, text: not a blank canvas
    spec = RunSpec(workload=WorkloadConfig(rate=0.2, duration=120, seed=1), gpus=4)
    res = simulate_one(spec, "genserve")
    ran = {rid for _, _, a in res.quanta_record for rid in a.requests}
    text = page.read_text()
    assert ran and all(f"requests: {rid} (" in text for rid in ran)
    assert "<script src" not in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    data = json.loads(re.search(r'id="timeline-data">(.*?)</script>', text, re.S).group(1))
    assert {rid for b in data["bars"] for rid in b[3]} == ran


def test_several_policies_get_a_file_each(tmp_path):
    out = tmp_path / "t.png"
    args = SHORT[:-4] + ["--policy", "fcfs,genserve:hold=false", "--jobs", "1"]
    assert main(args + ["--timeline", str(out), "--timeline-window", "0:60"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-fcfs.png", "t-genserve_hold=false.png"]


@pytest.mark.parametrize("path, window, says", [
    ("out.svg", None, "expected a file ending in .png or .html"),
    ("no/such/dir/out.png", None, "no directory"),
    (".", None, "expected a file ending in .png or .html"),
    ("out.png", "10", "--timeline-window 10: expected START:END"),
    ("out.png", "20:10", "--timeline-window 20:10: expected START:END"),
])
def test_bad_timeline_arguments_are_one_line_errors(tmp_path, monkeypatch, capsys, path, window,
                                                    says):
    monkeypatch.chdir(tmp_path)
    args = SHORT + ["--timeline", path] + (["--timeline-window", window] if window else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--timeline" in err and says in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_replay_rejects_a_bad_timeline_path_before_starting_workers(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    assert main(["trace", "--rate", "0.2", "--duration", "20", "--out", str(trace)]) == 0
    assert main(["replay", str(trace), "--timeline", str(tmp_path / "x.jpg")]) == 2
    assert "--timeline" in capsys.readouterr().err
