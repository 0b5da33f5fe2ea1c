// The console's shared parts: its state, building elements, calling the API, describing errors, formatting.
// Data are written with textContent only, never as HTML.

const ROOT = "../"; // the server's root, seen from /ui/
export const KEY_ITEM = "loraplex.key";
export const VIEWS = ["adapters", "playground", "server"];

export const state = {
  key: null, // null: no key sent (an open server)
  me: null, // the last /v1/console/server answer
  view: "adapters",
  timer: null,
  busy: false,
  rows: new Map(), // adapter name -> its table row
  running: null, // the playground's AbortController while it runs
};

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}


export class ApiError extends Error {
  constructor(status, message, param = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.retryAfter = retryAfter;
  }
}

function headers(json) {
  const result = {};
  if (state.key) result.Authorization = `Bearer ${state.key}`;
  if (json) result["Content-Type"] = "application/json";
  return result;
}

async function errorOf(response) {
  let message = response.statusText || "the request failed";
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param || null;
    }
  } catch (_) {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, message, param, response.headers.get("Retry-After"));
}

export async function request(path, { method = "GET", body, signal } = {}) {
  let response;
  try {
    response = await fetch(ROOT + path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Cannot reach the server. Is it running?");
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function api(path, options) {
  return (await request(path, options)).json();
}

export function describe(error) {
  if (!(error instanceof ApiError)) return `Unexpected error: ${error.message}`;
  const retry = error.retryAfter ? ` Retry in ${error.retryAfter} s.` : "";
  switch (error.status) {
    case 0:
      return error.message;
    case 401:
      return `Not signed in (401): ${error.message} Enter a valid API key.`;
    case 403:
      return `Not allowed for this key (403): ${error.message}`;
    case 429:
      return `Rate limited (429): ${error.message}${retry}`;
    case 503:
      return `The server is busy or not ready (503): ${error.message}${retry}`;
    default:
      return `Error ${error.status}: ${error.message}${error.param ? ` (field: ${error.param})` : ""}`;
  }
}


export const dash = "—";
export const count = (n) => (n === null || n === undefined ? dash : Number(n).toLocaleString("en"));

export function bytes(n) {
  if (n === null || n === undefined) return dash;
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = n;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value >= 100 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

export function seconds(s) {
  if (s === null || s === undefined) return dash;
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

export function percent(rate) {
  return rate === null || rate === undefined ? dash : `${(rate * 100).toFixed(rate && rate < 0.1 ? 1 : 0)} %`;
}

export function minutes(windowS) {
  return windowS % 60 === 0 ? `${windowS / 60} min` : `${windowS} s`;
}


export function banner(message) {
  const node = $("banner");
  node.textContent = message || "";
  node.hidden = !message;
}

export function say(id, message) {
  $(id).textContent = message || "";
}

