"""Timelines of a run (`simulate --timeline`, `replay --timeline`): what ran where, and when.

A Gantt chart: one row per GPU, time in trace seconds.  Every quantum the executor core ran is
recorded in `ExecResult.quanta_record` (start, end, the policy's assignment) by the loop the
simulator and the engine share, so both commands draw the same picture from the same data.

What is drawn, and the choices made:

* **Bars.**  A bar is work of one batch on one GPU set, coloured by model; a quantum on several
  GPUs is one block over their rows (the block's height is the SP degree).  Back-to-back quanta
  of the same batch on the same GPUs with the same CFG split are merged into one bar (the policy
  re-planned and kept it going; nothing a reader needs changed): a video stepped one step per
  quantum would otherwise be hundreds of slivers.  The bar keeps the count (`Bar.quanta`).
  Quanta whose two CFG branches run side by side on the two halves of the set (`cfg_split`) are
  hatched.
* **Pauses** (red triangle at the end of the bar where the work stopped, on that bar's GPUs): every
  time a request went to PREEMPTED: the core paused it because it ran the previous quantum and
  the policy did not plan it again (exactly the `preemptions` counter), or, on the engine only, a
  lost worker rolled it back to a checkpoint.  A request that merely waits between two quanta
  without being paused (it stays RUNNING, the next decision continues it) is not a pause.
* **SP changes** (black diamond at the start of the later bar): consecutive quanta of a request on
  a different number of GPUs, or with the CFG split switched.  **Moves** (hollow diamond): the
  same number of GPUs, another set (the state is shipped).  A request that was paused and resumed
  elsewhere gets both marks.
* **Arrivals** (ticks coloured by model) and **deadline misses** (red crosses at the deadline of
  every request that did not finish by it, unfinished ones included, where the deadline passed
  before the run ended) on two strips above the GPUs.

Large runs: the PNG is 14 inches wide whatever the span, so one hour on 8 GPUs shows where the
GPUs went and every pause; for detail, `--timeline-window START:END` draws only that span of
trace seconds (bars cut at its edges).  Past 16 GPUs the rows thin and are labelled per node,
with a line between nodes: 64 GPUs stay one row each.  The HTML variant (`.html`) is one
self-contained file (inline SVG and a few lines of script, nothing fetched) drawn at a fixed
number of pixels per second and scrolled sideways; hovering a bar shows its requests, model,
steps, GPUs and times.
"""

from __future__ import annotations

import argparse
import bisect
import os
import re
from dataclasses import dataclass, field, replace

from .executor import ExecResult
from .kinds import Kind
from .request import Request, Status

PAUSE, SP_CHANGE, MOVE = "pause", "sp-change", "move"
FORMATS = (".png", ".html")
_EPS = 1e-9


@dataclass(frozen=True)
class Bar:
    """Back-to-back quanta of one batch on one GPU set (see the module docstring)."""

    start: float
    end: float
    gpus: tuple[int, ...]
    requests: tuple[str, ...]
    model: str
    steps: int            # steps of all its quanta together
    cfg_split: bool
    quanta: int = 1


@dataclass(frozen=True)
class Mark:
    """A pause, SP change or move of `request` at `time`, drawn on `gpus`."""

    kind: str
    time: float
    request: str
    gpus: tuple[int, ...]


@dataclass(frozen=True, order=True)
class Event:
    """An arrival (at its time) or a deadline miss (at the deadline) of one request."""

    time: float
    request: str
    model: str


