// Service map: services and the calls between them with RED figures, from /api/v1/service-map.
// The graph is drawn by cytoscape (loaded on first use); the same figures are also listed in tables,
// so the page is still useful, and readable by a screen reader, if the graph library fails to load.

import { get, isAbort } from "./api.js";
import { lineChart } from "./charts.js";
import { hashFor, replaceHash } from "./nav.js";
import { RANGES, clear, fmtMs, fmtNumber, fmtPercent, fmtRate, h, rangeToNs, serviceColor } from "./util.js";

const CYTOSCAPE_URL = "vendor/cytoscape/dist/cytoscape.min.js";
let cytoscapeLoading = null;

/** The library as a classic script: its UMD build needs no module MIME type from the server. */
function loadCytoscape() {
  if (window.cytoscape) return Promise.resolve(window.cytoscape);
  if (!cytoscapeLoading) {
    cytoscapeLoading = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = CYTOSCAPE_URL;
      s.onload = () => (window.cytoscape ? resolve(window.cytoscape) : reject(new Error("cytoscape did not define itself")));
      s.onerror = () => {
        cytoscapeLoading = null;
        s.remove();
        reject(new Error(`could not load ${CYTOSCAPE_URL} (run npm ci in the web directory)`));
      };
      document.head.append(s);
    });
  }
  return cytoscapeLoading;
}

/** A step with no requests has no error rate or latency: a gap in the line, not a drop to zero. */
const ifAny = (key) => (p) => (p.requests ? p[key] : null);

const errColor = (rate) => (rate >= 0.05 ? "#d1342f" : rate > 0 ? "#d9822b" : "#5f6b7a");

function stepFor(rangeKey) {
  const r = RANGES.find((x) => x.key === rangeKey) || RANGES[1];
  // About 60 points whatever the range; never finer than 10 s.
  return Math.max(10, Math.round(r.seconds / 60));
}

