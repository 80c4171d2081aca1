// The page's script: small and dependency-free. Every request goes to the same server; state-changing
// requests carry the CSRF token from the page (security.py).
const csrf = document.querySelector('meta[name="csrf-token"]').content;

export async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.method && options.method !== "GET") headers["X-CSRF-Token"] = csrf;
  let response;
  try {
    response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  } catch {
    showErrors([window.strings?.["error.network"] || "The server did not answer."]);
    throw new Error("network");
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    showErrors(body.errors || [String(body)]);
    throw new Error(`HTTP ${response.status}`);
  }
  return body;
}

export function showErrors(messages) {
  const box = document.getElementById("errors");
  box.replaceChildren(...messages.map((text) => Object.assign(document.createElement("p"), { textContent: text })));
  setTimeout(() => box.replaceChildren(), 8000);
}

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

async function showFolder(path) {
  const listing = await api(`/api/files?path=${encodeURIComponent(path)}`);
  const box = document.getElementById("folder");
  const up = listing.path.includes("/") ? listing.path.slice(0, listing.path.lastIndexOf("/")) : null;
  const items = [];
  if (up) items.push(element("li", {}, [element("button", { textContent: `↑ ${window.strings["files.parent"]}`, onclick: () => showFolder(up) })]));
  for (const name of listing.folders) {
    items.push(element("li", {}, [element("button", { textContent: `📁 ${name}`, onclick: () => showFolder(`${listing.path}/${name}`) })]));
  }
  for (const name of listing.images) items.push(element("li", { textContent: name }));
  if (!items.length) items.push(element("li", { textContent: window.strings["files.empty"] }));
  box.replaceChildren(element("h3", { textContent: listing.path }), element("ul", { className: "files" }, items));
}

async function start() {
  const language = document.body.dataset.language;
  window.strings = await api(`/api/i18n/${language}`);
  document.getElementById("language").addEventListener("change", (event) => {
    document.cookie = `lora_scripts_lang=${event.target.value}; path=/; samesite=strict`;
    location.reload();
  });
  const roots = await api("/api/roots");
  document.getElementById("roots").replaceChildren(
    ...roots.map((root) => element("li", {}, [element("button", { textContent: `${root.name} (${root.path})`, onclick: () => showFolder(root.name) })])),
  );
}

start();
