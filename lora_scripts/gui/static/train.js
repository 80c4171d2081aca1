// The Train page: start a config as its own `lora-scripts train` process (queued behind the running one),
// the runs the roots hold (rebuilt from their output folders, so a reload loses nothing), and the chosen
// run watched every 2 s: progress, loss and learning-rate curves (inline SVG), samples, the log tail,
// Stop (as Ctrl-C: the step finishes, the state is saved) and Resume.
import { api, element, query, send, t } from "./api.js";

const $ = (id) => document.getElementById(id);
// The SVG namespace, as the HTML parser assigns it (no address in the scripts: tests check none loads).
const SVG = Object.assign(document.createElement("div"), { innerHTML: "<svg></svg>" }).firstChild.namespaceURI;
const POLL_MS = 2000;
let chosen = null; // ROOT/output_dir of the run shown
let timer = null;

export function initTrain() {
  $("train-start").addEventListener("click", () => act("/api/runs", { config: $("train-config").value.trim() }));
  $("train-stop").addEventListener("click", () => act("/api/runs/stop", { path: chosen }));
  $("train-resume").addEventListener("click", () => act("/api/runs/resume", { path: chosen }));
  refresh();
}

async function act(path, body) {
  try {
    const answer = await send("POST", path, body);
    if (answer.path && path !== "/api/runs/stop") chosen = answer.path;
  } catch {
    return; // api() showed the errors
  }
  refresh();
}

async function refresh() {
  clearTimeout(timer);
  try {
    const listing = await api("/api/runs");
    showConfigs(listing.configs);
    showRuns([...listing.queue, ...listing.runs]);
    if (chosen) showDetail(await api(`/api/runs/detail?${query({ path: chosen })}`));
  } catch {
    // the server may be restarting: try again at the next tick
  }
  timer = setTimeout(refresh, POLL_MS);
}

function showConfigs(configs) {
  $("train-configs").replaceChildren(...configs.map((name) => element("option", { value: name })));
}

function showRuns(runs) {
  if (!chosen && runs.length) chosen = runs.find((run) => run.status === "running")?.path ?? runs[0].path;
  $("train-runs").tBodies[0].replaceChildren(...runs.map((run) => {
    const row = element("tr", { className: run.path === chosen ? "chosen" : "" }, [
      element("td", { textContent: run.path ?? "–" }),
      element("td", { textContent: t(`train.status.${run.status}`) }),
      element("td", { textContent: run.total ? `${run.step ?? 0} / ${run.total}` : "–" }),
    ]);
    row.addEventListener("click", () => { chosen = run.path; refresh(); });
    return row;
  }));
  $("train-empty").hidden = runs.length > 0;
}

function showDetail(run) {
  $("train-detail").hidden = false;
  $("train-name").textContent = `${run.path} · ${t(`train.status.${run.status}`)}${run.message ? ` · ${run.message}` : ""}`;
  $("train-progress").max = run.total || 1;
  $("train-progress").value = run.step || 0;
  $("train-numbers").textContent = t("train.numbers", {
    step: run.step ?? 0, total: run.total ?? "?",
    rate: run.rate ? run.rate.toFixed(2) : "–", eta: run.eta != null ? duration(run.eta) : "–",
  });
  $("train-stop").disabled = run.status !== "running";
  $("train-resume").disabled = !run.resumable;
  $("train-loss").replaceChildren(chart(run.steps, run.loss, t("train.loss")));
  const lrGroups = Object.entries(run.lr);
  $("train-lr").replaceChildren(...lrGroups.map(([group, values]) => chart(run.steps, values, `lr ${group}`)));
  $("train-samples").replaceChildren(...run.samples.map((sample) => element("figure", {}, [
    element("img", { src: `/api/runs/sample?${query({ path: sample.path })}`, alt: sample.path, loading: "lazy" }),
    element("figcaption", { textContent: t("train.sample", { step: sample.step, prompt: sample.prompt }) }),
  ])));
  const log = $("train-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = run.log.join("\n");
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function duration(seconds) {
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m` : `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
}

// One curve as a polyline: x the step, y the value, with the range's ends as labels.
function chart(steps, values, label) {
  const width = 360, height = 140, pad = 28;
  const svg = svgNode("svg", { width, height, role: "img", "aria-label": label, class: "curve" });
  const points = steps.map((step, i) => [step, values[i]]).filter(([, v]) => v != null && Number.isFinite(v));
  svg.append(svgNode("text", { x: pad, y: 12, "font-size": 11 }, label));
  if (points.length === 0) return svg;
  const xs = points.map(([x]) => x), ys = points.map(([, y]) => y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + ((x - x0) / Math.max(x1 - x0, 1e-12)) * (width - 2 * pad);
  const sy = (y) => height - pad + 8 - ((y - y0) / Math.max(y1 - y0, 1e-12)) * (height - 2 * pad);
  svg.append(
    svgNode("polyline", {
      points: points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
      fill: "none", stroke: "var(--accent, #3b6fd8)", "stroke-width": 1.5,
    }),
    svgNode("text", { x: 2, y: sy(y1) + 4, "font-size": 9 }, format(y1)),
    svgNode("text", { x: sx(x1), y: height - 4, "font-size": 9, "text-anchor": "end" }, String(x1)),
  );
  if (y0 !== y1) svg.append(svgNode("text", { x: 2, y: sy(y0), "font-size": 9 }, format(y0))); // a flat line has one value
  return svg;
}

function format(value) {
  return Math.abs(value) < 0.01 && value !== 0 ? value.toExponential(1) : value.toFixed(3);
}

function svgNode(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}
