"""Drawing a `timeline.Timeline`: a PNG (matplotlib, Agg) and a self-contained HTML file.

Kept apart from `timeline` so that extracting the data (and its tests) needs no matplotlib.  What
is drawn and why: the docstring of `genserve.timeline`.
"""

from __future__ import annotations

import html
import json

from .timeline import MOVE, PAUSE, SP_CHANGE, Bar, Timeline

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a")
_PAUSE_C, _MISS_C = "#d62728", "#d62728"


def colours(tl: Timeline) -> dict[str, str]:
    """One colour per model, images first, in the same order in every chart of a run."""
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(tl.models)}


def blocks(gpus: tuple[int, ...]) -> list[tuple[int, int]]:
    """The GPU set as runs of consecutive rows, (first, last): one drawn block each."""
    out: list[tuple[int, int]] = []
    for g in sorted(gpus):
        if out and g == out[-1][1] + 1:
            out[-1] = (out[-1][0], g)
        else:
            out.append((g, g))
    return out


def _darker(hex_colour: str, f: float = 0.6) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"#{int(r * f):02x}{int(g * f):02x}{int(b * f):02x}"


def _label(b: Bar) -> str:
    return b.requests[0] if len(b.requests) == 1 else f"{b.requests[0]} +{len(b.requests) - 1}"


def _summary(tl: Timeline) -> str:
    q = sum(b.quanta for b in tl.bars)
    return (f"{tl.start:.0f}-{tl.end:.0f} s: {len(tl.arrivals)} arrivals, {q} quanta, "
            f"{tl.count(PAUSE)} pauses, {tl.count(SP_CHANGE)} SP changes, {tl.count(MOVE)} moves, "
            f"{len(tl.misses)} deadlines missed")


