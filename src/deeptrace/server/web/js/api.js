// The server's query API (docs/server.md), with errors turned into messages a person can act on.

const TOKEN_KEY = "deeptrace.token";

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Private windows may refuse storage; the token then lasts until reload, which is acceptable.
  }
}

let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/** Query string from an object; arrays repeat the key (the API's `attr` is repeatable). */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => q.append(k, x));
    else q.append(k, v);
  }
  const s = q.toString();
  return s ? "?" + s : "";
}

/**
 * GET api/v1/<path> as JSON. Relative to the page, so a proxy may mount the server under a path.
 * `signal` lets a view drop answers that arrive after the user moved on.
 */
export async function get(path, params, { signal } = {}) {
  const url = `api/v1/${path}${query(params)}`;
  const headers = { Accept: "application/json" };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  let resp;
  try {
    resp = await fetch(url, { headers, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`Cannot reach the DeepTrace server (${url}): ${e.message}`, 0);
  }
  if (!resp.ok) {
    let detail = "";
    try {
      const body = await resp.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
    } catch {
      detail = "";
    }
    if (resp.status === 401) onUnauthorized();
    const what = `${resp.status} ${resp.statusText}`.trim();
    throw new ApiError(`GET ${url} failed: ${what}${detail ? " — " + detail : ""}`, resp.status);
  }
  try {
    return await resp.json();
  } catch (e) {
    throw new ApiError(`GET ${url}: the answer is not JSON (${e.message})`, resp.status);
  }
}

export const isAbort = (e) => e && e.name === "AbortError";
