// Trace search: filters, a latency/time scatter of the result page, the results table, paging.
// Only one page of traces is ever fetched, so this stays fast whatever the store holds.

import { get, isAbort } from "./api.js";
import { hashFor, replaceHash } from "./nav.js";
import { drawScatter } from "./scatter.js";
import {
  RANGES, clear, fmtDuration, fmtNumber, fmtTime, h, rangeToNs, serviceColor, toLocalInput,
} from "./util.js";

const PAGE_SIZES = [20, 50, 100, 200];
const DEFAULTS = { range: "1h", sort: "start", order: "desc", limit: "20", offset: "0" };
// Kubernetes filters: their own fields and URL keys, sent as the API's attribute filter on the
// agent's attributes. The workload's name is DeepTrace's one key for every kind of workload.
const K8S_FILTERS = [
  { key: "namespace", attr: "k8s.namespace.name", label: "Namespace" },
  { key: "workload", attr: "k8s.workload.name", label: "Workload" },
  { key: "pod", attr: "k8s.pod.name", label: "Pod" },
];

/** The search state from the hash, with defaults filled in. */
function stateFrom(params) {
  const s = {};
  for (const k of ["service", "operation", "status", "min", "max", "range", "from", "to", "sort", "order", "limit", "offset", "log",
    ...K8S_FILTERS.map((k) => k.key)]) {
    s[k] = params.get(k) ?? DEFAULTS[k] ?? "";
  }
  s.attr = params.getAll("attr").filter((a) => a.includes("="));
  if (!PAGE_SIZES.includes(Number(s.limit))) s.limit = DEFAULTS.limit;
  if (s.range !== "custom" && !RANGES.some((r) => r.key === s.range)) s.range = DEFAULTS.range;
  if (s.sort !== "duration") s.sort = "start";
  if (s.order !== "asc") s.order = "desc";
  if (!(Number(s.offset) >= 0)) s.offset = "0";
  return s;
}

/** Only what differs from the defaults goes into the URL, so links stay short. */
function paramsFrom(s) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(s)) {
    if (k === "attr") v.forEach((a) => p.append("attr", a));
    else if (v !== "" && v !== undefined && v !== DEFAULTS[k]) p.set(k, v);
  }
  if (s.range !== "custom") {
    p.delete("from");
    p.delete("to");
  }
  return p;
}