# ----- PNG -----
def draw_png(tl: Timeline, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n, col = tl.num_gpus, colours(tl)
    row_in = 0.32 if n <= 8 else 0.22 if n <= 16 else max(0.11, 9.0 / n)
    width_in, dpi = 14.0, 110
    gantt_in = n * row_in
    fig = plt.figure(figsize=(width_in, gantt_in + 2.3), dpi=dpi)
    top = 1 - 0.55 / (gantt_in + 2.3)
    bottom = 1.0 / (gantt_in + 2.3)
    gs = fig.add_gridspec(2, 1, height_ratios=(0.6, gantt_in), hspace=0.04, left=0.07,
                          right=0.99, top=top, bottom=bottom)
    ev, ax = fig.add_subplot(gs[0]), None
    ax = fig.add_subplot(gs[1], sharex=ev)
    span = max(tl.end - tl.start, 1e-9)
    px_per_s = width_in * 0.92 * dpi / span
    row_px = row_in * dpi

    # bars: one collection per (model, CFG split), a block per run of consecutive GPUs
    groups: dict[tuple[str, bool], list] = {}
    labels = []
    for b in tl.bars:
        for g0, g1 in blocks(b.gpus):
            y0, y1 = g0 - 0.42, g1 + 0.42
            groups.setdefault((b.model, b.cfg_split), []).append(
                [(b.start, y0), (b.end, y0), (b.end, y1), (b.start, y1)])
            text = _label(b)
            if (b.end - b.start) * px_per_s > 6 * len(text) + 6 and row_px >= 14:
                labels.append(((b.start + b.end) / 2, (g0 + g1) / 2, text))
    # a darker edge of the bar's own colour: neighbours stay apart, thin bars keep their colour
    with plt.rc_context({"hatch.linewidth": 0.8}):
        for (model, cfg), verts in groups.items():
            ax.add_collection(PolyCollection(
                verts, facecolors=col[model], edgecolors=_darker(col[model]), linewidths=0.4,
                hatch="////" if cfg else None, hatchcolor="white", zorder=2))
    for x, y, text in labels[:400]:
        ax.text(x, y, text, ha="center", va="center", fontsize=6, color="black", zorder=3,
                clip_on=True)

    # Pauses must be seen at a glance: a red line down the block where the work stopped, a red
    # triangle on its top edge.  SP changes and moves, smaller, on the bottom edge of the new bar.
    size = max(4.0, min(9.0, row_px * 0.5))
    pauses = [(m.time, g0, g1) for m in tl.marks if m.kind == PAUSE for g0, g1 in blocks(m.gpus)]
    if pauses:
        ax.vlines([t for t, _, _ in pauses], [g0 - 0.42 for _, g0, _ in pauses],
                  [g1 + 0.42 for _, _, g1 in pauses], colors=_PAUSE_C, linewidth=1.6, zorder=4)
    style = {PAUSE: dict(marker="v", color=_PAUSE_C, markeredgecolor="white"),
             SP_CHANGE: dict(marker="D", color="#222222", markeredgecolor="white"),
             MOVE: dict(marker="D", color="white", markeredgecolor="#222222")}
    for kind, st in style.items():
        pts = [(m.time, g0 - 0.42 if kind == PAUSE else g1 + 0.42) for m in tl.marks
               if m.kind == kind for g0, g1 in blocks(m.gpus)]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, linestyle="none", markersize=size * (1 if kind == PAUSE else 0.6),
                    markeredgewidth=0.5, zorder=5 if kind == PAUSE else 4, clip_on=False, **st)

    ax.set_ylim(n - 0.5, -0.5 - (0.15 if n > 16 else 0.05))
    node = tl.gpus_per_node
    for k in range(node, n, node):
        ax.axhline(k - 0.5, color="black", linewidth=0.8, zorder=1)
    if n <= 16:
        ax.set_yticks(range(n), [f"GPU {g}" for g in range(n)], fontsize=8)
    else:
        ax.set_yticks([k + (min(node, n - k) - 1) / 2 for k in range(0, n, node)],
                      [f"node {k // node}\nGPU {k}-{min(k + node, n) - 1}"
                       for k in range(0, n, node)], fontsize=7)
        ax.set_yticks(range(n), minor=True)
    ax.set_xlim(tl.start, tl.end)
    ax.set_xlabel("trace seconds")
    ax.grid(axis="x", alpha=0.25, zorder=0)
    ax.set_facecolor("#f4f4f4")

    # arrivals and misses
    ev.vlines([e.time for e in tl.arrivals], 0.6, 1.4,
              colors=[col[e.model] for e in tl.arrivals], linewidth=0.8)
    ev.plot([e.time for e in tl.misses], [0] * len(tl.misses), linestyle="none", marker="x",
            color=_MISS_C, markersize=5, markeredgewidth=1.2, clip_on=False)
    ev.set_ylim(-0.6, 1.6)
    ev.set_yticks([1, 0], [f"arrivals ({len(tl.arrivals)})", f"missed ({len(tl.misses)})"],
                  fontsize=8)
    ev.tick_params(axis="x", labelbottom=False)
    ev.grid(axis="x", alpha=0.25)
    ev.set_title(f"{tl.title}\n{_summary(tl)}", fontsize=9, loc="left")

    handles = [Patch(facecolor=col[m], label=f"{m} ({k})") for m, k in tl.models.items()]
    handles += [Patch(facecolor="#999999", hatch="////", edgecolor="white", label="CFG split"),
                Line2D([0], [0], color=_PAUSE_C, linewidth=1.6, marker="v", markersize=7,
                       markeredgecolor="white", label="pause (preempted)"),
                Line2D([], [], linestyle="none", markersize=6, label="SP degree / CFG change",
                       **style[SP_CHANGE]),
                Line2D([], [], linestyle="none", markersize=6, label="moved to other GPUs",
                       **style[MOVE]),
                Line2D([], [], linestyle="none", marker="x", color=_MISS_C,
                       label="deadline missed")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7.5,
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ----- HTML -----
_TICKS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)

_CSS = """body{font:13px sans-serif;margin:12px;color:#222}
.wrap{display:flex;border:1px solid #ccc}.scroll{overflow-x:auto;flex:1}
.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:12px;
height:12px;vertical-align:middle;margin-right:4px;border:1px solid #888}
#tip{position:fixed;display:none;background:#fffff0;border:1px solid #888;padding:4px 6px;
white-space:pre;font:12px monospace;pointer-events:none;z-index:9}
[data-tip]:hover{stroke:#000;stroke-width:1.5}"""

