// Small SVG line charts for RED time series (one metric family per chart, a few series each).

import { fmtTime, niceTicks, svg } from "./util.js";

const M = { top: 8, right: 10, bottom: 20, left: 62 };

/**
 * points: [{t_ns, ...}]; series: [{key, label, color, value?(p)}]; fmt formats a y value.
 * Points with a null value leave a gap rather than dropping to zero.
 */
export function lineChart(points, series, { width = 320, height = 120, fmt = String, title = "" } = {}) {
  const root = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  const plotW = width - M.left - M.right;
  const plotH = height - M.top - M.bottom;
  if (!points.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis-note" }, "no data in this range"));
    return root;
  }
  const t0 = points[0].t_ns;
  const tx = points.map((p) => (p.t_ns - t0) / 1e6);
  const tMax = Math.max(tx[tx.length - 1], 1);
  const val = (s, p) => {
    const v = s.value ? s.value(p) : p[s.key];
    return v === null || v === undefined || Number.isNaN(v) ? null : Number(v);
  };
  let yMax = 0;
  for (const s of series) for (const p of points) yMax = Math.max(yMax, val(s, p) ?? 0);
  if (yMax === 0) yMax = 1;
  yMax *= 1.1;
  const x = (v) => M.left + (v / tMax) * plotW;
  const y = (v) => M.top + plotH - (v / yMax) * plotH;

  for (const v of niceTicks(0, yMax, 3)) {
    root.append(svg("line", { x1: M.left, x2: width - M.right, y1: y(v), y2: y(v), class: "grid-line" }),
      svg("text", { x: M.left - 5, y: y(v) + 4, "text-anchor": "end" }, v === 0 ? "0" : fmt(v)));
  }
  root.append(svg("text", { x: M.left, y: height - 5, "text-anchor": "start" }, fmtTime(t0, { millis: false })),
    svg("text", { x: width - M.right, y: height - 5, "text-anchor": "end" }, fmtTime(points[points.length - 1].t_ns, { millis: false })));

  for (const s of series) {
    let d = "";
    let pen = false;
    points.forEach((p, i) => {
      const v = val(s, p);
      if (v === null) {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${x(tx[i]).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    if (d) root.append(svg("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.6, class: "series" }));
    // A lone point between gaps would be invisible as a path: dots make every sample visible.
    if (points.length <= 60) {
      points.forEach((p, i) => {
        const v = val(s, p);
        if (v !== null) root.append(svg("circle", { cx: x(tx[i]).toFixed(1), cy: y(v).toFixed(1), r: 1.8, fill: s.color }));
      });
    }
  }
  return root;
}
