// The URL hash is the whole state of the page, so every view can be linked and reloaded:
//   #/traces?service=..   #/trace/ID?span=..   #/map?range=..   #/agents

/** The parsed hash: view name, the path part after it, and its query parameters. */
export function parseHash(hash = location.hash) {
  const raw = hash.replace(/^#\/?/, "");
  const qAt = raw.indexOf("?");
  const path = qAt < 0 ? raw : raw.slice(0, qAt);
  const params = new URLSearchParams(qAt < 0 ? "" : raw.slice(qAt + 1));
  const [name, ...rest] = path.split("/");
  return { name: name || "traces", arg: rest.map(decodeURIComponent).join("/"), params };
}

export function hashFor(name, arg, params) {
  const s = `#/${name}${arg ? "/" + encodeURIComponent(arg) : ""}`;
  const q = params instanceof URLSearchParams ? params.toString() : new URLSearchParams(params || {}).toString();
  return q ? `${s}?${q}` : s;
}

/**
 * Record a state change that the view has already drawn: replaceState fires no hashchange, so the
 * view is not rebuilt, while reload and copy-paste of the URL still land on the same state.
 */
export function replaceHash(hash) {
  if (location.hash !== hash) history.replaceState(null, "", hash);
}
