// The Config page: a form built at run time from GET /api/config/schema (a key added to the schema appears
// here with no change), the shipped configs as presets, YAML import and export, and the loader's own
// messages shown at their fields (POST /api/config/validate).
import { api, element, query, send, t } from "./api.js";

const $ = (id) => document.getElementById(id);
const inputs = new Map(); // key -> {facts, input, errors}
let extras = {}; // keys of an imported config the schema does not have: kept so the loader names them
let validateTimer = null;

export async function initConfig() {
  const schema = await api("/api/config/schema");
  $("config-form").replaceChildren(...schema.groups.map(groupPanel));
  const { presets } = await api("/api/config/presets");
  $("config-preset").append(...presets.map((name) => element("option", { value: name, textContent: name })));
  $("config-preset-load").addEventListener("click", loadPreset);
  $("config-import").addEventListener("click", () => importFrom({ path: $("config-import-path").value.trim() }));
  $("config-import-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) await importFrom({ yaml: await file.text() });
    event.target.value = "";
  });
  $("config-validate").addEventListener("click", validate);
  $("config-check-paths").addEventListener("change", validate);
  $("config-export").addEventListener("click", exportToRoot);
  $("config-download").addEventListener("click", download);
  $("config-form").addEventListener("input", () => {
    clearTimeout(validateTimer);
    validateTimer = setTimeout(validate, 600);
  });
}

function groupPanel(group) {
  const panel = element("details", { className: "panel config-group", open: group.name === "data" || group.name === "model" }, [
    element("summary", { textContent: group.title }),
  ]);
  const body = element("div", { className: "config-keys" }, group.keys.map(keyRow));
  panel.append(body);
  return panel;
}

function keyRow(facts) {
  const input = inputFor(facts);
  input.id = `config-key-${facts.name}`;
  input.name = facts.name;
  const errors = element("ul", { className: "problems field-errors", id: `config-error-${facts.name}`, hidden: true });
  const label = element("label", { htmlFor: input.id, className: "config-key" }, [
    element("code", { textContent: facts.name }),
    facts.required ? element("strong", { textContent: ` ${t("config.required")}` }) : "",
  ]);
  const help = element("p", {
    className: "help",
    textContent: `${facts.help} ${t("config.facts", { type: facts.type, default: facts.default_text.replaceAll("`", "").replaceAll("**", ""), allowed: facts.allowed.replaceAll("`", "") })}`,
  });
  inputs.set(facts.name, { facts, input, errors });
  return element("div", { className: "config-row" }, [label, input, help, errors]);
}

function inputFor(facts) {
  if (facts.kind === "bool" || facts.kind === "choice") {
    const values = facts.kind === "bool" ? [true, false] : facts.choices;
    const shown = facts.default === null ? t("config.unset") : t("config.default", { value: String(facts.default) });
    return element("select", {}, [
      element("option", { value: "", textContent: shown }),
      ...values.map((value) => element("option", { value: JSON.stringify(value), textContent: String(value) })),
    ]);
  }
  const complex = ["list", "mapping", "other"].includes(facts.kind);
  const placeholder = facts.default === null ? "" : complex ? JSON.stringify(facts.default) : String(facts.default);
  return element(complex ? "textarea" : "input", { placeholder, rows: complex ? 2 : undefined, spellcheck: false });
}

// The config the form holds: only the keys given a value (the rest keep their defaults, as in a YAML file).
export function collectConfig() {
  const config = { ...extras };
  for (const [name, { facts, input }] of inputs) {
    const text = input.value.trim();
    if (text === "") continue;
    config[name] = readValue(facts, text);
  }
  return config;
}

function readValue(facts, text) {
  if (facts.kind === "bool" || facts.kind === "choice") return JSON.parse(text);
  if (facts.kind === "int" || facts.kind === "float") {
    const number = Number(text);
    return Number.isFinite(number) ? number : text; // the loader says what is wrong with it
  }
  if (["list", "mapping", "other"].includes(facts.kind)) {
    try {
      return JSON.parse(text);
    } catch {
      return text; // a preset name, a path: a string
    }
  }
  return text;
}

function fillForm(config) {
  extras = {};
  for (const { input } of inputs.values()) input.value = "";
  for (const [name, value] of Object.entries(config)) {
    const entry = inputs.get(name);
    if (!entry) {
      extras[name] = value;
      continue;
    }
    const { facts, input } = entry;
    if (value === null) continue;
    input.closest("details").open = true; // the groups the config sets are the ones to see
    if (facts.kind === "bool" || facts.kind === "choice") input.value = JSON.stringify(value);
    else if (typeof value === "object" || (["list", "mapping", "other"].includes(facts.kind) && typeof value !== "string")) input.value = JSON.stringify(value);
    else input.value = String(value);
  }
}

async function loadPreset() {
  const name = $("config-preset").value;
  if (!name) return;
  const answer = await api(`/api/config/preset?${query({ name })}`);
  fillForm(answer.config);
  await validate();
}

async function importFrom(source) {
  const answer = await send("POST", "/api/config/import", source);
  fillForm(answer.config);
  showFieldErrors(answer.errors);
}

export async function validate() {
  const answer = await send("POST", "/api/config/validate", { config: collectConfig(), check_paths: $("config-check-paths").checked });
  showFieldErrors(answer.errors);
  $("config-status").textContent = answer.ok ? t("config.valid") : t("config.invalid", { count: answer.errors.length });
  return answer.ok;
}

// Each of the loader's sentences beside its key; those about no key of the form above it.
function showFieldErrors(errors) {
  const byKey = new Map();
  const general = [];
  for (const error of errors) {
    if (inputs.has(error.key)) byKey.set(error.key, [...(byKey.get(error.key) || []), error.message]);
    else general.push(error.message);
  }
  for (const [name, { errors: list, input }] of inputs) {
    const messages = byKey.get(name) || [];
    list.replaceChildren(...messages.map((text) => element("li", { textContent: text })));
    list.hidden = messages.length === 0;
    input.setAttribute("aria-invalid", messages.length ? "true" : "false");
    if (messages.length) input.closest("details").open = true;
  }
  $("config-errors").replaceChildren(...general.map((text) => element("li", { textContent: text })));
  $("config-errors").hidden = general.length === 0;
}

async function exportToRoot() {
  const path = $("config-export-path").value.trim();
  if (!path) return $("config-export-path").focus();
  const answer = await send("POST", "/api/config/export", { config: collectConfig(), path, overwrite: $("config-export-overwrite").checked });
  $("config-status").textContent = t("config.saved", { path: answer.path });
}

async function download() {
  const answer = await send("POST", "/api/config/export", { config: collectConfig() });
  const link = element("a", { href: URL.createObjectURL(new Blob([answer.yaml], { type: "application/yaml" })), download: "config.yaml" });
  link.click();
  URL.revokeObjectURL(link.href);
}
