// Agents: what each host's agent last reported; refreshed while the page is open.

import { get, isAbort } from "./api.js";
import { clear, fmtAgo, fmtBytes, fmtNumber, fmtTime, h } from "./util.js";

export const STALE_AFTER_S = 30; // agents report every few seconds; this many without a report means trouble
const REFRESH_MS = 5000;

export function mount(root) {
  let abort = null;
  let timer = null;
  const summary = h("span", { class: "muted", id: "agents-summary" });
  const box = h("div", { id: "agents", "data-state": "loading" });
  root.append(h("section", { class: "panel" },
    h("div", { class: "panel-head" }, h("h2", null, "Agents"), summary, h("span", { class: "spacer" }),
      h("button", { type: "button", onclick: () => load() }, "Refresh")),
    box));

  async function load() {
    clearTimeout(timer);
    if (abort) abort.abort();
    abort = new AbortController();
    try {
      const { agents } = await get("agents", null, { signal: abort.signal });
      render(agents || []);
    } catch (e) {
      if (isAbort(e)) return;
      box.dataset.state = "error";
      clear(box).append(h("div", { class: "error-box" }, e.message));
    }
    timer = setTimeout(load, REFRESH_MS);
  }

  function render(agents) {
    const now = Date.now();
    const stale = (a) => !a.last_seen_ns || now - a.last_seen_ns / 1e6 > STALE_AFTER_S * 1000;
    const nStale = agents.filter(stale).length;
    summary.textContent = `${agents.length} agent${agents.length === 1 ? "" : "s"}${nStale ? ` · ${nStale} stale` : ""} · refreshed ${fmtTime(now * 1e6, { millis: false })}`;
    box.dataset.state = "ready";
    if (!agents.length) {
      clear(box).append(h("p", { class: "empty" }, "No agent has reported yet. Start one with `deeptrace agent --server URL`."));
      return;
    }
    const num = (v) => h("td", { class: "num" }, v);
    const sorted = agents.slice().sort((a, b) => (a.host || "").localeCompare(b.host || "") || a.agent_id.localeCompare(b.agent_id));
    const rows = sorted.map((a) => {
      const s = a.stats || {};
      const isStale = stale(a);
      const uptimeS = a.started_ns ? Math.max(1, (now - a.started_ns / 1e6) / 1000) : null;
      const cpu = s.cpu_seconds !== undefined && s.cpu_seconds !== null
        ? `${Number(s.cpu_seconds).toFixed(1)} s${uptimeS ? ` (${((100 * s.cpu_seconds) / uptimeS).toFixed(1)}%)` : ""}` : "–";
      const spoolDropped = (s.spool_dropped_batches || 0) + (s.spool_dropped_spans || 0);
      return h("tr", { class: isStale ? "agent-row stale" : "agent-row", "data-agent-id": a.agent_id, "data-stale": isStale ? "1" : "0" },
        h("td", null, h("strong", null, a.host || "?"), h("div", { class: "muted mono small" }, a.agent_id)),
        h("td", null, a.version || "–"),
        h("td", { class: "small" }, a.kernel || "–"),
        h("td", { class: "nowrap", title: a.last_seen_ns ? fmtTime(a.last_seen_ns, { alwaysDate: true }) : "" },
          isStale ? h("span", { class: "badge warn" }, "stale") : h("span", { class: "badge ok" }, "live"), " ", fmtAgo(a.last_seen_ns, now)),
        h("td", { class: "nowrap small", title: a.started_ns ? fmtTime(a.started_ns, { alwaysDate: true }) : "" }, a.started_ns ? fmtAgo(a.started_ns, now).replace(" ago", "") : "–"),
        num(fmtNumber(s.spans)),
        num(fmtNumber(s.records)),
        num(s.drops ? h("span", { class: "badge error" }, fmtNumber(s.drops)) : fmtNumber(s.drops ?? 0)),
        num(h("span", null, `${fmtNumber(s.spool_batches ?? 0)} / ${fmtBytes(s.spool_bytes ?? 0)}`,
          spoolDropped ? h("div", { class: "small error-text" }, `dropped ${fmtNumber(s.spool_dropped_batches || 0)} batches, ${fmtNumber(s.spool_dropped_spans || 0)} spans`) : null,
          s.spool_write_failed_batches ? h("div", { class: "small error-text" }, `disk refused ${fmtNumber(s.spool_write_failed_batches)} batches, ${fmtNumber(s.spool_write_failed_spans || 0)} spans`) : null)),
        num(h("span", null, `${fmtNumber(s.sent_batches)} / ${fmtNumber(s.sent_spans)}`,
          s.send_failures ? h("div", { class: "small error-text" }, `${fmtNumber(s.send_failures)} failures`) : null)),
        num(cpu),
        num(fmtBytes(s.rss_bytes)));
    });
    const th = (t, num_) => h("th", num_ ? { class: "num" } : null, t);
    clear(box).append(h("table", { class: "grid agents-table" },
      h("thead", null, h("tr", null, th("Host / agent"), th("Version"), th("Kernel"), th("Last seen"), th("Up"),
        th("Spans", 1), th("Records", 1), th("Drops", 1), th("Spool (batches / bytes)", 1), th("Sent (batches / spans)", 1), th("CPU", 1), th("RSS", 1))),
      h("tbody", null, rows)));
  }

  load();

  return {
    destroy() {
      clearTimeout(timer);
      if (abort) abort.abort();
    },
  };
}
