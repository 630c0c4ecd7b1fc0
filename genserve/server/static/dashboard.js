// genserve's live cluster page: polls /v1/cluster every second and draws it.  No libraries, no
// build step, nothing fetched from anywhere but this server (the page's CSP enforces it).
"use strict";

const POLL_MS = 1000;
const FUTURE = 0.08;  // share of the timeline's width after "now" (predicted ends of quanta)
const KEY_ITEM = "genserve-api-key";
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
                 "#ff9da7", "#9c755f", "#86bcb6"];

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem(KEY_ITEM) || "";
let timer = null;
let last = null;        // the last answer
let lastAt = 0;         // when it came (performance.now())
let colors = {};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

function fmtDur(s) {
  if (s === null || s === undefined) return "–";
  const a = Math.abs(s);
  if (a < 1) return Math.round(s * 1000) + " ms";
  if (a < 10) return s.toFixed(1) + " s";
  if (a < 60) return Math.round(s) + " s";
  const whole = Math.round(a), m = Math.floor(whole / 60), r = whole % 60;
  return (s < 0 ? "-" : "") + m + " min" + (r ? " " + String(r).padStart(2, "0") + " s" : "");
}

function shortId(id) {
  // "img_<32 hex>-0" -> "img_3f2a9c…-0": enough to tell requests apart; the full id on hover
  const m = /^([a-z]+_)([0-9a-f]{6})[0-9a-f]*(-\d+)?$/.exec(id);
  return m ? m[1] + m[2] + "…" + (m[3] || "") : id;
}

function setText(id, text) {
  const e = $(id);
  if (e.textContent !== String(text)) e.textContent = text;
}

// ----- key -----
function showKeyForm(message) {
  document.body.dataset.state = "auth";
  $("main").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  $("health").textContent = "key needed";
  $("health").className = "pill warn";
  $("key").focus();
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = $("key").value.trim();
  $("key").value = "";
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  $("key-form").hidden = true;
  schedule(0);
});

$("forget-key").addEventListener("click", () => {
  key = "";
  sessionStorage.removeItem(KEY_ITEM);
  $("forget-key").hidden = true;
  schedule(0);
});

$("span").addEventListener("change", () => schedule(0));

// ----- polling -----
function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(poll, ms);
}

async function poll() {
  const span = Number($("span").value);
  const headers = key ? { Authorization: "Bearer " + key } : {};
  try {
    const r = await fetch("v1/cluster?seconds=" + span, { headers, cache: "no-store" });
    if (r.status === 401) {
      if (key) sessionStorage.removeItem(KEY_ITEM);
      showKeyForm(key ? "that key was refused" : "");
      key = "";
      return;  // polling resumes when a key is given
    }
    if (!r.ok) throw new Error("/v1/cluster answered " + r.status);
    last = await r.json();
    lastAt = performance.now();
    $("error").hidden = true;
    render(last);
  } catch (e) {
    $("error").textContent = "no answer from the server: " + e.message;
    $("error").hidden = false;
    $("health").textContent = "unreachable";
    $("health").className = "pill bad";
    document.body.dataset.state = "error";
  }
  schedule(POLL_MS);
}

setInterval(() => {
  if (last) setText("updated", "updated " + ((performance.now() - lastAt) / 1000).toFixed(0) + " s ago");
}, 500);

// ----- drawing -----
function render(d) {
  document.body.dataset.state = "ok";
  document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
  $("main").hidden = false;
  $("forget-key").hidden = !key;
  colors = {};
  d.models.forEach((m, i) => { colors[m.id] = PALETTE[i % PALETTE.length]; });
  renderHealth(d);
  renderQueues(d);
  renderWorkers(d);
  renderTimeline(d);
  renderRequests(d);
  renderSlo(d);
}

function renderHealth(d) {
  const h = $("health");
  const e = d.engine;
  let text = "ok", cls = "ok";
  if (!e.healthy) { text = "engine down" + (e.error ? ": " + e.error : ""); cls = "bad"; }
  else if (e.draining) { text = "draining"; cls = "warn"; }
  else if (d.workers.down.length) { text = "degraded"; cls = "warn"; }
  h.textContent = text;
  h.className = "pill " + cls;
  setText("engine-info", "policy " + e.policy + (e.emulated ? " · emulated GPUs at " + e.time_scale + "× speed" : ""));
}