@dataclass
class Timeline:
    """Everything the chart is drawn from, in trace seconds."""

    num_gpus: int
    gpus_per_node: int
    start: float
    end: float
    bars: list[Bar]
    marks: list[Mark]
    arrivals: list[Event]
    misses: list[Event]
    models: dict[str, str] = field(default_factory=dict)   # model -> "image" | "video"
    steps_of: dict[str, int] = field(default_factory=dict)  # request -> its total steps
    title: str = ""

    def count(self, kind: str) -> int:
        return sum(m.kind == kind for m in self.marks)

    def window(self, t0: float, t1: float | None) -> "Timeline":
        """Only what happens in [t0, t1] (t1 None: to the end); bars cut at the edges."""
        t1 = self.end if t1 is None else t1
        if not t1 > t0:
            raise ValueError(f"--timeline-window {t0:g}:{t1:g}: empty (the run ends at "
                             f"{self.end:.1f} s)")
        bars = [replace(b, start=max(b.start, t0), end=min(b.end, t1))
                for b in self.bars if b.end > t0 and b.start < t1]
        inside = lambda xs: [x for x in xs if t0 <= x.time <= t1]  # noqa: E731
        return replace(self, start=t0, end=t1, bars=bars, marks=inside(self.marks),
                       arrivals=inside(self.arrivals), misses=inside(self.misses))


def extract(res: ExecResult, gpus_per_node: int, title: str = "") -> Timeline:
    """The timeline of a run that kept its quanta (`ExecutorCore(keep=True)`: the simulator and
    `Engine.run`)."""
    by_id: dict[str, Request] = {r.id: r for r in res.requests}
    record = sorted(res.quanta_record, key=lambda x: (x[0], x[2].gpus))
    if res.quanta and not record:
        raise ValueError("the run kept no quanta (a server's engine forgets them): no timeline")
    paused = {r.id: [t for t, st in r.history if st is Status.PREEMPTED] for r in res.requests}
    bars: list[Bar] = []
    open_on: dict[tuple[int, ...], int] = {}  # GPU set -> index of its last bar
    for start, end, a in record:
        i = open_on.get(a.gpus)
        b = bars[i] if i is not None else None
        if (b is not None and b.requests == a.requests and b.cfg_split == a.cfg_split
                and abs(b.end - start) <= _EPS  # and not paused and resumed at one instant:
                and not any(b.end - _EPS <= t <= start + _EPS
                            for rid in a.requests for t in paused[rid])):
            bars[i] = replace(b, end=end, steps=b.steps + a.steps, quanta=b.quanta + 1)
            continue
        for g in a.gpus:  # a bar on an overlapping set closes the ones it overlaps
            for k in [k for k in open_on if g in k]:
                del open_on[k]
        open_on[a.gpus] = len(bars)
        bars.append(Bar(start, end, a.gpus, a.requests, by_id[a.requests[0]].model, a.steps,
                        a.cfg_split))
    bars.sort(key=lambda b: (b.start, b.gpus))
    return Timeline(
        num_gpus=res.num_gpus, gpus_per_node=gpus_per_node, start=0.0, end=res.end_time,
        bars=bars, marks=_marks(bars, by_id),
        arrivals=sorted(Event(r.arrival, r.id, r.model) for r in res.requests
                        if r.arrival <= res.end_time),
        misses=sorted(Event(r.deadline, r.id, r.model) for r in res.requests  # passed, unmet
                      if not r.met_deadline and r.deadline <= res.end_time),
        models={r.model: r.kind.value for r in sorted(
            res.requests, key=lambda r: (r.kind is not Kind.IMAGE, r.model))},
        steps_of={r.id: r.steps for r in res.requests}, title=title)


def _marks(bars: list[Bar], by_id: dict[str, Request]) -> list[Mark]:
    """Pauses from each request's status history; SP changes and moves from its bars."""
    of: dict[str, list[Bar]] = {}
    for b in bars:
        for rid in b.requests:
            of.setdefault(rid, []).append(b)
    marks = []
    for rid, mine in of.items():
        for prev, nxt in zip(mine, mine[1:]):
            if len(prev.gpus) != len(nxt.gpus) or prev.cfg_split != nxt.cfg_split:
                marks.append(Mark(SP_CHANGE, nxt.start, rid, nxt.gpus))
            elif set(prev.gpus) != set(nxt.gpus):
                marks.append(Mark(MOVE, nxt.start, rid, nxt.gpus))
        ends = [b.end for b in mine]
        for t, st in by_id[rid].history:
            i = bisect.bisect_right(ends, t + _EPS) - 1
            if st is Status.PREEMPTED and i >= 0:
                marks.append(Mark(PAUSE, mine[i].end, rid, mine[i].gpus))
    return sorted(marks, key=lambda m: (m.time, m.request, m.kind))


