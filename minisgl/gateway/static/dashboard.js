// The dashboard: polls /dashboard/data once a second (the same numbers as /metrics' JSON plus
// per-second series and the recent requests) and, with --narrate, follows /dashboard/narration (SSE).
"use strict";

const $ = (id) => document.getElementById(id);
const fmtMs = (s) => (s == null ? "–" : `${Math.round(s * 1000)} ms`);
const pct = (x) => `${(100 * x).toFixed(0)}%`;

function bar(frac, cls) {
  const b = el("div", "bar" + (cls ? " " + cls : ""));
  const fill = el("i");
  fill.style.width = `${Math.max(0, Math.min(1, frac)) * 100}%`;
  b.appendChild(fill);
  return b;
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) {
    const td = el("td", c.num ? "num" : "");
    if (c.node) td.appendChild(c.node); else td.textContent = c.text ?? "";
    tr.appendChild(td);
  }
  return tr;
}

// A small line chart in inline SVG: no library. Null points are gaps.
function chart(svg, values, unit) {
  const W = svg.clientWidth || 360, H = svg.clientHeight || 120, padL = 34, padB = 16, padT = 6;
  const ns = "http://www.w3.org/2000/svg";
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const present = values.filter((v) => v != null);
  const max = Math.max(1e-9, ...present) * 1.15;
  const x = (i) => padL + (i / Math.max(1, values.length - 1)) * (W - padL - 4);
  const y = (v) => H - padB - (v / max) * (H - padB - padT);
  const mk = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.appendChild(n);
    return n;
  };
  mk("line", { x1: padL, y1: H - padB, x2: W - 4, y2: H - padB, class: "axis" });
  mk("line", { x1: padL, y1: padT, x2: padL, y2: H - padB, class: "axis" });
  mk("text", { x: padL - 4, y: padT + 8, "text-anchor": "end", class: "lbl" }, present.length ? fmtNum(max / 1.15) : "");
  mk("text", { x: padL - 4, y: H - padB, "text-anchor": "end", class: "lbl" }, "0");
  mk("text", { x: padL, y: H - 3, class: "lbl" }, "-60 s");
  mk("text", { x: W - 4, y: H - 3, "text-anchor": "end", class: "lbl" }, unit ? `now · ${unit}` : "now");
  let line = "", area = "", run = [];
  const flush = () => {
    if (run.length) {
      area += `M${x(run[0][0])},${H - padB}` + run.map(([i, v]) => `L${x(i)},${y(v)}`).join("") + `L${x(run[run.length - 1][0])},${H - padB}Z`;
    }
    run = [];
  };
  values.forEach((v, i) => {
    if (v == null) { flush(); return; }
    line += `${run.length ? "L" : "M"}${x(i)},${y(v)}`;
    run.push([i, v]);
  });
  flush();
  mk("path", { d: area, class: "area" });
  mk("path", { d: line, class: "line" });
  // sparse series (TTFT, ITL: only seconds in which a request finished) also get dots
  if (present.length < values.length / 2) values.forEach((v, i) => v != null && mk("circle", { cx: x(i), cy: y(v), r: 2.6, class: "dot" }));
}