_JS = """(function(){var tip=document.getElementById('tip');
document.querySelectorAll('svg title').forEach(function(t){
 t.parentNode.setAttribute('data-tip',t.textContent);t.remove();});
document.addEventListener('mousemove',function(e){
 var el=e.target.closest?e.target.closest('[data-tip]'):null;
 if(!el){tip.style.display='none';return;}
 tip.textContent=el.getAttribute('data-tip');tip.style.display='block';
 var x=e.clientX+14,y=e.clientY+14;
 if(x+tip.offsetWidth>innerWidth)x=e.clientX-tip.offsetWidth-8;
 if(y+tip.offsetHeight>innerHeight)y=e.clientY-tip.offsetHeight-8;
 tip.style.left=x+'px';tip.style.top=y+'px';});})();"""


def write_html(tl: Timeline, path: str) -> None:
    """One file: inline SVG (a <title> per element, the browser's tooltip without script) and
    a few lines of script for an immediate tooltip.  Drawn at 4 px per trace second (at least
    1200 px, at most 40000), scrolled sideways."""
    n, col, esc = tl.num_gpus, colours(tl), html.escape
    span = max(tl.end - tl.start, 1e-9)
    width = min(max(span * 4.0, 1200.0), 40000.0)
    pps = width / span
    rh = 18 if n <= 16 else 10
    head, strip = 22, 16
    y_rows = head + 2 * strip + 6
    height = y_rows + n * rh + 4
    x = lambda t: f"{(t - tl.start) * pps:.2f}"  # noqa: E731
    ids = {m: i for i, m in enumerate(col)}
    out = ['<defs>']
    for m, i in ids.items():
        out.append(f'<pattern id="cfg{i}" patternUnits="userSpaceOnUse" width="6" height="6" '
                   f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{col[m]}"/>'
                   f'<line x1="0" y1="0" x2="0" y2="6" stroke="#fff" stroke-width="2"/>'
                   f'</pattern>')
    out.append('</defs>')
    step = next((s for s in _TICKS if s * pps >= 90), _TICKS[-1])
    t = (int(tl.start / step) + 1) * step if tl.start % step else tl.start
    while t <= tl.end + 1e-9:
        out.append(f'<line x1="{x(t)}" x2="{x(t)}" y1="{head - 4}" y2="{height}" '
                   f'stroke="#ddd"/><text x="{x(t)}" y="{head - 8}" font-size="11" '
                   f'text-anchor="{"start" if (t - tl.start) * pps < 15 else "middle"}">'
                   f'{t:g}</text>')
        t += step
    for g in range(n):
        if g % 2:
            out.append(f'<rect x="0" y="{y_rows + g * rh}" width="{width:.0f}" height="{rh}" '
                       f'fill="#f6f6f6"/>')
    for k in range(tl.gpus_per_node, n, tl.gpus_per_node):
        out.append(f'<line x1="0" x2="{width:.0f}" y1="{y_rows + k * rh}" '
                   f'y2="{y_rows + k * rh}" stroke="#000"/>')
    for b in tl.bars:
        fill = f"url(#cfg{ids[b.model]})" if b.cfg_split else col[b.model]
        total = ", ".join(f"{r} ({tl.steps_of.get(r, '?')} steps in all)" for r in b.requests)
        tip = (f"requests: {total}\nmodel: {b.model}\nsteps: {b.steps} in {b.quanta} "
               f"quant{'a' if b.quanta > 1 else 'um'}\nGPUs: {', '.join(map(str, b.gpus))}"
               f"{' (CFG split)' if b.cfg_split else ''}\ntime: {b.start:.2f}-{b.end:.2f} s")
        for g0, g1 in blocks(b.gpus):
            out.append(f'<rect x="{x(b.start)}" y="{y_rows + g0 * rh + 1}" '
                       f'width="{max((b.end - b.start) * pps, 0.5):.2f}" '
                       f'height="{(g1 - g0 + 1) * rh - 2}" fill="{fill}" stroke="#fff" '
                       f'stroke-width="0.3"><title>{esc(tip)}</title></rect>')
    shapes = {PAUSE: ("M-5,-5h10l-5,7z", _PAUSE_C, "#fff"),
              SP_CHANGE: ("M0,-4l4,4l-4,4l-4,-4z", "#000", "#fff"),
              MOVE: ("M0,-4l4,4l-4,4l-4,-4z", "#fff", "#000")}
    for m in tl.marks:  # as in the PNG: pauses on the top edge with a red line down the block
        d, fill, stroke = shapes[m.kind]
        for g0, g1 in blocks(m.gpus):
            y0, y1 = y_rows + g0 * rh + 1, y_rows + (g1 + 1) * rh - 1
            line = (f'<line x1="0" x2="0" y1="0" y2="{y1 - y0}" stroke="{_PAUSE_C}" '
                    f'stroke-width="2"/>' if m.kind == PAUSE else "")
            out.append(f'<g transform="translate({x(m.time)},{y0 if m.kind == PAUSE else y1})">'
                       f'{line}<path d="{d}" fill="{fill}" stroke="{stroke}"/><title>{m.kind} '
                       f'of {esc(m.request)} at {m.time:.2f} s</title></g>')
    ya, ym = head + strip / 2, head + strip * 1.5
    for e in tl.arrivals:
        out.append(f'<line x1="{x(e.time)}" x2="{x(e.time)}" y1="{ya - 6}" y2="{ya + 6}" '
                   f'stroke="{col[e.model]}" stroke-width="2"><title>{esc(e.request)} '
                   f'({e.model}) arrived at {e.time:.2f} s</title></line>')
    for e in tl.misses:
        out.append(f'<path transform="translate({x(e.time)},{ym})" d="M-4,-4l8,8m0,-8l-8,8" '
                   f'stroke="{_MISS_C}" stroke-width="2"><title>{esc(e.request)} ({e.model}) '
                   f'missed its deadline at {e.time:.2f} s</title></path>')
    names = ['<text x="4" y="{0}" font-size="11">{1}</text>'.format(*v) for v in (
        (ya + 4, "arrivals"), (ym + 4, "missed"))]
    for g in range(n):
        if n <= 16 or g % tl.gpus_per_node == 0:
            label = f"GPU {g}" if n <= 16 else f"node {g // tl.gpus_per_node} (GPU {g})"
            names.append(f'<text x="4" y="{y_rows + g * rh + rh - 5}" '
                         f'font-size="{11 if n <= 16 else 9}">{label}</text>')
    legend = "".join(f'<span><i class="sw" style="background:{c}"></i>{esc(m)} '
                     f'({tl.models[m]})</span>' for m, c in col.items())
    legend += ('<span><i class="sw" style="background:repeating-linear-gradient(45deg,#999 0 '
               '3px,#fff 3px 5px)"></i>CFG split</span><span style="color:#d62728">&#9660; '
               'pause (preempted)</span><span>&#9670; SP degree / CFG change</span><span>'
               '&#9671; moved to other GPUs</span><span style="color:#d62728">&#10005; '
               'deadline missed</span>')
    doc = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(tl.title)}</title>'
           f'<style>{_CSS}</style></head><body>\n<h3>{esc(tl.title)}</h3>\n'
           f'<p>{esc(_summary(tl))}; time in trace seconds; hover a bar, a mark or an '
           f'arrival.</p>\n<p class="legend">{legend}</p>\n<div class="wrap">'
           f'<svg width="{60 if n <= 16 else 120}" height="{height}">{"".join(names)}</svg>'
           f'<div class="scroll">'
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}">'
           + "\n".join(out) + f'</svg></div></div>\n<div id="tip"></div>\n'
           f'<script>{_JS}</script>\n<script type="application/json" id="timeline-data">'
           f'{_data(tl)}</script>\n</body></html>\n')
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)


def _data(tl: Timeline) -> str:
    """The bars as JSON in the page too, for a reader who wants to script over them ("</" kept
    out so the data cannot end the script element)."""
    bars = [[round(b.start, 4), round(b.end, 4), list(b.gpus), list(b.requests), b.model,
             b.steps, b.cfg_split] for b in tl.bars]
    return json.dumps({"start": tl.start, "end": tl.end, "gpus": tl.num_gpus,
                       "columns": ["start", "end", "gpus", "requests", "model", "steps",
                                   "cfg_split"], "bars": bars}).replace("</", "<\\/")
