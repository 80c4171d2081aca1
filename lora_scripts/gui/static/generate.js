// The Generate page: the `generate` command's form (prompt with <lora:NAME:weight> tags, the library's LoRA
// names offered, sampler, steps, seed, size, a weight grid, a FLUX.1 single file's part files), run as a job
// on the server, polled for its progress, and the output folder's gallery with each picture's infotext
// (WebUI's PNG Info).
import { api, element, query, request, send, t } from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
let timer = null;

export async function initGenerate() {
  $("generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    start();
  });
  $("generate-stop").addEventListener("click", () => send("POST", "/api/generate/stop", {}).then(showJob, () => {}));
  $("generate-unload").addEventListener("click", () => send("POST", "/api/generate/unload", {}).then(
    () => { $("generate-status").textContent = t("generate.unloaded"); }, () => {}));
  $("generate-lora-add").addEventListener("click", addLoraTag);
  $("generate-output").addEventListener("change", showGallery);
  window.addEventListener("hashchange", () => { if (location.hash === "#generate") loadOptions(); });
  await loadOptions();
}

// The samplers, the LoRA names and base models the roots hold, the default output folder, and the job that
// may be running (a reload reattaches to it).
async function loadOptions() {
  let options;
  try {
    options = await api("/api/generate/options");
  } catch {
    return;
  }
  const sampler = $("generate-sampler");
  const chosen = sampler.value;
  sampler.replaceChildren(
    element("option", { value: "", textContent: t("generate.sampler_default") }),
    ...options.samplers.map((s) => element("option", { value: s.key, textContent: s.name })),
  );
  sampler.value = chosen;
  const lora = $("generate-lora");
  lora.replaceChildren(
    element("option", { value: "", textContent: t("generate.lora_pick") }),
    ...options.loras.map((l) => element("option", { value: l.name, textContent: l.name, title: l.path })),
  );
  $("generate-base-models").replaceChildren(...options.base_models.map((name) => element("option", { value: name })));
  if (!$("generate-base-model").value && options.base_models.length) $("generate-base-model").value = options.base_models[0];
  if (!$("generate-output").value) $("generate-output").value = options.output;
  if (options.job) showJob(options.job);
  showGallery();
}

function addLoraTag() {
  const name = $("generate-lora").value;
  if (!name) return;
  const weight = Number($("generate-lora-weight").value || 1);
  const prompt = $("generate-prompt");
  const text = prompt.value.trimEnd();
  prompt.value = `${text}${text ? ", " : ""}<lora:${name}:${weight}>`;
  prompt.dispatchEvent(new Event("input"));
}

function formValues() {
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  return {
    base_model: $("generate-base-model").value.trim(),
    prompt: $("generate-prompt").value,
    negative_prompt: $("generate-negative").value,
    sampler: $("generate-sampler").value,
    steps: number("generate-steps"),
    cfg_scale: number("generate-cfg"),
    seed: number("generate-seed") ?? -1,
    width: number("generate-width"),
    height: number("generate-height"),
    num_images: number("generate-count") ?? 1,
    lora_weights: $("generate-grid").value.trim(),
    output: $("generate-output").value.trim(),
    precision: $("generate-precision").value,
    vae: $("generate-vae").value.trim(),
    clip_l: $("generate-clip-l").value.trim(),
    t5xxl: $("generate-t5xxl").value.trim(),
    base_model_config: $("generate-base-model-config").value.trim(),
  };
}

async function start() {
  showProblems([]);
  const answer = await requestJob("/api/generate", formValues());
  if (answer) showJob(answer.job);
}

// POST and return the answer, or show the errors beside the form (they are about the form).
async function requestJob(path, body) {
  const { ok, body: answer } = await request(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!ok) {
    showProblems(answer?.errors || [String(answer)]);
    return null;
  }
  return answer;
}

function showProblems(messages) {
  const list = $("generate-errors");
  list.replaceChildren(...messages.map((text) => element("li", { textContent: text })));
  list.hidden = messages.length === 0;
}

function showJob(job) {
  clearTimeout(timer);
  if (!job) return;
  const running = job.status === "running";
  const bar = $("generate-progress");
  bar.hidden = !running;
  bar.max = job.total || 1;
  bar.value = job.done;
  $("generate-start").disabled = running;
  $("generate-stop").hidden = !running;
  const status = $("generate-status");
  if (running) {
    status.textContent = job.phase === "loading" ? t("generate.loading")
      : t("generate.rendering", { done: job.done, total: job.total ?? "?" });
    timer = setTimeout(poll, POLL_MS);
    return;
  }
  if (job.status === "failed") {
    status.textContent = t("generate.failed");
    showProblems(job.errors);
    return;
  }
  const images = job.result?.images ?? [];
  status.textContent = t(job.result?.stopped ? "generate.stopped" : "generate.done",
    { count: images.length, seed: job.result?.seed ?? "", seconds: job.seconds });
  showGallery();
}

async function poll() {
  try {
    showJob((await api("/api/generate/job")).job);
  } catch {
    timer = setTimeout(poll, POLL_MS * 3); // the server may be restarting
  }
}

async function showGallery() {
  const folder = $("generate-output").value.trim();
  if (!folder) return;
  let answer;
  try {
    answer = await api(`/api/generate/gallery?${query({ folder })}`);
  } catch {
    return;
  }
  $("generate-gallery-empty").hidden = answer.images.length > 0;
  $("generate-gallery").replaceChildren(...answer.images.map(galleryItem));
}

function galleryItem(image) {
  const src = `/api/generate/image?${query({ path: image.path })}`;
  const reuse = element("button", { type: "button", className: "button", textContent: t("generate.reuse") });
  reuse.addEventListener("click", () => reuseSettings(image.fields));
  return element("li", { className: "gallery-item" }, [
    element("a", { href: src, target: "_blank" }, [element("img", { src, alt: image.name, loading: "lazy" })]),
    element("div", { className: "gallery-name", textContent: image.name }),
    element("pre", { className: "infotext", textContent: image.infotext }),
    reuse,
  ]);
}

// Fill the form from a picture's infotext (the fields WebUI's "send to txt2img" fills).
function reuseSettings(fields) {
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("generate-prompt", fields.Prompt);
  set("generate-negative", fields["Negative prompt"]);
  set("generate-steps", fields.Steps);
  set("generate-cfg", fields["CFG scale"]);
  set("generate-seed", fields.Seed);
  set("generate-width", fields["Size-1"]);
  set("generate-height", fields["Size-2"]);
  const sampler = [...$("generate-sampler").options].find((o) => o.textContent === fields.Sampler);
  if (sampler) $("generate-sampler").value = sampler.value;
  $("generate-form").scrollIntoView();
}