function fmtNum(v) {
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

function update(d) {
  const s = d.server, sched = d.scheduler || {}, counters = sched.counters || {}, rolling = d.rolling || {};
  $("server").textContent = `${s.model} · ${s.backend} backend · ${s.workers} worker(s) · ${s.scheduler_mode} · context ${s.max_model_len}`;
  $("total-requests").textContent = d.totals.requests;
  $("inflight").textContent = sched.inflight ?? d.inflight_streams;
  $("queued").textContent = `${sched.queued ?? "–"} / ${s.max_queue}`;
  const r429 = d.rejected_by_status["429"] || 0, r503 = d.rejected_by_status["503"] || 0;
  $("r429").textContent = r429; $("r429").classList.toggle("bad", r429 > 0);
  $("r503").textContent = r503; $("r503").classList.toggle("bad", r503 > 0);
  const tokens = d.series.tokens_per_s.reduce((a, b) => a + b, 0);
  $("throughput").textContent = `${(tokens / d.series.tokens_per_s.length).toFixed(1)} tok/s`;
  $("ttft").textContent = fmtMs(rolling.ttft_s && rolling.ttft_s.p50);
  $("itl").textContent = fmtMs(rolling.itl_s && rolling.itl_s.p50);

  $("workers").replaceChildren(...(sched.workers || []).map((w) => {
    const used = w.kv_total_tokens ? w.kv_used_tokens / w.kv_total_tokens : 0;
    return row([
      { text: w.worker_id }, { node: el("span", "pill " + (w.up ? "up" : "down"), w.up ? "up" : "down") },
      { text: w.inflight, num: true }, { text: w.running, num: true }, { text: w.waiting, num: true },
      { node: bar(used) }, { text: `${w.kv_used_tokens} / ${w.kv_total_tokens}`, num: true },
      { node: labelled(bar(w.cache_hit_rate, "ok"), pct(w.cache_hit_rate)) }, { text: w.dispatched_total, num: true },
    ]);
  }));

  chart($("c-tps"), d.series.tokens_per_s, "tok/s");
  chart($("c-ttft"), d.series.ttft_ms, "ms");
  chart($("c-itl"), d.series.itl_ms, "ms");

  $("recent").replaceChildren(...d.recent.map((r) => row([
    { text: new Date(r.t * 1000).toLocaleTimeString() }, { text: r.rid }, { text: r.worker_id, num: true },
    { text: r.prompt_tokens, num: true }, { text: r.cached_tokens, num: true },
    { node: bar(r.prompt_tokens ? r.cached_tokens / r.prompt_tokens : 0, "ok") },
    { text: r.completion_tokens, num: true }, { text: fmtMs(r.ttft_s), num: true }, { text: fmtMs(r.e2e_s), num: true },
    { text: r.finish_reason },
  ])));
  if (!d.recent.length) $("recent").appendChild(row([{ text: "no request finished yet" }]));
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function labelled(node, text) {
  const wrap = el("div");
  wrap.style.display = "flex"; wrap.style.alignItems = "center"; wrap.style.gap = "8px";
  wrap.appendChild(node);
  wrap.appendChild(el("span", null, text));
  return wrap;
}

async function poll() {
  try {
    const r = await fetch("/dashboard/data", { headers: authHeaders() });
    if (r.ok) {
      const d = await r.json();
      update(d);
      if (d.server.narrate && !feedStarted) followFeed();
      if (!d.server.narrate) $("feed-note").textContent = "start the server with --narrate (NARRATE=1) to watch prefill, decode steps and chunks here";
    } else {
      $("updated").textContent = `data: HTTP ${r.status}`;
    }
  } catch (e) {
    $("updated").textContent = "server unreachable";
  }
  setTimeout(poll, 1000);
}

let feedStarted = false;
async function followFeed() {
  feedStarted = true;
  $("feed-note").textContent = "live: prefill, decode steps, dispatch and streamed chunks from every process";
  const feed = $("feed");
  try {
    const r = await fetch("/dashboard/narration", { headers: authHeaders() });
    await readSSE(r, (data) => {
      const e = JSON.parse(data);
      const line = el("div");
      line.appendChild(el("span", "t", new Date(e.t * 1000).toLocaleTimeString() + " "));
      line.appendChild(el("span", "src", e.source.padEnd(10) + " "));
      line.appendChild(document.createTextNode(e.line));
      const atBottom = feed.scrollTop + feed.clientHeight >= feed.scrollHeight - 4;
      feed.appendChild(line);
      while (feed.childNodes.length > 500) feed.removeChild(feed.firstChild);
      if (atBottom) feed.scrollTop = feed.scrollHeight;
    });
  } catch (e) { /* reconnect below */ }
  setTimeout(followFeed, 2000);
}

poll();