# ----- the command line -----
def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("timeline")
    g.add_argument("--timeline", metavar="OUT.png|OUT.html",
                   help="draw each policy's run as a Gantt chart (one row per GPU; bars by "
                        "model, hatched when CFG-split; pauses, SP changes and moves marked; "
                        "arrivals and deadline misses on top); .html: the same, interactive "
                        "(hover a bar), one self-contained file.  Several policies: one file "
                        "each, OUT-POLICY.png")
    g.add_argument("--timeline-window", metavar="START:END",
                   help="draw only these trace seconds (END may be left out: to the end).  The "
                        "PNG is 14 inches wide whatever the span: window an hour or more for "
                        "detail; past 16 GPUs rows thin and are labelled by node (64 GPUs: one "
                        "row each), or write .html and scroll")


def check_flags(a: argparse.Namespace) -> tuple[float, float | None] | None:
    """Fail before the run (minutes, on the engine) rather than after it: a clear error naming
    --timeline for a path that cannot be written.  Returns the window, if any."""
    path = a.timeline
    if path is None:
        if a.timeline_window is not None:
            raise ValueError("--timeline-window needs --timeline")
        return None
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise ValueError(f"--timeline {path}: expected a file ending in .png or .html")
    where = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(where):
        raise ValueError(f"--timeline {path}: no directory {where}")
    if os.path.isdir(path) or not os.access(where, os.W_OK):
        raise ValueError(f"--timeline {path}: cannot write there")
    if a.timeline_window is None:
        return None
    t0, sep, t1 = a.timeline_window.partition(":")
    try:
        window = float(t0 or 0), (float(t1) if t1 else None)
    except ValueError:
        window = None
    if not sep or window is None or window[0] < 0 or (window[1] is not None
                                                      and window[1] <= window[0]):
        raise ValueError(f"--timeline-window {a.timeline_window}: expected START:END seconds, "
                         f"0 <= START < END")
    return window


def path_for(path: str, policy: str, policies: list[str]) -> str:
    """`path` itself for a single policy, else OUT-POLICY.EXT (the policy's name made safe)."""
    if len(policies) == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', policy)}{ext}"


def write(tl: Timeline, path: str, window: tuple[float, float | None] | None = None) -> str:
    """Draw `tl` (or its window) to `path`: PNG or HTML by the extension."""
    if window is not None:
        tl = tl.window(*window)
    if path.lower().endswith(".png"):
        from .timeline_draw import draw_png
        draw_png(tl, path)
    else:
        from .timeline_draw import write_html
        write_html(tl, path)
    return path


def write_for(a: argparse.Namespace, policy: str, policies: list[str], res: ExecResult,
              gpus_per_node: int, title: str) -> None:
    """What `replay` calls per policy when --timeline is given."""
    tl = extract(res, gpus_per_node, f"{title}, policy {policy}")
    print(f"wrote {write(tl, path_for(a.timeline, policy, policies), check_flags(a))}")


def for_simulate(a: argparse.Namespace, spec, policies: list[str]) -> None:
    """`simulate --timeline`: each policy simulated again here, keeping its quanta (the
    compared runs happen in other processes and return summaries only; a run is a pure
    function of its inputs, so this is the same run)."""
    from .experiment import simulate_one

    w = spec.workload
    load = (f"trace {os.path.basename(spec.trace)}" if spec.trace else
            f"{w.arrival} arrivals at {w.rate:g}/s for {w.duration:g} s, video share "
            f"{w.video_share:g}, SLO x{w.slo_scale:g}, seed {w.seed}")
    for name in policies:
        write_for(a, name, policies, simulate_one(spec, name), spec.gpus_per_node,
                  f"genserve simulate: {spec.gpus} GPUs ({spec.profile}), {load}")
