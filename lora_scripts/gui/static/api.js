// Talking to the server and the few helpers every part of the page uses. Every request goes to the same
// server; state-changing ones carry the CSRF token from the page (security.py).
const csrf = document.querySelector('meta[name="csrf-token"]').content;
let errorTimer = null;

// The answer of a request: {ok, status, body}; never shows anything (uploads collect their errors).
export async function request(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.method && options.method !== "GET") headers["X-CSRF-Token"] = csrf;
  let response;
  try {
    response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  } catch {
    return { ok: false, status: 0, body: { errors: [t("error.network")] } };
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : await response.text();
  return { ok: response.ok, status: response.status, body };
}

// The body of a successful request; otherwise its errors are shown and an Error is thrown.
export async function api(path, options = {}) {
  const { ok, status, body } = await request(path, options);
  if (!ok) {
    showErrors(errorsOf(body));
    throw new Error(`HTTP ${status}`);
  }
  return body;
}

export function errorsOf(body) {
  return body?.errors || [String(body)];
}

// JSON in, JSON out: `send("PUT", "/api/x", {...})`.
export function send(method, path, data) {
  return api(path, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });
}

export function showErrors(messages) {
  const box = document.getElementById("errors");
  box.replaceChildren(...messages.map((text) => element("p", { textContent: text })));
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => box.replaceChildren(), 4000 + 2000 * messages.length);
}

// The page's string `key` (locales/*.json) with {name} placeholders filled from `values`.
export function t(key, values = {}) {
  const text = window.strings?.[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in values ? String(values[name]) : whole));
}

export function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

export function query(params) {
  return new URLSearchParams(params).toString();
}
