// Formatting and small DOM helpers shared by the views.

const NS_PER_MS = 1e6;

/** An element with attributes and children; strings become text nodes, so nothing is parsed as HTML. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  if (attrs) for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, v);
  for (const c of children.flat()) if (c !== undefined && c !== null) el.append(c instanceof Node ? c : String(c));
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

/** Durations arrive in ns; show three significant digits in the unit that suits them. */
export function fmtDuration(ns) {
  if (ns === null || ns === undefined || Number.isNaN(ns)) return "–";
  const abs = Math.abs(ns);
  if (abs < 1e3) return `${Math.round(ns)} ns`;
  if (abs < 1e6) return `${sig(ns / 1e3)} µs`;
  if (abs < 1e9) return `${sig(ns / 1e6)} ms`;
  if (abs < 60e9) return `${sig(ns / 1e9)} s`;
  const s = Math.round(ns / 1e9);
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  return fmtDuration(ms * NS_PER_MS);
}

/** Three significant digits without trailing zeros: 8 ms, 12.5 ms, 1.25 s, 196 ms. */
function sig(x) {
  const a = Math.abs(x);
  return String(Number(a >= 100 ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : x.toFixed(2)));
}

export function fmtNumber(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US");
}

export function fmtRate(perS) {
  if (perS === null || perS === undefined || Number.isNaN(perS)) return "–";
  if (perS === 0) return "0/s";
  if (perS >= 0.1) return `${sig(perS)}/s`;
  // Slow services read better per minute or per hour than as 0.00/s.
  return perS * 60 >= 0.1 ? `${sig(perS * 60)}/min` : `${sig(perS * 3600)}/h`;
}

export function fmtPercent(fraction) {
  if (fraction === null || fraction === undefined || Number.isNaN(fraction)) return "–";
  const p = fraction * 100;
  if (p === 0) return "0%";
  return p < 0.1 ? "<0.1%" : `${p < 10 ? p.toFixed(1) : p.toFixed(0)}%`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${sig(v)} ${units[i]}`;
}

const pad = (n, w = 2) => String(n).padStart(w, "0");

/** Local wall-clock time of a ns timestamp; the date only when it is not today, to keep tables narrow. */
export function fmtTime(ns, { millis = true, alwaysDate = false } = {}) {
  if (ns === null || ns === undefined) return "–";
  const d = new Date(Number(ns) / NS_PER_MS);
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}${millis ? "." + pad(d.getMilliseconds(), 3) : ""}`;
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  return sameDay && !alwaysDate ? time : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

export function fmtAgo(ns, nowMs = Date.now()) {
  if (!ns) return "never";
  const s = (nowMs - Number(ns) / NS_PER_MS) / 1000;
  if (s < 0) return "just now";
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** A datetime-local input's value (local time) for a ms timestamp, and back. */
export function toLocalInput(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function fromLocalInput(value) {
  const ms = new Date(value).getTime();
  return Number.isFinite(ms) ? ms : null;
}

export const RANGES = [
  { key: "15m", label: "Last 15 min", seconds: 15 * 60 },
  { key: "1h", label: "Last hour", seconds: 3600 },
  { key: "6h", label: "Last 6 hours", seconds: 6 * 3600 },
  { key: "24h", label: "Last 24 hours", seconds: 24 * 3600 },
];

/** [start_ns, end_ns] for a range key, evaluated now: relative ranges must move with the clock on reload. */
export function rangeToNs(key, from, to) {
  if (key === "custom") {
    const a = fromLocalInput(from);
    const b = fromLocalInput(to);
    if (a !== null && b !== null) return [msToNs(a), msToNs(b)];
  }
  const r = RANGES.find((x) => x.key === key) || RANGES[1];
  const now = Date.now();
  return [msToNs(now - r.seconds * 1000), msToNs(now)];
}

/** ns as a decimal string: ns timestamps exceed 2^53, so Number would round them by up to a few hundred ns. */
export function msToNs(ms) {
  return (BigInt(Math.round(ms)) * 1000000n).toString();
}

/** A colour per service, stable across pages and reloads. */
const PALETTE = ["#2f6fde", "#0f9d8a", "#b7791f", "#8a4fd8", "#d0457a", "#3b8f3b", "#c2561b", "#2b8cbe",
  "#7a6f2b", "#5b5fc7", "#a33ea1", "#1f7a6b"];

export function serviceColor(name) {
  let x = 2166136261;
  for (let i = 0; i < name.length; i++) x = Math.imul(x ^ name.charCodeAt(i), 16777619);
  return PALETTE[(x >>> 0) % PALETTE.length];
}

/**
 * A payload head (base64) as readable text: printable ASCII and valid UTF-8 are kept, line breaks
 * are shown escaped and then broken, every other byte becomes \xNN, so binary protocols stay legible.
 */
export function headToText(b64) {
  if (!b64) return "";
  let bin;
  try {
    bin = atob(b64);
  } catch {
    return `(not valid base64: ${b64.slice(0, 80)})`;
  }
  const out = [];
  const n = bin.length;
  for (let i = 0; i < n; i++) {
    const b = bin.charCodeAt(i);
    if (b === 0x0a) out.push("\\n\n");
    else if (b === 0x0d) out.push("\\r");
    else if (b === 0x09) out.push("\\t");
    else if (b === 0x5c) out.push("\\\\");
    else if (b >= 0x20 && b < 0x7f) out.push(bin[i]);
    else if (b >= 0xc2 && b <= 0xf4) {
      const len = b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4;
      let ok = i + len <= n;
      for (let k = 1; ok && k < len; k++) ok = (bin.charCodeAt(i + k) & 0xc0) === 0x80;
      if (ok) {
        const bytes = new Uint8Array(len);
        for (let k = 0; k < len; k++) bytes[k] = bin.charCodeAt(i + k);
        const ch = new TextDecoder("utf-8", { fatal: false }).decode(bytes);
        // Control and format characters outside ASCII would be invisible: escape those too.
        if (!/[\p{Cc}\p{Cf}\uFFFD]/u.test(ch)) {
          out.push(ch);
          i += len - 1;
          continue;
        }
      }
      out.push(hexEscape(b));
    } else out.push(hexEscape(b));
  }
  return out.join("");
}

function hexEscape(b) {
  return "\\x" + b.toString(16).padStart(2, "0");
}

/** Decoded byte length of a base64 string, without decoding it. */
export function b64Length(b64) {
  if (!b64) return 0;
  const padding = b64.endsWith("==") ? 2 : b64.endsWith("=") ? 1 : 0;
  return (b64.length / 4) * 3 - padding;
}

export function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

/** "Nice" tick values for an axis from lo to hi. */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
  return ticks;
}