export function mount(root, _arg, params) {
  let range = RANGES.some((r) => r.key === params.get("range")) ? params.get("range") : "1h";
  let selection = params.get("node") ? { node: params.get("node") } : params.get("edge") ? { edge: params.get("edge") } : null;
  let abort = null;
  let sideAbort = null;
  let cy = null;
  let data = null; // the server's answer
  let model = { nodes: [], edges: [] }; // what is drawn: its nodes plus the callees only edges name

  const rangeSel = h("select", { id: "map-range", "aria-label": "Time range" }, RANGES.map((r) => h("option", { value: r.key }, r.label)));
  rangeSel.value = range;
  rangeSel.addEventListener("change", () => {
    range = rangeSel.value;
    syncHash();
    load();
  });
  const refresh = h("button", { type: "button", onclick: () => load() }, "Refresh");
  const summary = h("span", { class: "muted", id: "map-summary" });
  const graph = h("div", { id: "service-map", class: "map-canvas", "data-state": "loading" });
  const side = h("aside", { class: "panel map-side", id: "map-side" },
    h("p", { class: "muted" }, "Click a service or a call to see its rate, errors and latency over time."));
  const tables = h("section", { class: "panel map-tables" });
  root.append(
    h("section", { class: "panel panel-head map-head" }, h("h2", null, "Service map"), summary, h("span", { class: "spacer" }),
      h("span", { class: "legend" }, h("span", { class: "legend-node" }), "service (its SERVER spans)",
        h("span", { class: "legend-edge" }), "calls (callers' CLIENT spans)",
        h("span", { class: "legend-node untraced" }), "not traced (measured by its callers)"),
      rangeSel, refresh),
    h("div", { class: "map-body" }, h("section", { class: "panel map-graph" }, graph), side),
    tables);

  function syncHash() {
    const p = { range };
    if (selection && selection.node) p.node = selection.node;
    if (selection && selection.edge) p.edge = selection.edge;
    if (range === "1h") delete p.range;
    replaceHash(hashFor("map", "", p));
  }

  async function load() {
    if (abort) abort.abort();
    abort = new AbortController();
    const [start_ns, end_ns] = rangeToNs(range);
    graph.dataset.state = "loading";
    summary.textContent = "loading…";
    let traced;
    try {
      // Which services have spans of their own: the map also names callees nothing traced (a
      // database seen only through its clients), which have no traces to search.
      [data, traced] = await Promise.all([
        get("service-map", { start_ns, end_ns }, { signal: abort.signal }),
        get("services", null, { signal: abort.signal }).then((r) => new Set(r.services), (e) => (isAbort(e) ? Promise.reject(e) : null)),
      ]);
    } catch (e) {
      if (isAbort(e)) return;
      graph.dataset.state = "error";
      summary.textContent = "";
      destroyGraph();
      clear(graph).append(h("div", { class: "error-box" }, e.message));
      clear(tables);
      return;
    }
    const { nodes, edges } = normalise(data, traced);
    model = { nodes, edges };
    summary.textContent = `${nodes.length} services · ${edges.length} calls`;
    renderTables(nodes, edges);
    await renderGraph(nodes, edges);
    if (selection) select(selection);
  }

  /**
   * A node for every service an edge names. `measured`: the server gave its figures; `traced`: it has
   * spans of its own (unknown when the service list failed to load: then assume it has).
   */
  function normalise(d, traced) {
    const isTraced = (s) => (traced ? traced.has(s) : true);
    const nodes = (d.nodes || []).map((n) => ({ ...n, measured: true, traced: isTraced(n.service) }));
    const known = new Set(nodes.map((n) => n.service));
    const edges = (d.edges || []).filter((e) => e.source && e.target);
    for (const e of edges) {
      for (const s of [e.source, e.target]) {
        if (!known.has(s)) {
          known.add(s);
          nodes.push({ service: s, measured: false, traced: isTraced(s) });
        }
      }
    }
    return { nodes, edges };
  }

  function nodeLabel(n) {
    if (!n.measured) return `${n.service}\n(no figures)`;
    return `${n.service}\n${fmtRate(n.rate_per_s)} · ${fmtPercent(n.error_rate)} err\np50 ${fmtMs(n.p50_ms)} · p99 ${fmtMs(n.p99_ms)}`;
  }

  async function renderGraph(nodes, edges) {
    graph.dataset.nodeCount = nodes.length;
    graph.dataset.edgeCount = edges.length;
    destroyGraph();
    clear(graph);
    if (!nodes.length) {
      graph.append(h("p", { class: "empty" }, "No services in this time range. Widen the range, or check that agents are sending spans."));
      graph.dataset.state = "ready";
      return;
    }
    let cytoscape;
    try {
      cytoscape = await loadCytoscape();
    } catch (e) {
      graph.append(h("div", { class: "error-box" }, `The graph cannot be drawn: ${e.message}. The tables below have the same figures.`));
      graph.dataset.state = "error";
      return;
    }
    const maxRate = Math.max(...edges.map((e) => e.rate_per_s || 0), 1e-9);
    const incoming = new Set(edges.map((e) => e.target));
    const elements = [
      ...nodes.map((n) => {
        const label = nodeLabel(n);
        const longest = Math.max(...label.split("\n").map((l) => l.length));
        return {
          group: "nodes",
          data: { id: n.service, label, w: Math.max(90, longest * 7 + 24), hgt: n.measured ? 62 : 42,
            border: n.measured ? errColor(n.error_rate || 0) : "#9aa5b1", accent: serviceColor(n.service) },
          classes: n.traced ? "" : "untraced",
        };
      }),
      ...edges.map((e) => ({
        group: "edges",
        data: { id: `${e.source}>${e.target}`, source: e.source, target: e.target,
          label: `${fmtRate(e.rate_per_s)} · ${fmtPercent(e.error_rate)}\np99 ${fmtMs(e.p99_ms)}`,
          width: 1.5 + 4.5 * Math.sqrt((e.rate_per_s || 0) / maxRate), color: errColor(e.error_rate || 0) },
      })),
    ];
    cy = cytoscape({
      container: graph,
      elements,
      minZoom: 0.2,
      maxZoom: 3,
      style: [
        { selector: "node", style: {
          shape: "round-rectangle", width: "data(w)", height: "data(hgt)", "background-color": "#ffffff",
          "border-width": 2, "border-color": "data(border)", label: "data(label)", "text-wrap": "wrap",
          "text-valign": "center", "text-halign": "center", "font-size": 12, color: "#1c2330", "line-height": 1.35,
          "font-family": "system-ui, -apple-system, Segoe UI, sans-serif" } },
        { selector: "node.untraced", style: { "border-style": "dashed", color: "#5f6b7a", "background-color": "#f4f6f8" } },
        { selector: "node:selected", style: { "border-width": 3, "border-color": "#2f6fde", "overlay-opacity": 0 } },
        { selector: "edge", style: {
          width: "data(width)", "line-color": "data(color)", "target-arrow-color": "data(color)",
          "target-arrow-shape": "triangle", "curve-style": "bezier", label: "data(label)", "font-size": 10,
          color: "#36414f", "text-background-color": "#ffffff", "text-background-opacity": 0.85,
          "text-background-padding": 2, "text-wrap": "wrap" } },
        { selector: "edge:selected", style: { "line-color": "#2f6fde", "target-arrow-color": "#2f6fde", "overlay-opacity": 0 } },
      ],
    });
    // Callers left of callees (the canvas is wider than tall, and labels of horizontal edges collide
    // less): breadth-first levels laid out top-down in a box of swapped sides, then turned on their side.
    // When every service is called by another (a cycle), the layout chooses the roots.
    const roots = cy.nodes().filter((n) => !incoming.has(n.id()));
    const w = graph.clientWidth || 800;
    const ht = graph.clientHeight || 560;
    cy.layout({ name: "breadthfirst", directed: true, spacingFactor: 1, padding: 30, animate: false,
      roots: roots.length ? roots : undefined, boundingBox: { x1: 0, y1: 0, w: ht, h: w },
      transform: (_node, p) => ({ x: p.y, y: p.x }) }).run();
    // A small graph fitted to the canvas would be blown up; keep it at a readable size instead.
    if (cy.zoom() > 1.25) {
      cy.zoom(1.25);
      cy.center();
    }
    cy.on("tap", "node", (e) => select({ node: e.target.id() }));
    cy.on("tap", "edge", (e) => select({ edge: e.target.id() }));
    cy.on("tap", (e) => {
      if (e.target === cy) select(null);
    });
    window.__deeptrace.cy = cy;
    graph.dataset.state = "ready";
  }

  function destroyGraph() {
    if (cy) {
      cy.destroy();
      cy = null;
      if (window.__deeptrace) window.__deeptrace.cy = null;
    }
  }

  function renderTables(nodes, edges) {
    const row = (cells, attrs) => h("tr", attrs, cells.map((c, i) => h("td", i ? { class: "num" } : null, c)));
    const red = (x) => [fmtNumber(x.requests), fmtRate(x.rate_per_s), x.errors ? h("span", { class: "badge error" }, fmtPercent(x.error_rate)) : fmtPercent(x.error_rate),
      fmtMs(x.p50_ms), fmtMs(x.p90_ms), fmtMs(x.p99_ms)];
    const headers = ["requests", "rate", "errors", "p50", "p90", "p99"].map((t) => h("th", { class: "num" }, t));
    const measured = nodes.filter((n) => n.measured).sort((a, b) => (b.requests || 0) - (a.requests || 0));
    clear(tables).append(
      h("h3", null, "Services"),
      h("table", { class: "grid", id: "map-nodes" }, h("thead", null, h("tr", null, h("th", null, "service"), headers)),
        h("tbody", null, measured.map((n) => row([
          h("span", null, h("a", { href: "#", onclick: (e) => { e.preventDefault(); select({ node: n.service }); } },
            h("span", { class: "svc-dot", style: `--svc:${serviceColor(n.service)}` }), n.service),
          n.traced ? null : h("span", { class: "muted small" }, "  not traced: measured by its callers")), ...red(n)])))),
      h("h3", null, "Calls"),
      h("table", { class: "grid", id: "map-edges" }, h("thead", null, h("tr", null, h("th", null, "caller → callee"), headers.map((x) => x.cloneNode(true)))),
        h("tbody", null, edges.slice().sort((a, b) => (b.requests || 0) - (a.requests || 0)).map((e) => row([
          h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); select({ edge: `${e.source}>${e.target}` }); } }, `${e.source} → ${e.target}`),
          ...red(e)])))),
    );
  }

  function select(sel) {
    selection = sel;
    syncHash();
    if (cy) {
      cy.elements().unselect();
      const id = sel && (sel.node || sel.edge);
      if (id) cy.getElementById(id).select();
    }
    showSelection();
  }

  async function showSelection() {
    if (sideAbort) sideAbort.abort();
    if (!selection || !data) {
      clear(side).append(h("p", { class: "muted" }, "Click a service or a call to see its rate, errors and latency over time."));
      return;
    }
    sideAbort = new AbortController();
    const [start_ns, end_ns] = rangeToNs(range);
    const searchLink = (s, id) => h("a", { class: "button-link", id,
      href: hashFor("traces", "", range === "1h" ? { service: s } : { service: s, range }) }, `Search traces of ${s} ›`);
    let title;
    let figures;
    let q;
    let note = null;
    const links = [];
    if (selection.node) {
      const s = selection.node;
      const node = model.nodes.find((n) => n.service === s);
      figures = (data.nodes || []).find((n) => n.service === s);
      title = h("h2", null, h("span", { class: "svc-dot", style: `--svc:${serviceColor(s)}` }), s);
      q = { service: s };
      if (!node || node.traced) links.push(searchLink(s, "map-search-link"));
      else {
        // Nothing traced answers for it, so its own series would be empty: its busiest caller's calls stand in.
        const callers = model.edges.filter((e) => e.target === s).sort((a, b) => (b.requests || 0) - (a.requests || 0));
        note = h("p", { class: "muted" }, "Not traced: no spans of its own. Its figures are its callers' CLIENT spans",
          callers.length ? `; the charts show the calls from ${callers[0].source}.` : ".");
        if (callers.length) q = { source: callers[0].source, target: s };
        else q = null;
        callers.forEach((e, i) => links.push(searchLink(e.source, i === 0 ? "map-search-link" : undefined)));
      }
    } else {
      const [a, b] = selection.edge.split(">");
      figures = (data.edges || []).find((e) => e.source === a && e.target === b);
      title = h("h2", null, `${a} → ${b}`);
      q = { source: a, target: b };
      links.push(searchLink(a, "map-search-link"));
    }
    const charts = h("div", { class: "charts", id: "map-charts" }, h("p", { class: "muted" }, "loading time series…"));
    clear(side).append(title, figures ? redTable(figures) : h("p", { class: "muted" }, "No figures for it in this range."),
      ...(note ? [note] : []), h("div", { class: "link-row" }, links), charts);  // append(null) would print "null"
    if (!figures || !q) {
      clear(charts);
      return;
    }
    try {
      const { points } = await get("timeseries", { ...q, start_ns, end_ns, step_s: stepFor(range) }, { signal: sideAbort.signal });
      const w = Math.max(260, side.clientWidth - 32);
      clear(charts).append(
        h("h3", null, "Requests/s"), lineChart(points, [{ key: "rate_per_s", color: "#2f6fde" }], { width: w, fmt: (v) => fmtRate(v), title: "Requests per second" }),
        h("h3", null, "Errors"), lineChart(points, [{ key: "error_rate", color: "#d1342f", value: ifAny("error_rate") }], { width: w, fmt: (v) => fmtPercent(v), title: "Error rate" }),
        h("h3", null, "Latency ", h("span", { class: "key p50" }, "p50"), " ", h("span", { class: "key p99" }, "p99")),
        lineChart(points, [{ key: "p50_ms", color: "#0f9d8a", value: ifAny("p50_ms") }, { key: "p99_ms", color: "#b7791f", value: ifAny("p99_ms") }],
          { width: w, fmt: (v) => fmtMs(v), title: "Latency p50 and p99" }));
      charts.dataset.points = points.length;
    } catch (e) {
      if (!isAbort(e)) clear(charts).append(h("div", { class: "error-box" }, e.message));
    }
  }

  function redTable(x) {
    const kv = (k, v) => h("tr", null, h("th", null, k), h("td", null, v));
    return h("table", { class: "kv" }, h("tbody", null,
      kv("Requests", fmtNumber(x.requests)), kv("Rate", fmtRate(x.rate_per_s)),
      kv("Errors", `${fmtNumber(x.errors)} (${fmtPercent(x.error_rate)})`),
      kv("Latency", `p50 ${fmtMs(x.p50_ms)} · p90 ${fmtMs(x.p90_ms)} · p99 ${fmtMs(x.p99_ms)}`)));
  }

  load();

  return {
    update(_arg, p) {
      const r = RANGES.some((x) => x.key === p.get("range")) ? p.get("range") : "1h";
      if (r !== range) {
        range = r;
        rangeSel.value = r;
        load();
      }
      return true;
    },
    destroy() {
      if (abort) abort.abort();
      if (sideAbort) sideAbort.abort();
      destroyGraph();
    },
  };
}
