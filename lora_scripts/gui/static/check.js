// The Check page: POST /api/check on the form's config or a config file, and the facts of
// `lora-scripts check --json` shown: plan, the bucket histogram (an inline SVG), memory rows, files written.
import { element, send, t } from "./api.js";
import { collectConfig } from "./config.js";

const $ = (id) => document.getElementById(id);
// The SVG namespace, as the HTML parser assigns it (no address in the scripts: tests check none loads).
const SVG = Object.assign(document.createElement("div"), { innerHTML: "<svg></svg>" }).firstChild.namespaceURI;

export function initCheck() {
  $("check-form").addEventListener("click", () => run({ config: collectConfig() }));
  $("check-file").addEventListener("click", () => run({ path: $("check-path").value.trim() }));
}

async function run(source) {
  $("check-status").textContent = t("check.running");
  try {
    showFacts(await send("POST", "/api/check", source));
    $("check-status").textContent = "";
  } catch {
    $("check-status").textContent = "";
  }
}

function showFacts(facts) {
  $("check-result").hidden = false;
  list($("check-errors"), facts.errors);
  list($("check-warnings"), facts.warnings);
  $("check-status").textContent = facts.ok ? t("check.ok") : t("check.blocked", { count: facts.errors.length });
  const plan = facts.plan;
  rows($("check-plan"), [
    [t("check.images"), facts.dataset ? `${facts.dataset.images_found} / ${facts.dataset.images_captioned ?? "–"}` : "–"],
    [t("check.samples"), plan?.samples_per_epoch],
    [t("check.batch"), plan && `${plan.batch_size} × ${plan.gradient_accumulation_steps} × ${plan.num_processes} = ${plan.effective_batch_size}`],
    [t("check.steps_per_epoch"), plan?.steps_per_epoch],
    [t("check.epochs"), plan?.epochs],
    [t("check.total_steps"), plan && `${plan.total_steps} (${plan.limited_by})`],
    [t("check.parameters"), facts.network?.trainable_parameters.total.toLocaleString()],
    [t("check.network_type"), facts.network?.network_type],
    [t("check.file_size"), facts.network?.file && fileSize(facts.network.file.bytes)],
  ]);
  $("check-buckets").replaceChildren(plan ? histogram(plan.buckets) : "–");
  rows($("check-memory"), Object.entries(facts.speed || {}).filter(([key]) => !key.endsWith("_why")).map(([key, value]) => {
    const why = facts.speed[`${key}_why`];
    return [key, why ? `${value} (${why})` : String(value)];
  }));
  const out = facts.outputs;
  rows($("check-outputs"), out ? [
    ["output_dir", out.output_dir],
    [t("check.step_files"), out.step_files.join(", ") || "–"],
    [t("check.final_files"), out.final_files.join(", ")],
    [t("check.config_file"), out.config_file],
    ["logging_dir", out.logging_dir],
    [t("check.existing"), out.existing_files.join(", ") || "–"],
  ] : []);
}

// The LoRA file's size as check --json gives it (bytes, training's metadata aside), in KiB or MiB.
function fileSize(bytes) {
  return bytes < 2 ** 20 ? `${(bytes / 2 ** 10).toFixed(1)} KiB` : `${(bytes / 2 ** 20).toFixed(2)} MiB`;
}

function list(node, messages) {
  node.replaceChildren(...messages.map((text) => element("li", { textContent: text })));
  node.hidden = messages.length === 0;
}

function rows(table, pairs) {
  table.tBodies[0].replaceChildren(
    ...pairs.map(([label, value]) => element("tr", {}, [element("th", { textContent: label }), element("td", { textContent: value ?? "–" })])),
  );
}

// One bar per bucket (width×height), its height the samples in it per epoch.
function histogram(buckets) {
  const barWidth = 34, gap = 8, chartHeight = 120, labelHeight = 34;
  const most = Math.max(1, ...buckets.map((b) => b.samples));
  const width = Math.max(1, buckets.length) * (barWidth + gap) + gap;
  const svg = svgNode("svg", { width, height: chartHeight + labelHeight + 16, role: "img", "aria-label": t("check.buckets") });
  buckets.forEach((bucket, i) => {
    const x = gap + i * (barWidth + gap);
    const height = Math.max(1, Math.round((bucket.samples / most) * chartHeight));
    const y = 16 + chartHeight - height;
    const bar = svgNode("rect", { x, y, width: barWidth, height, fill: "var(--accent, #3b6fd8)" });
    bar.append(svgNode("title", {}, `${bucket.width}×${bucket.height}: ${bucket.samples}`));
    svg.append(
      bar,
      svgNode("text", { x: x + barWidth / 2, y: y - 3, "text-anchor": "middle", "font-size": 11 }, String(bucket.samples)),
      svgNode("text", { x: x + barWidth / 2, y: 16 + chartHeight + 14, "text-anchor": "middle", "font-size": 10 }, String(bucket.width)),
      svgNode("text", { x: x + barWidth / 2, y: 16 + chartHeight + 27, "text-anchor": "middle", "font-size": 10 }, `×${bucket.height}`),
    );
  });
  return svg;
}

function svgNode(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}
