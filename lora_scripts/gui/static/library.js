// The LoRA library page: the LoRA files of the runs and of WebUI's LoRA folder with what their metadata says
// (base model, rank, steps, datasets, tags), the full `inspect` report on demand, "Copy to WebUI" (never
// replacing a file; a preview and WebUI's card metadata come along) and "Use in Generate" (the file's
// <lora:NAME:1> tag added to the Generate page's prompt).
import { api, element, query, send, t } from "./api.js";

const $ = (id) => document.getElementById(id);
let listing = { webui: null, files: [] };

export function initLibrary() {
  $("library-refresh").addEventListener("click", refresh);
  $("library-filter").addEventListener("input", show);
  // The list is read again whenever the part is opened: a run may have saved a LoRA meanwhile.
  window.addEventListener("hashchange", () => { if (location.hash === "#library") refresh(); });
  refresh();
}

async function refresh() {
  try {
    listing = await api("/api/library");
  } catch {
    return; // api() showed the errors
  }
  $("library-webui").textContent = listing.webui
    ? t("library.webui", { path: listing.webui.path })
    : t("library.no_webui");
  show();
}

// The files whose name, tags or base model contain every word of the filter.
function show() {
  const words = $("library-filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = listing.files.filter((file) => {
    const text = [file.path, file.alias, file.tag, file.base_model, file.version, ...file.top_tags.map(([tag]) => tag)]
      .filter(Boolean).join(" ").toLowerCase();
    return words.every((word) => text.includes(word));
  });
  $("library-files").replaceChildren(...shown.map(card));
  $("library-empty").hidden = listing.files.length > 0;
  $("library-count").textContent = t("library.count", { shown: shown.length, total: listing.files.length });
}

function card(file) {
  const facts = [
    [t("library.version"), file.version],
    [t("library.base_model"), file.base_model],
    [t("library.rank"), file.rank != null ? `${file.rank} / ${file.alpha ?? "?"}` : null],
    [t("library.steps"), file.steps != null ? `${file.steps} / ${file.epoch ?? "?"}` : null],
    [t("library.resolution"), file.resolution],
    [t("library.size"), size(file.size)],
    [t("library.modified"), new Date(file.modified * 1000).toLocaleString()],
    [t("library.run"), file.run],
    [t("library.datasets"), file.datasets.map((d) => t("library.dataset", {
      folder: d.folder, images: d.images ?? "?", repeats: d.repeats ?? "?",
    })).join("; ")],
    [t("library.trigger"), file.trigger.join(", ")],
    [t("library.tags"), file.top_tags.map(([tag, n]) => `${tag} (${n})`).join(", ")],
    [t("library.in_webui_label"), file.in_webui],
  ].filter(([, value]) => value != null && value !== "");
  const item = element("article", { className: "library-item panel" }, [
    element("h3", {}, [
      element("span", { textContent: `<lora:${file.tag}>` }), " ",
      element("small", { className: "help", textContent: `${file.path} · ${t(`library.source.${file.source}`)}` }),
    ]),
    element("dl", { className: "library-facts" }, facts.map(([label, value]) => element("div", {}, [
      element("dt", { textContent: label }), element("dd", { textContent: String(value) }),
    ]))),
    actions(file),
    details(file),
  ]);
  item.dataset.path = file.path;
  return item;
}

function actions(file) {
  const name = element("input", {
    className: "library-copy-name", autocomplete: "off", placeholder: file.alias || file.stem,
    title: t("library.copy_name"), disabled: !listing.webui,
  });
  const result = element("span", { className: "library-copy-result", role: "status" });
  const copy = element("button", {
    type: "button", className: "button library-copy", textContent: t("library.copy"), disabled: !listing.webui,
    title: listing.webui ? "" : t("library.copy_disabled"),
  });
  copy.addEventListener("click", async () => {
    copy.disabled = true;
    try {
      const answer = await send("POST", "/api/library/copy", { path: file.path, name: name.value.trim() || null });
      result.textContent = answer.status === "already"
        ? t("library.already", answer)
        : t("library.copied", { ...answer, written: answer.written.join(", ") });
    } catch {
      result.textContent = ""; // api() showed the errors
    } finally {
      copy.disabled = false;
    }
  });
  const use = element("button", { type: "button", className: "button library-use", textContent: t("library.use") });
  use.addEventListener("click", () => useInGenerate(file.tag));
  const label = element("label", {}, [t("library.copy_name"), " ", name]);
  const parts = [use, label, copy, result];
  if (!listing.webui && file.source === "run") parts.push(element("span", { className: "help", textContent: t("library.copy_disabled") }));
  return element("div", { className: "row" }, parts);
}

// Adds the file's tag to the Generate page's prompt and goes there (its script listens for input events).
function useInGenerate(tag) {
  const prompt = $("generate-prompt");
  if (prompt) {
    prompt.value = `${prompt.value.trimEnd()} <lora:${tag}:1>`.trimStart();
    prompt.dispatchEvent(new Event("input", { bubbles: true }));
  }
  location.hash = "#generate";
}

// The full report, read (the whole file) the first time the expander opens.
function details(file) {
  const body = element("div", { className: "library-detail", textContent: t("library.loading") });
  const box = element("details", {}, [element("summary", { textContent: t("library.details") }), body]);
  let loaded = false;
  box.addEventListener("toggle", async () => {
    if (!box.open || loaded) return;
    loaded = true;
    try {
      body.replaceChildren(report(await api(`/api/library/detail?${query({ path: file.path })}`)));
    } catch {
      loaded = false;
      body.textContent = "";
    }
  });
  return box;
}

function report(ins) {
  const rows = [
    [t("library.layout"), `${ins.layout} · ${ins.version} (${ins.family}) · ${ins.network_type}`],
    ...ins.components.map((c) => [t("library.components"), t("library.component", {
      component: c.component, modules: c.modules, ranks: Object.keys(c.ranks).join(", "), alphas: Object.keys(c.alphas).join(", "),
    })]),
    ...Object.entries(ins.training).map(([label, value]) => [`${t("library.training")}: ${label}`, value]),
    ...Object.entries(ins.hashes).map(([label, value]) => [label, value]),
    ...Object.entries(ins.loads_in).map(([tool, value]) => [`${t("library.loads_in")} ${tool}`, value]),
  ];
  return element("table", { className: "library-report" }, rows.map(([label, value]) => element("tr", {}, [
    element("th", { textContent: label }), element("td", { textContent: String(value) }),
  ])));
}

function size(bytes) {
  return bytes >= 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(1)} MiB` : `${Math.ceil(bytes / 1024)} KiB`;
}
