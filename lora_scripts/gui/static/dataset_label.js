// `label` from the Dataset page: start a job with the CLI's options, then poll it for the progress bar.
import { api, send, t } from "./api.js";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
let polling = null; // the job id being polled

export function initLabel(ctx) {
  const captioner = $("dataset-label-captioner");
  const showCaptioner = () => {
    for (const node of document.querySelectorAll("#dataset-label .only-blip")) node.hidden = captioner.value !== "blip";
    for (const node of document.querySelectorAll("#dataset-label .only-wd14")) node.hidden = captioner.value !== "wd14";
  };
  captioner.addEventListener("change", showCaptioner);
  showCaptioner();
  $("dataset-label").addEventListener("submit", async (event) => {
    event.preventDefault();
    const answer = await send("POST", "/api/dataset/label", labelOptions(ctx));
    showJob(ctx, answer.job);
  });
}

function labelOptions(ctx) {
  const value = (id) => $(id).value.trim();
  const number = (id) => Number($(id).value);
  const options = {
    path: ctx.path,
    captioner: value("dataset-label-captioner"),
    trigger: value("dataset-label-trigger"),
    prefix: $("dataset-label-prefix").value,
    suffix: $("dataset-label-suffix").value, // pasted as given: ", ink wash" keeps its comma and space
    overwrite: $("dataset-label-overwrite").checked,
    prune: $("dataset-label-prune").checked && ctx.listing?.caption_format !== "txt",
    batch_size: number("dataset-label-batch-size"),
    num_beams: number("dataset-label-num-beams"),
    max_new_tokens: number("dataset-label-max-new-tokens"),
    threshold: number("dataset-label-threshold"),
    character_threshold: number("dataset-label-character-threshold"),
    exclude_tags: value("dataset-label-exclude-tags"),
    model: value("dataset-label-model") || null,
    device: value("dataset-label-device") || null,
  };
  const format = ctx.captionFormat();
  if (format) options.caption_format = format;
  return options;
}

// Show a job (from starting it, or from the folder's listing) and poll it while it runs.
export function showJob(ctx, job) {
  const box = $("dataset-label-job");
  if (!job) {
    box.hidden = true;
    ctx.setLocked(false);
    $("dataset-label-start").disabled = false;
    return;
  }
  box.hidden = false;
  const running = job.status === "running";
  const bar = $("dataset-label-progress");
  bar.max = job.total || 1;
  bar.value = running ? job.done : bar.max;
  if (running && job.total === null) bar.removeAttribute("value"); // indeterminate until the count is known
  $("dataset-label-status").textContent = statusText(job);
  const result = $("dataset-label-result");
  result.hidden = !job.result && !job.errors.length;
  result.textContent = job.errors.length ? job.errors.join("\n") : (job.result?.lines || []).join("\n");
  result.classList.toggle("failed", job.status === "failed");
  $("dataset-label-start").disabled = running;
  ctx.setLocked(running);
  if (running && polling !== job.id) poll(ctx, job.id);
}

function statusText(job) {
  if (job.status === "failed") return t("label.failed");
  if (job.status === "done") return t("label.done", { captioned: job.result?.captioned ?? 0, seconds: job.seconds });
  return t(`label.phase.${job.phase}`, { done: job.done, total: job.total ?? "?" });
}

async function poll(ctx, id) {
  polling = id;
  const folder = ctx.path;
  while (polling === id && ctx.path === folder) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    let job;
    try {
      job = await api(`/api/jobs/${encodeURIComponent(id)}`);
    } catch {
      break;
    }
    if (ctx.path !== folder) break;
    if (job.status !== "running") {
      polling = null;
      showJob(ctx, job);
      await ctx.reload(); // the new captions
      return;
    }
    showJob(ctx, job);
  }
  if (polling === id) polling = null;
}