function renderQueues(d) {
  for (const kind of ["image", "video"]) {
    const q = d.queues[kind] || { waiting: 0, oldest_wait_s: null, paused: 0, running: 0 };
    setText("q-" + kind + "-waiting", q.waiting);
    setText("q-" + kind + "-oldest", q.oldest_wait_s === null ? "–" : fmtDur(q.oldest_wait_s));
    setText("q-" + kind + "-running", q.running);
    setText("q-" + kind + "-paused", q.paused);
    $("queue-" + kind).classList.toggle("busy", q.waiting > 0);
  }
}

function renderWorkers(d) {
  const w = d.workers;
  setText("w-up", w.total - w.down.length);
  setText("w-total", w.total);
  setText("w-down", w.down.length ? "being replaced: GPU " + w.down.join(", ") : "none down");
  $("w-down").className = w.down.length ? "bad" : "dim";
  let replaced = String(w.replaced_total);
  if (w.last_replaced_at) replaced += " (last " + fmtDur(d.now - w.last_replaced_at) + " ago)";
  setText("w-replaced", replaced);
  setText("w-hung", w.hung_total);
}

function renderTimeline(d) {
  const span = d.seconds;
  const t0 = d.now - span, t1 = d.now + span * FUTURE;
  const total = t1 - t0;
  const pct = (t) => (100 * (Math.min(Math.max(t, t0), t1) - t0) / total);
  setText("timeline-caption", "last " + fmtDur(span) + ", one row per GPU; hover a bar for its requests");

  const legendItem = (swatch, text) => {
    const item = el("span", "item");
    item.append(swatch, el("span", null, text));
    return item;
  };
  $("legend").replaceChildren(...d.models.map((m) => {
    const sw = el("span", "swatch");
    sw.style.background = colors[m.id];
    return legendItem(sw, m.id + " (" + m.kind + ")");
  }), legendItem(el("span", "swatch lost"), "lost with its worker"));

  const byGpu = new Map(d.gpus.map((g) => [g.id, []]));
  for (const q of d.quanta) for (const g of q.gpus) if (byGpu.has(g)) byGpu.get(g).push(q);

  const rows = d.gpus.map((g) => {
    const row = el("div", "gpu-row " + g.state);
    row.dataset.gpu = g.id;
    const label = el("div", "label");
    label.append(el("b", null, "GPU " + g.id), el("span", "dim", " node " + g.node));
    label.append(el("span", "state " + g.state, g.state));
    const lane = el("div", "lane");
    const nowLine = el("div", "now");
    nowLine.style.left = pct(d.now) + "%";
    lane.append(nowLine);
    for (const q of byGpu.get(g.id)) {
      const end = q.end === null ? d.now : q.end;
      if (end < t0) continue;
      const bar = el("div", "quantum " + q.outcome);
      bar.style.left = pct(q.start) + "%";
      bar.style.width = (pct(end) - pct(q.start)) + "%";
      bar.style.background = colors[q.model] || "#999";
      bar.dataset.requests = q.requests.join(" ");
      bar.dataset.model = q.model;
      bar.title = q.requests.join(", ");
      bar._q = q;
      lane.append(bar);
      if (q.end === null && q.predicted_end > d.now) {
        const rest = el("div", "predicted");
        rest.style.left = pct(d.now) + "%";
        rest.style.width = (pct(q.predicted_end) - pct(d.now)) + "%";
        rest.style.borderColor = colors[q.model] || "#999";
        rest.title = "predicted end";
        lane.append(rest);
      }
    }
    if (g.state === "down") lane.append(el("div", "down-mask", "being replaced"));
    row.append(label, lane);
    return row;
  });
  $("gpu-rows").replaceChildren(...rows);

  const axis = $("axis");
  const ticks = [];
  const step = span <= 30 ? 5 : span <= 60 ? 10 : span <= 120 ? 20 : span <= 300 ? 60 : 120;
  for (let s = 0; s <= span; s += step) {
    const t = el("span", "tick", s === 0 ? "now" : "-" + fmtDur(s));
    t.style.left = pct(d.now - s) + "%";
    ticks.push(t);
  }
  axis.replaceChildren(...ticks);
}

