// Latency/time scatter in plain SVG: x = trace start, y = duration, errors in red.
// It draws what it is given (one result page, at most a few hundred dots), so SVG is cheap enough.

import { clear, fmtDuration, fmtMs, fmtTime, niceTicks, svg } from "./util.js";

const HEIGHT = 200;
const M = { top: 12, right: 16, bottom: 26, left: 64 };

export function drawScatter(box, traces, { log = false, onOpen } = {}) {
  clear(box);
  const width = Math.max(320, box.clientWidth || 800);
  const root = svg("svg", {
    class: "scatter", width, height: HEIGHT, viewBox: `0 0 ${width} ${HEIGHT}`, role: "img",
    "aria-label": `Latency of ${traces.length} traces over time`, "data-points": traces.length,
  });
  box.append(root);
  const plotW = width - M.left - M.right;
  const plotH = HEIGHT - M.top - M.bottom;
  if (!traces.length) {
    root.append(svg("text", { x: width / 2, y: HEIGHT / 2, class: "axis-note", "text-anchor": "middle" }, "no traces to plot"));
    return;
  }

  // Start times relative to the earliest, in ms: ns epochs are beyond exact float range.
  const t0 = Math.min(...traces.map((t) => t.start_ns));
  const xs = traces.map((t) => (t.start_ns - t0) / 1e6);
  const ys = traces.map((t) => Math.max(t.duration_ns, 1) / 1e6);
  let xMax = Math.max(...xs);
  let xMin = 0;
  if (xMax === 0) {
    xMin = -500;
    xMax = 500;
  }
  const pad = (xMax - xMin) * 0.03;
  xMin -= pad;
  xMax += pad;
  const x = (v) => M.left + ((v - xMin) / (xMax - xMin)) * plotW;

  let y;
  let yTicks;
  if (log) {
    const lo = Math.floor(Math.log10(Math.min(...ys)));
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(Math.max(...ys))));
    y = (v) => M.top + plotH - ((Math.log10(v) - lo) / (hi - lo)) * plotH;
    yTicks = [];
    for (let e = lo; e <= hi; e++) yTicks.push(10 ** e);
  } else {
    const yMax = Math.max(...ys) * 1.08;
    y = (v) => M.top + plotH - (v / yMax) * plotH;
    yTicks = niceTicks(0, yMax, 4);
  }

  const axes = svg("g", { class: "axes" });
  for (const v of yTicks) {
    const yy = y(v);
    axes.append(svg("line", { x1: M.left, x2: width - M.right, y1: yy, y2: yy, class: "grid-line" }),
      svg("text", { x: M.left - 6, y: yy + 4, "text-anchor": "end" }, v === 0 ? "0" : fmtMs(v)));
  }
  for (const v of niceTicks(xMin, xMax, Math.max(2, Math.floor(plotW / 110)))) {
    const xx = x(v);
    axes.append(svg("line", { x1: xx, x2: xx, y1: M.top + plotH, y2: M.top + plotH + 4, class: "tick" }),
      svg("text", { x: xx, y: HEIGHT - 8, "text-anchor": "middle" }, fmtTime(t0 + v * 1e6, { millis: xMax - xMin < 10e3 })));
  }
  axes.append(svg("line", { x1: M.left, x2: width - M.right, y1: M.top + plotH, y2: M.top + plotH, class: "axis-line" }));
  root.append(axes);

  const dots = svg("g", { class: "dots" });
  // Errors drawn last, so they are never hidden under ok dots.
  const order = traces.map((_, i) => i).sort((a, b) => (traces[a].error_count > 0) - (traces[b].error_count > 0));
  for (const i of order) {
    const t = traces[i];
    const err = t.error_count > 0;
    dots.append(svg("circle", {
      cx: x(xs[i]).toFixed(1), cy: y(ys[i]).toFixed(1), r: err ? 5 : 4.5,
      class: err ? "dot error" : "dot", "data-trace-id": t.trace_id, tabindex: 0,
    }, svg("title", null, `${t.root_service} ${t.root_name}\n${fmtDuration(t.duration_ns)} · ${t.span_count} spans${err ? ` · ${t.error_count} errors` : ""}\n${fmtTime(t.start_ns)}`)));
  }
  const open = (e) => {
    const c = e.target.closest("circle[data-trace-id]");
    if (c && onOpen) onOpen(c.dataset.traceId);
  };
  dots.addEventListener("click", open);
  dots.addEventListener("keydown", (e) => {
    if (e.key === "Enter") open(e);
  });
  root.append(dots);
}
