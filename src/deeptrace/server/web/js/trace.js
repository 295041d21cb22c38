// Trace waterfall: the span tree on a shared time axis, collapsible, and a detail panel per span.
// Rows are cloned from one template and appended in one fragment, so a trace of thousands of
// spans is drawn in one layout pass; one delegated listener serves every row.

import { get, isAbort } from "./api.js";
import { hashFor, replaceHash } from "./nav.js";
import {
  b64Length, clear, fmtBytes, fmtDuration, fmtNumber, fmtTime, h, headToText, niceTicks, serviceColor,
} from "./util.js";

const INDENT_PX = 14;
const MAX_INDENT_LEVELS = 40; // deeper rows stop moving right, so names stay readable

/**
 * Rows in display order: each span under its parent, siblings by start time. A span whose parent is
 * not in the trace is a root (flagged `orphan`), and so is any span caught in a parent cycle.
 */
export function buildRows(spans) {
  const byId = new Map();
  for (const s of spans) byId.set(s.span_id, s);
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    const p = s.parent_span_id;
    if (p && p !== s.span_id && byId.has(p)) {
      let list = children.get(p);
      if (!list) children.set(p, (list = []));
      list.push(s);
    } else roots.push(s);
  }
  const byStart = (a, b) => a.start_ns - b.start_ns || (a.kind === "SERVER" ? 0 : 1) - (b.kind === "SERVER" ? 0 : 1);
  for (const list of children.values()) list.sort(byStart);
  roots.sort(byStart);

  const rows = [];
  const seen = new Set();
  const walk = (start) => {
    // An explicit stack: a deep chain of calls must not overflow the JS call stack.
    const stack = [[start, 0]];
    while (stack.length) {
      const [s, depth] = stack.pop();
      if (seen.has(s.span_id)) continue;
      seen.add(s.span_id);
      const row = { span: s, depth, index: rows.length, end: 0, childCount: 0,
        orphan: depth === 0 && !!s.parent_span_id && !byId.has(s.parent_span_id) };
      rows.push(row);
      const kids = children.get(s.span_id) || [];
      row.childCount = kids.length;
      for (let i = kids.length - 1; i >= 0; i--) stack.push([kids[i], depth + 1]);
    }
  };
  for (const r of roots) walk(r);
  for (const s of spans.slice().sort(byStart)) if (!seen.has(s.span_id)) walk(s);
  // end = index just past the row's subtree: collapsing hides rows (index, end).
  const open = [];
  for (const row of rows) {
    while (open.length && open[open.length - 1].depth >= row.depth) open.pop().end = row.index;
    open.push(row);
  }
  for (const row of open) row.end = rows.length;
  return rows;
}

function addr(a, p) {
  if (!a && !p) return "–";
  return `${a && a.includes(":") ? `[${a}]` : a || "?"}:${p ?? "?"}`;
}

export function linkLabel(span) {
  if (!span.link_method) return "";
  const c = span.link_confidence;
  return c === null || c === undefined ? span.link_method : `${span.link_method} ${Number(c).toFixed(2)}`;
}

// The agent names a span's pod and container with OpenTelemetry's attributes; k8s.workload.* are
// DeepTrace's own, one key whatever the kind. Spans that carry only OpenTelemetry's per-kind keys
// still name their workload: the first of these found.
const WORKLOAD_KINDS = ["deployment", "statefulset", "daemonset", "cronjob", "job", "replicaset"];

export function workloadOf(a) {
  if (a["k8s.workload.name"]) return { kind: a["k8s.workload.kind"] || "", name: String(a["k8s.workload.name"]) };
  const kind = WORKLOAD_KINDS.find((k) => a[`k8s.${k}.name`]);
  return kind ? { kind, name: String(a[`k8s.${kind}.name`]) } : null;
}

/** "namespace/workload" (or the half that is known) of a span that ran in a pod, else null. */
function placeLabel(a) {
  const ns = a["k8s.namespace.name"];
  const wl = workloadOf(a);
  return ns && wl ? `${ns}/${wl.name}` : ns || (wl && wl.name) || null;
}

function rowTemplate() {
  const t = document.createElement("template");
  t.innerHTML = `<div class="wf-row" role="row"><div class="wf-name" role="gridcell"><button type="button" class="wf-toggle" aria-expanded="true" tabindex="-1"></button><span class="svc-dot"></span><span class="wf-svc"></span><span class="wf-op"></span><span class="wf-tags"></span></div><div class="wf-link" role="gridcell"></div><div class="wf-timeline" role="gridcell"><div class="wf-bar"></div><span class="wf-dur"></span></div></div>`;
  return t.content.firstChild;
}

