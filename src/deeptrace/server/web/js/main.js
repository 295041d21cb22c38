// Router: mounts the view the hash names, or lets the current view update itself in place.

import { getToken, setToken, setUnauthorizedHandler } from "./api.js";
import * as agents from "./agents.js";
import * as map from "./map.js";
import * as search from "./search.js";
import * as trace from "./trace.js";
import { hashFor, parseHash } from "./nav.js";
import { h } from "./util.js";

const VIEWS = { traces: search, trace, map, agents };

// Tests and people debugging in the console read the live state here (e.g. the map's cytoscape instance).
window.__deeptrace = window.__deeptrace || {};
window.__deeptrace.started = true;

let current = null; // { name, instance }
const root = document.getElementById("view");

function route() {
  hideBanner();
  const { name, arg, params } = parseHash();
  const view = VIEWS[name];
  if (!view) {
    location.replace(hashFor("traces"));
    return;
  }
  for (const a of document.querySelectorAll("[data-nav]")) {
    const active = a.dataset.nav === name || (name === "trace" && a.dataset.nav === "traces");
    a.classList.toggle("active", active);
  }
  document.body.dataset.view = name;
  if (current && current.name === name && current.instance.update && current.instance.update(arg, params) !== false) {
    return;
  }
  if (current && current.instance.destroy) current.instance.destroy();
  root.replaceChildren();
  root.className = `view-${name}`;
  try {
    current = { name, instance: view.mount(root, arg, params) || {} };
  } catch (e) {
    current = null;
    showBanner(`This page failed to render: ${e.message}`);
    console.error(e);
  }
}

const banner = document.getElementById("banner");

function showBanner(message) {
  banner.replaceChildren(h("span", null, message), h("button", { type: "button", class: "link-button", onclick: hideBanner }, "dismiss"));
  banner.hidden = false;
}

function hideBanner() {
  banner.hidden = true;
}

// Anything a view did not catch still surfaces as a message rather than a silently broken page.
window.addEventListener("error", (e) => {
  // Chrome reports a resize observer that needed two passes as an error; nothing is wrong then.
  if (String(e.message).startsWith("ResizeObserver loop")) return;
  showBanner(`Unexpected error: ${e.message}`);
});
window.addEventListener("unhandledrejection", (e) => {
  if (e.reason && e.reason.name === "AbortError") return;
  showBanner(`Unexpected error: ${e.reason && e.reason.message ? e.reason.message : e.reason}`);
});

const tokenButton = document.getElementById("token-button");

function askToken() {
  const t = prompt("The server asks for an API token (Bearer). Token:", getToken());
  if (t !== null) {
    setToken(t.trim());
    if (current && current.instance.destroy) current.instance.destroy();
    current = null;
    route();
  }
}

setUnauthorizedHandler(() => {
  tokenButton.hidden = false;
});
tokenButton.addEventListener("click", askToken);
if (getToken()) tokenButton.hidden = false;

window.addEventListener("hashchange", route);
if (!location.hash) history.replaceState(null, "", hashFor("traces"));
route();