export function mount(root, _arg, params) {
  let state = stateFrom(params);
  let abort = null;
  let opsAbort = null;
  let lastResult = null;
  let attrs = [...state.attr];

  const f = {
    service: h("select", { name: "service", "aria-label": "Service" }, h("option", { value: "" }, "All services")),
    operation: h("select", { name: "operation", "aria-label": "Operation", disabled: true }, h("option", { value: "" }, "All operations")),
    status: h("select", { name: "status", "aria-label": "Status" },
      h("option", { value: "" }, "Any status"), h("option", { value: "ok" }, "OK"), h("option", { value: "error" }, "Error")),
    min: h("input", { name: "min", type: "number", min: "0", step: "any", placeholder: "min ms", "aria-label": "Minimum duration (ms)" }),
    max: h("input", { name: "max", type: "number", min: "0", step: "any", placeholder: "max ms", "aria-label": "Maximum duration (ms)" }),
    range: h("select", { name: "range", "aria-label": "Time range" },
      RANGES.map((r) => h("option", { value: r.key }, r.label)), h("option", { value: "custom" }, "Custom…")),
    from: h("input", { name: "from", type: "datetime-local", "aria-label": "From" }),
    to: h("input", { name: "to", type: "datetime-local", "aria-label": "To" }),
    attrInput: h("input", { name: "attr", type: "text", placeholder: "key=value, Enter", "aria-label": "Attribute filter key=value", size: "22" }),
    sort: h("select", { name: "sort", "aria-label": "Sort by" },
      h("option", { value: "start" }, "Start time"), h("option", { value: "duration" }, "Duration")),
    order: h("select", { name: "order", "aria-label": "Order" }, h("option", { value: "desc" }, "desc"), h("option", { value: "asc" }, "asc")),
    limit: h("select", { name: "limit", "aria-label": "Page size" }, PAGE_SIZES.map((n) => h("option", { value: String(n) }, `${n} / page`))),
  };
  for (const k of K8S_FILTERS) {
    f[k.key] = h("input", { name: k.key, type: "text", placeholder: k.label.toLowerCase(), "aria-label": `Kubernetes ${k.label.toLowerCase()}`,
      title: `${k.attr} (exact)`, size: "12" });
  }
  const attrChips = h("span", { class: "chips", id: "attr-chips" });
  const customRange = h("span", { class: "custom-range" }, f.from, h("span", { class: "muted" }, "to"), f.to);

  const form = h("form", { class: "filters panel", id: "search-form", autocomplete: "off" },
    field("Service", f.service), field("Operation", f.operation), field("Status", f.status),
    field("Duration", h("span", { class: "pair" }, f.min, h("span", { class: "muted" }, "–"), f.max)),
    field("Time", h("span", { class: "pair" }, f.range, customRange)),
    field("Kubernetes", h("span", { class: "pair" }, K8S_FILTERS.map((k) => f[k.key]))),
    field("Attributes", h("span", { class: "pair" }, f.attrInput, attrChips)),
    field("Sort", h("span", { class: "pair" }, f.sort, f.order, f.limit)),
    h("div", { class: "field actions" }, h("button", { type: "submit", class: "primary", id: "search-button" }, "Search")),
  );

  const scatterBox = h("div", { class: "scatter-box" });
  const logToggle = h("input", { type: "checkbox", id: "scatter-log" });
  const scatterPanel = h("section", { class: "panel scatter-panel" },
    h("div", { class: "panel-head" }, h("h2", null, "Latency over time"),
      h("span", { class: "muted", id: "scatter-note" }),
      h("span", { class: "spacer" }),
      h("label", { class: "inline" }, logToggle, " log scale")),
    scatterBox);
  const summary = h("div", { class: "results-summary", id: "results-summary" });
  const results = h("div", { id: "results", "data-state": "idle" });
  const pager = h("div", { class: "pager", id: "pager" });
  const resultsPanel = h("section", { class: "panel" },
    h("div", { class: "panel-head" }, h("h2", null, "Traces"), summary), results, pager);

  root.append(h("div", { class: "search-layout" }, form, scatterPanel, resultsPanel));

  function field(label, control) {
    return h("label", { class: "field" }, h("span", { class: "field-label" }, label), control);
  }

  function renderChips() {
    clear(attrChips).append(...attrs.map((a, i) =>
      h("span", { class: "chip" }, a,
        h("button", { type: "button", class: "chip-x", title: `Remove ${a}`, onclick: () => { attrs.splice(i, 1); renderChips(); } }, "×"))));
  }

  function takeAttrInput() {
    const v = f.attrInput.value.trim();
    if (!v) return true;
    if (!/^[^=\s][^=]*=.*/.test(v)) {
      f.attrInput.setCustomValidity("Use key=value");
      f.attrInput.reportValidity();
      return false;
    }
    f.attrInput.setCustomValidity("");
    if (!attrs.includes(v)) attrs.push(v);
    f.attrInput.value = "";
    renderChips();
    return true;
  }

  f.attrInput.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      takeAttrInput();
    }
  });
  f.attrInput.addEventListener("input", () => f.attrInput.setCustomValidity(""));
  for (const el of [f.from, f.to]) el.addEventListener("input", () => f.to.setCustomValidity(""));

  f.range.addEventListener("change", () => {
    if (f.range.value === "custom" && !f.from.value) {
      f.from.value = toLocalInput(Date.now() - 3600e3);
      f.to.value = toLocalInput(Date.now());
    }
    customRange.hidden = f.range.value !== "custom";
  });
  f.service.addEventListener("change", () => loadOperations(f.service.value, ""));
  logToggle.addEventListener("change", () => {
    state.log = logToggle.checked ? "1" : "";
    replaceHash(hashFor("traces", "", paramsFrom(state)));
    drawScatterNow();
  });

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!takeAttrInput()) return;
    if (f.range.value === "custom") {
      const bad = !f.from.value || !f.to.value ? "Give both ends of the time range"
        : new Date(f.from.value) >= new Date(f.to.value) ? "The range must end after it starts" : "";
      f.to.setCustomValidity(bad);
      if (bad) {
        f.to.reportValidity();
        return;
      }
    }
    const next = {
      ...state,
      service: f.service.value, operation: f.operation.value, status: f.status.value,
      min: f.min.value, max: f.max.value, range: f.range.value, from: f.from.value, to: f.to.value,
      sort: f.sort.value, order: f.order.value, limit: f.limit.value, attr: [...attrs], offset: "0",
    };
    for (const k of K8S_FILTERS) next[k.key] = f[k.key].value.trim();
    go(next);
  });

  /** New state into the URL; the hashchange runs the search. The same URL again still searches,
   * since "last 15 minutes" means something new each time. */
  function go(next) {
    const hash = hashFor("traces", "", paramsFrom(next));
    if (hash === location.hash) update("", new URLSearchParams(paramsFrom(next)));
    else location.hash = hash;
  }

  function fillForm() {
    f.service.value = state.service;
    if (f.service.value !== state.service) {
      // A service not (yet) in the list, e.g. from a shared link: keep it selectable.
      f.service.append(h("option", { value: state.service }, state.service));
      f.service.value = state.service;
    }
    f.status.value = state.status;
    f.min.value = state.min;
    f.max.value = state.max;
    f.range.value = state.range;
    f.from.value = state.from;
    f.to.value = state.to;
    customRange.hidden = state.range !== "custom";
    f.sort.value = state.sort;
    f.order.value = state.order;
    f.limit.value = state.limit;
    for (const k of K8S_FILTERS) f[k.key].value = state[k.key];
    logToggle.checked = state.log === "1";
    attrs = [...state.attr];
    renderChips();
  }

  async function loadServices() {
    try {
      const { services } = await get("services");
      const keep = state.service;
      f.service.replaceChildren(h("option", { value: "" }, "All services"),
        ...services.slice().sort().map((s) => h("option", { value: s }, s)));
      f.service.value = keep;
      if (keep && f.service.value !== keep) {
        f.service.append(h("option", { value: keep }, keep));
        f.service.value = keep;
      }
    } catch (e) {
      if (!isAbort(e)) showError(`Could not load the list of services. ${e.message}`);
    }
  }

  let opsFor = null;
  async function loadOperations(service, keep) {
    if (opsAbort) opsAbort.abort();
    opsFor = service;
    f.operation.replaceChildren(h("option", { value: "" }, "All operations"));
    f.operation.disabled = !service;
    if (!service) return;
    if (keep) {
      f.operation.append(h("option", { value: keep }, keep));
      f.operation.value = keep;
    }
    opsAbort = new AbortController();
    try {
      const { operations } = await get(`services/${encodeURIComponent(service)}/operations`, null, { signal: opsAbort.signal });
      const names = [...new Set(operations.map((o) => o.name))].sort();
      const current = f.operation.value;
      f.operation.replaceChildren(h("option", { value: "" }, "All operations"),
        ...names.map((n) => {
          const kinds = operations.filter((o) => o.name === n).map((o) => o.kind).join("/");
          return h("option", { value: n }, kinds ? `${n}  (${kinds})` : n);
        }));
      if (current && !names.includes(current)) f.operation.append(h("option", { value: current }, current));
      f.operation.value = current;
    } catch (e) {
      if (!isAbort(e)) showError(`Could not load the operations of ${service}. ${e.message}`);
    }
  }

  function showError(message) {
    results.dataset.state = "error";
    clear(results).append(h("div", { class: "error-box" }, message));
  }

  async function runSearch() {
    if (abort) abort.abort();
    abort = new AbortController();
    const [start_ns, end_ns] = rangeToNs(state.range, state.from, state.to);
    const q = {
      service: state.service, operation: state.operation, status: state.status,
      min_duration_ms: state.min, max_duration_ms: state.max, start_ns, end_ns,
      // After the typed ones: for the same key the API keeps the last, so the field wins.
      attr: [...state.attr, ...K8S_FILTERS.filter((k) => state[k.key]).map((k) => `${k.attr}=${state[k.key]}`)],
      sort: state.sort, order: state.order, limit: state.limit, offset: state.offset,
    };
    results.dataset.state = "loading";
    results.classList.add("loading");
    summary.textContent = "Searching…";
    try {
      const data = await get("traces", q, { signal: abort.signal });
      lastResult = data;
      renderResults(data);
    } catch (e) {
      if (isAbort(e)) return;
      lastResult = null;
      summary.textContent = "";
      clear(pager);
      clear(scatterBox);
      showError(e.message);
    } finally {
      results.classList.remove("loading");
    }
  }

  function renderResults(data) {
    const traces = data.traces || [];
    const offset = Number(data.offset ?? state.offset) || 0;
    const total = Number(data.total ?? traces.length);
    summary.textContent = total === 0 ? "no matching traces"
      : `${fmtNumber(offset + 1)}–${fmtNumber(offset + traces.length)} of ${fmtNumber(total)}`;
    drawScatterNow();
    if (!traces.length) {
      clear(results).append(h("p", { class: "empty" }, "No traces match. Widen the time range or remove filters."));
    } else {
      clear(results).append(table(traces));
    }
    results.dataset.state = "ready";
    renderPager(offset, traces.length, total);
  }

  function sortHeader(label, key) {
    const active = state.sort === key;
    const arrow = active ? (state.order === "asc" ? " ▲" : " ▼") : "";
    return h("th", { class: `sortable${active ? " sorted" : ""}`, "data-sort": key, title: `Sort by ${label.toLowerCase()}` },
      h("button", {
        type: "button", class: "link-button",
        onclick: () => go({ ...state, sort: key, order: active && state.order === "desc" ? "asc" : "desc", offset: "0" }),
      }, label + arrow));
  }

  function table(traces) {
    const maxDur = Math.max(...traces.map((t) => t.duration_ns || 0), 1);
    const body = h("tbody");
    const frag = document.createDocumentFragment();
    for (const t of traces) {
      const link = hashFor("trace", t.trace_id);
      const services = (t.services || []).map((s) => h("span", { class: "svc-chip", style: `--svc:${serviceColor(s)}` }, s));
      frag.append(h("tr", { class: t.error_count > 0 ? "trace-row has-error" : "trace-row", "data-trace-id": t.trace_id },
        h("td", { class: "nowrap" }, fmtTime(t.start_ns)),
        h("td", null,
          h("a", { href: link, class: "trace-link" },
            h("span", { class: "svc-dot", style: `--svc:${serviceColor(t.root_service || "")}` }),
            h("strong", null, t.root_service || "?"), " ", t.root_name || ""),
          // Where the root ran, when the agent knew (Kubernetes): namespace/workload.
          t.root_namespace ? h("div", { class: "muted small k8s-where" }, [t.root_namespace, t.root_workload].filter(Boolean).join("/")) : null,
          h("div", { class: "muted mono small" }, t.trace_id)),
        h("td", { class: "num nowrap" },
          h("div", { class: "dur-cell" }, h("span", null, fmtDuration(t.duration_ns)),
            h("span", { class: "dur-bar", style: `width:${Math.max(2, (100 * (t.duration_ns || 0)) / maxDur).toFixed(1)}%` }))),
        h("td", { class: "num" }, fmtNumber(t.span_count)),
        h("td", { class: "num" }, t.error_count > 0 ? h("span", { class: "badge error" }, fmtNumber(t.error_count)) : "0"),
        h("td", { class: "services" }, services)));
    }
    body.append(frag);
    // A click anywhere on a row opens the trace; the link itself keeps middle-click / copy-link working.
    body.addEventListener("click", (e) => {
      if (e.target.closest("a")) return;
      const tr = e.target.closest("tr[data-trace-id]");
      if (tr) location.hash = hashFor("trace", tr.dataset.traceId);
    });
    return h("table", { class: "grid results-table" },
      h("thead", null, h("tr", null, sortHeader("Start", "start"), h("th", null, "Root service / operation"),
        sortHeader("Duration", "duration"), h("th", { class: "num" }, "Spans"), h("th", { class: "num" }, "Errors"), h("th", null, "Services"))),
      body);
  }

  function renderPager(offset, count, total) {
    const limit = Number(state.limit);
    const prev = h("button", { type: "button", id: "page-prev", disabled: offset <= 0 }, "‹ Previous");
    const next = h("button", { type: "button", id: "page-next", disabled: offset + count >= total }, "Next ›");
    prev.addEventListener("click", () => go({ ...state, offset: String(Math.max(0, offset - limit)) }));
    next.addEventListener("click", () => go({ ...state, offset: String(offset + limit) }));
    const pages = Math.max(1, Math.ceil(total / limit));
    clear(pager).append(prev, h("span", { class: "muted" }, `page ${fmtNumber(Math.floor(offset / limit) + 1)} of ${fmtNumber(pages)}`), next);
  }

  function drawScatterNow() {
    const traces = lastResult ? lastResult.traces || [] : [];
    const note = document.getElementById("scatter-note");
    if (note) note.textContent = traces.length ? `the ${traces.length} traces of this page · errors in red · click a dot to open` : "";
    drawScatter(scatterBox, traces, {
      log: state.log === "1",
      onOpen: (id) => { location.hash = hashFor("trace", id); },
    });
  }

  let drawnWidth = 0;
  const resize = new ResizeObserver(() => {
    // Only a new width needs a new drawing; redrawing on every notification could feed the observer.
    if (scatterBox.clientWidth !== drawnWidth) {
      drawnWidth = scatterBox.clientWidth;
      drawScatterNow();
    }
  });
  resize.observe(scatterBox);

  function update(_arg, params) {
    const prevService = state.service;
    state = stateFrom(params);
    fillForm();
    if (state.service !== prevService || opsFor !== state.service) loadOperations(state.service, state.operation);
    else f.operation.value = state.operation;
    runSearch();
    return true;
  }

  fillForm();
  loadServices();
  loadOperations(state.service, state.operation);
  runSearch();

  return {
    update,
    destroy() {
      if (abort) abort.abort();
      if (opsAbort) opsAbort.abort();
      resize.disconnect();
    },
  };
}