export function mount(root, traceId, params) {
  const abort = new AbortController();
  let rows = [];
  let rowEls = [];
  let selected = -1;
  let traceStart = null;
  const collapsed = new Set();

  const head = h("section", { class: "panel trace-head" }, h("p", { class: "muted" }, `Loading trace ${traceId}…`));
  const waterfall = h("section", { class: "panel waterfall", id: "waterfall", "data-state": "loading" });
  const detail = h("aside", { class: "panel detail", id: "span-detail", hidden: true });
  const body = h("div", { class: "trace-body" }, waterfall, detail);
  root.append(head, body);

  load();

  async function load() {
    let data;
    try {
      data = await get(`traces/${encodeURIComponent(traceId)}`, null, { signal: abort.signal });
    } catch (e) {
      if (isAbort(e)) return;
      clear(head).append(h("a", { href: "#/traces", class: "back" }, "‹ Search"));
      waterfall.dataset.state = "error";
      clear(waterfall).append(h("div", { class: "error-box" },
        e.status === 404 ? `Trace ${traceId} is not in the store (it may have aged out, or not be published yet).` : e.message));
      return;
    }
    const t0 = performance.now();
    render(data.spans || []);
    window.__deeptrace.lastWaterfallMs = performance.now() - t0;
    const want = params.get("span");
    if (want) select(rows.findIndex((r) => r.span.span_id === want), { scroll: true });
  }

  function render(spans) {
    rows = buildRows(spans);
    if (!rows.length) {
      renderHead(spans);
      waterfall.dataset.state = "ready";
      clear(waterfall).append(h("p", { class: "empty" }, "This trace has no spans."));
      return;
    }
    let start = Infinity;
    let end = -Infinity;
    for (const s of spans) {
      start = Math.min(start, s.start_ns);
      end = Math.max(end, s.end_ns ?? s.start_ns + (s.duration_ns || 0));
    }
    traceStart = start;
    const total = Math.max(end - start, 1);
    renderHead(spans, start, total);

    const ticks = niceTicks(0, total, 5).filter((v) => v <= total);
    const ruler = h("div", { class: "wf-ruler" },
      ticks.map((v) => h("span", { class: "wf-tick", style: `left:${((100 * v) / total).toFixed(3)}%` }, v === 0 ? "0" : fmtDuration(v))));
    const grid = h("div", { class: "wf-gridlines", "aria-hidden": "true" }, h("div"), h("div"),
      h("div", { class: "wf-gridcell" }, ticks.map((v) => h("span", { style: `left:${((100 * v) / total).toFixed(3)}%` }))));

    const tpl = rowTemplate();
    const frag = document.createDocumentFragment();
    rowEls = new Array(rows.length);
    for (const row of rows) {
      const s = row.span;
      const el = tpl.cloneNode(true);
      const err = s.status === "error";
      el.className = err ? "wf-row error" : "wf-row";
      el.dataset.index = row.index;
      el.dataset.spanId = s.span_id;
      el.dataset.depth = row.depth;
      const [nameCell, linkCell, timeCell] = el.children;
      nameCell.style.paddingLeft = `${6 + Math.min(row.depth, MAX_INDENT_LEVELS) * INDENT_PX}px`;
      const [toggle, dot, svc, op, tags] = nameCell.children;
      if (row.childCount) toggle.title = `${row.childCount} child span${row.childCount > 1 ? "s" : ""}: collapse/expand`;
      else toggle.className = "wf-toggle leaf";
      const color = serviceColor(s.service || "");
      el.style.setProperty("--svc", color);
      svc.textContent = s.service || "?";
      op.textContent = s.name || "";
      let tagText = `${s.kind === "CLIENT" ? "client" : s.kind === "SERVER" ? "server" : (s.kind || "").toLowerCase()} · ${s.protocol || "?"}`;
      if (err) tagText += ` · ${s.status_code || "error"}`;
      tags.textContent = tagText;
      if (row.orphan) {
        nameCell.title = `parent span ${s.parent_span_id} is not in this trace`;
        tags.textContent += " · parent missing";
      }
      linkCell.textContent = s.link_method && s.link_method !== "root" ? linkLabel(s) : s.link_method === "root" ? "root" : "";
      if (s.link_method === "inferred") linkCell.className = "wf-link inferred";
      const left = ((s.start_ns - start) / total) * 100;
      const width = Math.max(((s.duration_ns ?? s.end_ns - s.start_ns) / total) * 100, 0.15);
      const [bar, dur] = timeCell.children;
      bar.style.left = `${left.toFixed(3)}%`;
      bar.style.width = `${width.toFixed(3)}%`;
      dur.textContent = fmtDuration(s.duration_ns ?? s.end_ns - s.start_ns);
      // The label sits right of the bar; near the right edge, inside a wide bar or left of a narrow one.
      if (left + width <= 82) dur.style.left = `${(left + width).toFixed(3)}%`;
      else if (width >= 12) {
        dur.style.right = `${(100 - left - width).toFixed(3)}%`;
        dur.className = "wf-dur inside";
      } else {
        dur.style.right = `${(100 - left).toFixed(3)}%`;
        dur.className = "wf-dur before";
      }
      rowEls[row.index] = el;
      frag.append(el);
    }
    const rowsBox = h("div", { class: "wf-rows", role: "rowgroup" }, grid);
    rowsBox.append(frag);
    const toolbar = h("div", { class: "wf-toolbar" },
      h("button", { type: "button", id: "expand-all", onclick: () => setAll(false) }, "Expand all"),
      h("button", { type: "button", id: "collapse-all", onclick: () => setAll(true) }, "Collapse all"),
      h("span", { class: "muted small" }, "Click a row for its details; ▾ folds its children."));
    const header = h("div", { class: "wf-row wf-header", role: "row" },
      h("div", { class: "wf-name", role: "columnheader" }, "Service / operation"),
      h("div", { class: "wf-link", role: "columnheader" }, "Link"),
      h("div", { class: "wf-timeline", role: "columnheader" }, ruler));
    clear(waterfall).append(toolbar, h("div", { class: "wf-table", role: "grid", "aria-rowcount": rows.length }, header, rowsBox));
    rowsBox.addEventListener("click", onRowClick);
    waterfall.dataset.state = "ready";
    waterfall.dataset.rows = rows.length;
  }

  function renderHead(spans, start, total) {
    const services = [...new Set(spans.map((s) => s.service))].sort();
    const errors = spans.filter((s) => s.status === "error").length;
    const methods = new Map();
    for (const s of spans) if (s.link_method) methods.set(s.link_method, (methods.get(s.link_method) || 0) + 1);
    const rootSpan = rows.length ? rows[0].span : null;
    const roots = rows.filter((r) => r.depth === 0).length;
    const placed = [...new Set(spans.map((s) => placeLabel(s.attributes || {})).filter(Boolean))].sort();
    clear(head).append(
      h("div", { class: "trace-title" },
        h("a", { href: "#/traces", class: "back", title: "Back to the search" }, "‹ Search"),
        h("h1", null, rootSpan ? h("span", null, h("span", { class: "svc-dot", style: `--svc:${serviceColor(rootSpan.service || "")}` }),
          `${rootSpan.service} `, h("span", { class: "op" }, rootSpan.name)) : "Empty trace"),
        h("span", { class: "muted mono small", id: "trace-id" }, traceId)),
      h("dl", { class: "facts" },
        fact("Start", start !== undefined ? fmtTime(start, { alwaysDate: true }) : "–"),
        fact("Duration", total !== undefined ? fmtDuration(total) : "–"),
        fact("Spans", fmtNumber(spans.length)),
        fact("Errors", errors ? h("span", { class: "badge error" }, fmtNumber(errors)) : "0"),
        fact("Roots", String(roots)),
        fact("Links", [...methods].map(([m, n]) => `${m} ${n}`).join(" · ") || "–"),
        placed.length ? fact("Kubernetes", h("span", { id: "trace-k8s" }, placed.join(" · "))) : null,
        fact("Services", h("span", null, services.map((s) => h("span", { class: "svc-chip", style: `--svc:${serviceColor(s)}` }, s))))),
    );
  }

  function fact(k, v) {
    return h("div", null, h("dt", null, k), h("dd", null, v));
  }

  function onRowClick(e) {
    const el = e.target.closest(".wf-row[data-index]");
    if (!el) return;
    const i = Number(el.dataset.index);
    if (e.target.closest(".wf-toggle") && rows[i].childCount) toggle(i);
    else select(i);
  }

  function toggle(i) {
    const row = rows[i];
    const fold = !collapsed.has(i);
    if (fold) collapsed.add(i);
    else collapsed.delete(i);
    rowEls[i].classList.toggle("collapsed", fold);
    rowEls[i].firstChild.firstChild.setAttribute("aria-expanded", String(!fold));
    if (fold) {
      for (let j = i + 1; j < row.end; j++) rowEls[j].hidden = true;
      return;
    }
    for (let j = i + 1; j < row.end; ) {
      rowEls[j].hidden = false;
      j = collapsed.has(j) ? rows[j].end : j + 1;
    }
  }

  function setAll(fold) {
    collapsed.clear();
    for (const row of rows) {
      const el = rowEls[row.index];
      el.hidden = fold && row.depth > 0;
      const folds = fold && row.childCount > 0;
      if (folds) collapsed.add(row.index);
      el.classList.toggle("collapsed", folds);
      el.firstChild.firstChild.setAttribute("aria-expanded", String(!folds));
    }
  }

  function select(i, { scroll = false } = {}) {
    if (selected >= 0 && rowEls[selected]) rowEls[selected].classList.remove("selected");
    selected = i;
    if (i < 0 || !rows[i]) {
      detail.hidden = true;
      body.classList.remove("with-detail");
      replaceHash(hashFor("trace", traceId));
      return;
    }
    // A selected span inside a folded subtree is unfolded, so the highlight is visible.
    for (let a = 0; a < i; a++) if (collapsed.has(a) && rows[a].end > i) toggle(a);
    const el = rowEls[i];
    el.classList.add("selected");
    if (scroll) el.scrollIntoView({ block: "center" });
    showDetail(rows[i]);
    replaceHash(hashFor("trace", traceId, { span: rows[i].span.span_id }));
  }

  function showDetail(row) {
    const s = row.span;
    const err = s.status === "error";
    const kv = (k, v, cls) => h("tr", cls ? { class: cls } : null, h("th", null, k), h("td", null, v));
    const parentIdx = s.parent_span_id ? rows.findIndex((r) => r.span.span_id === s.parent_span_id) : -1;
    const parentCell = !s.parent_span_id ? "none (root)"
      : parentIdx >= 0 ? h("a", { href: "#", class: "mono", onclick: (e) => { e.preventDefault(); select(parentIdx, { scroll: true }); } },
        `${s.parent_span_id} (${rows[parentIdx].span.service} ${rows[parentIdx].span.name})`)
        : h("span", null, h("span", { class: "mono" }, s.parent_span_id), " ", h("span", { class: "badge warn" }, "not in this trace"));
    const start = traceStart ?? s.start_ns;
    const attrs = Object.entries(s.attributes || {}).sort(([a], [b]) => a.localeCompare(b));
    const link = linkLabel(s);
    clear(detail).append(
      h("div", { class: "detail-head" },
        h("h2", null, h("span", { class: "svc-dot", style: `--svc:${serviceColor(s.service || "")}` }), `${s.service} `, h("span", { class: "op" }, s.name)),
        h("button", { type: "button", class: "link-button", id: "detail-close", title: "Close (Esc)", onclick: () => select(-1) }, "×")),
      h("table", { class: "kv" }, h("tbody", null,
        kv("Status", err ? h("span", { class: "badge error" }, `error ${s.status_code ?? ""}`.trim()) : h("span", { class: "badge ok" }, `ok${s.status_code ? " " + s.status_code : ""}`)),
        kv("Kind", s.kind), kv("Protocol", s.protocol),
        kv("Duration", fmtDuration(s.duration_ns ?? s.end_ns - s.start_ns)),
        kv("Start", `${fmtTime(s.start_ns, { alwaysDate: true })}  (+${fmtDuration(s.start_ns - start)})`),
        kv("Link", h("span", { id: "detail-link", class: s.link_method === "inferred" ? "inferred" : "" }, link || "–")),
        kv("Parent", parentCell),
        kv("Span ID", h("span", { class: "mono" }, s.span_id)),
        kv("Host", s.host), kv("PID / TID", `${s.pid ?? "–"} / ${s.tid ?? "–"}${s.resp_tid !== undefined && s.resp_tid !== null && s.resp_tid !== s.tid ? ` (response on ${s.resp_tid})` : ""}`),
        kv("Local", h("span", { class: "mono" }, addr(s.laddr, s.lport))),
        kv("Remote", h("span", { class: "mono" }, addr(s.raddr, s.rport))),
        s.peer_service !== undefined ? kv("Peer service", s.peer_service || "–") : null,
        kv("Connection", String(s.conn_id ?? "–")),
        kv("Sizes", `request ${fmtBytes(s.req_size)} · response ${fmtBytes(s.resp_size)}`),
        kv("TCP seq", h("span", { class: "mono small" }, `req ${seqText(s.req_seq)} · resp ${seqText(s.resp_seq)}`)),
      )),
      ...placeGroups(s.attributes || {}, kv),
      h("h3", null, `Attributes (${attrs.length})`),
      attrs.length ? h("table", { class: "kv attrs" }, h("tbody", null,
        attrs.map(([k, v]) => kv(k, h("span", { class: "mono" }, typeof v === "string" ? v : JSON.stringify(v))))))
        : h("p", { class: "muted" }, "none"),
      head_("Request head", s.req_head, s.req_size, "req-head"),
      head_("Response head", s.resp_head, s.resp_size, "resp-head"),
      h("details", { class: "raw" }, h("summary", null, "Raw span JSON"), h("pre", null, JSON.stringify(s, null, 2))),
    );
    detail.hidden = false;
    body.classList.add("with-detail");
  }

  /**
   * Where the span ran: a Kubernetes group and a Container group, each with only the rows its
   * attributes give, and absent without them (a plain Docker host has a container but no pod;
   * most spans off a cluster have neither). Namespace, workload and pod link to their traces.
   */
  function placeGroups(a, kv) {
    const val = (k) => (a[k] === undefined || a[k] === null || a[k] === "" ? null : String(a[k]));
    const ns = val("k8s.namespace.name");
    const wl = workloadOf(a);
    const pod = val("k8s.pod.name");
    const search = (text, what, p) => h("a", { href: hashFor("traces", "", ns ? { namespace: ns, ...p } : p), title: `Search the traces of this ${what}` }, text);
    const group = (id, title, trs) => (trs.some(Boolean) ? h("div", { id }, h("h3", null, title), h("table", { class: "kv" }, h("tbody", null, trs))) : null);
    const wlText = wl && (wl.kind ? `${wl.kind}/${wl.name}` : wl.name);
    const id = val("container.id");
    return [
      group("detail-k8s", "Kubernetes", [
        ns ? kv("Namespace", search(ns, "namespace", {})) : null,
        // The search knows a workload by DeepTrace's key: a span named only by OpenTelemetry's gets no link.
        wl ? kv("Workload", val("k8s.workload.name") ? search(wlText, "workload", { workload: wl.name }) : wlText) : null,
        pod ? kv("Pod", search(pod, "pod", { pod })) : null,
        val("k8s.pod.uid") ? kv("Pod UID", h("span", { class: "mono small" }, val("k8s.pod.uid"))) : null,
        val("k8s.node.name") ? kv("Node", val("k8s.node.name")) : null,
        val("k8s.pod.qos_class") ? kv("QoS class", val("k8s.pod.qos_class")) : null,
      ]),
      group("detail-container", "Container", [
        // The pod spec's name (Kubernetes), else the runtime's own name where a span has one.
        val("k8s.container.name") || val("container.name") ? kv("Name", val("k8s.container.name") || val("container.name")) : null,
        // Short as `docker ps` shows it; the whole id is in the title and the attributes below.
        id ? kv("ID", h("span", { class: "mono", title: id }, id.length > 12 ? id.slice(0, 12) : id)) : null,
        val("container.runtime") ? kv("Runtime", val("container.runtime")) : null,
      ]),
    ].filter(Boolean); // the panel is filled by DOM append, which would print a null
  }

  function head_(title, b64, size, id) {
    const captured = b64Length(b64);
    const note = !b64 ? "nothing captured"
      : size > captured ? `first ${fmtBytes(captured)} of ${fmtBytes(size)}` : fmtBytes(captured);
    return h("div", { class: "payload" },
      h("h3", null, title, " ", h("span", { class: "muted small" }, note)),
      b64 ? h("pre", { class: "head", id }, headToText(b64)) : null);
  }

  const onKey = (e) => {
    if (e.key === "Escape" && !detail.hidden) select(-1);
  };
  document.addEventListener("keydown", onKey);

  return {
    update(arg, p) {
      if (arg !== traceId) return false;
      if (!rows.length) {
        params = p; // still loading: the selection is applied once the spans are drawn
        return true;
      }
      const want = p.get("span");
      const i = want ? rows.findIndex((r) => r.span.span_id === want) : -1;
      if (i !== selected) select(i, { scroll: true });
      return true;
    },
    destroy() {
      abort.abort();
      document.removeEventListener("keydown", onKey);
    },
  };
}

function seqText(seq) {
  return Array.isArray(seq) ? `[${seq[0]}, ${seq[1]})` : "–";
}