function tooltipFor(q) {
  const lines = [];
  const n = q.requests.length;
  lines.push(q.model + " · " + q.steps + " step" + (q.steps > 1 ? "s" : "") + " on GPU " +
             q.gpus.join(",") + (q.cfg_split ? " (CFG split)" : ""));
  lines.push((n > 1 ? "batch of " + n + ": " : "") + q.requests.join(", "));
  const end = q.end === null ? null : q.end;
  lines.push(end === null ? "running, predicted " + fmtDur(q.predicted_end - q.start)
                          : "ran " + fmtDur(end - q.start) + (q.outcome !== "ok" ? " · " + q.outcome : ""));
  return lines;
}

$("gpu-rows").addEventListener("mousemove", (ev) => {
  const tip = $("tooltip");
  const bar = ev.target.closest(".quantum");
  if (!bar || !bar._q) { tip.hidden = true; return; }
  tip.replaceChildren(...tooltipFor(bar._q).map((l) => el("div", null, l)));
  tip.hidden = false;
  const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  tip.style.left = x + "px";
  tip.style.top = (ev.clientY + 14) + "px";
});
$("gpu-rows").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });

function renderRequests(d) {
  const body = $("requests").tBodies[0];
  const rows = d.requests.map((r) => {
    const tr = el("tr", r.status);
    tr.dataset.request = r.id;
    const id = el("td", "mono", shortId(r.id));
    id.title = r.id;
    const model = el("td");
    const sw = el("span", "swatch");
    sw.style.background = colors[r.model] || "#999";
    model.append(sw, document.createTextNode(r.model));
    const gpus = el("td", null, r.gpus.length ? r.gpus.join(",") + " (×" + r.degree + ")" : "–");
    const prog = el("td", "progress");
    const bar = el("div", "bar");
    const fill = el("div", "fill");
    fill.style.width = (100 * r.steps_done / r.steps_total) + "%";
    fill.style.background = colors[r.model] || "#999";
    bar.append(fill);
    prog.append(bar, el("span", "mono", r.steps_done + "/" + r.steps_total));
    const left = r.deadline - d.now;
    const due = el("td", left < 0 ? "bad" : null, left < 0 ? "late " + fmtDur(-left) : fmtDur(left));
    tr.append(id, model, el("td", "mono", r.size), el("td", null, r.status), gpus, prog, due);
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr", "empty");
    const td = el("td", "dim", "nothing running");
    td.colSpan = 7;
    tr.append(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  setText("requests-caption", d.requests_total > d.requests.length
    ? "(" + d.requests.length + " of " + d.requests_total + ")" : "(" + d.requests_total + ")");
}

function renderSlo(d) {
  setText("slo-caption", "requests that ended in the last " + fmtDur(d.slo.window_s));
  const body = $("slo").tBodies[0];
  body.replaceChildren(...Object.entries(d.slo.models).map(([model, c]) => {
    const tr = el("tr");
    tr.dataset.model = model;
    tr.dataset.attainment = c.attainment === null ? "" : String(c.attainment);
    const name = el("td");
    const sw = el("span", "swatch");
    sw.style.background = colors[model] || "#999";
    name.append(sw, document.createTextNode(model));
    const att = el("td", "attainment");
    if (c.attainment === null) {
      att.append(el("span", "dim", "no requests yet"));
    } else {
      const bar = el("div", "bar");
      const fill = el("div", "fill " + (c.attainment >= 0.9 ? "good" : c.attainment >= 0.5 ? "meh" : "poor"));
      fill.style.width = (100 * c.attainment) + "%";
      bar.append(fill);
      att.append(bar, el("span", "mono", (100 * c.attainment).toFixed(0) + "%"));
    }
    tr.append(name, att, el("td", "mono", c.met), el("td", "mono", c.missed),
              el("td", "mono", c.failed), el("td", "mono", c.cancelled));
    return tr;
  }));
}

schedule(0);
