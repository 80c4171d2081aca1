// Dropping images on the Dataset page: one request per file (each file gets its own answer and the size
// limit applies per file), a few at a time, with a progress bar; refusals are collected and shown together.
import { errorsOf, query, request, showErrors, t } from "./api.js";

const PARALLEL = 3;
const $ = (id) => document.getElementById(id);

export function initUpload(ctx) {
  const zone = $("dataset-drop");
  const input = $("dataset-upload-input");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    upload(ctx, [...event.dataTransfer.files]);
  });
  input.addEventListener("change", () => {
    upload(ctx, [...input.files]);
    input.value = "";
  });
}

async function upload(ctx, files) {
  if (!files.length || !ctx.path) return;
  const folder = ctx.path;
  const bar = $("dataset-upload-progress");
  const status = $("dataset-upload-status");
  Object.assign(bar, { max: files.length, value: 0, hidden: false });
  const errors = [];
  let saved = 0;
  const queue = [...files];
  const worker = async () => {
    for (let file = queue.shift(); file; file = queue.shift()) {
      const form = new FormData();
      form.append("files", file, file.name);
      const answer = await request(`/api/dataset/upload?${query({ path: folder })}`, { method: "POST", body: form });
      if (answer.ok) saved += answer.body.saved.length;
      else errors.push(...errorsOf(answer.body));
      bar.value += 1;
      status.textContent = t("upload.progress", { done: bar.value, total: files.length });
    }
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, files.length) }, worker));
  bar.hidden = true;
  status.textContent = t("upload.done", { saved, refused: errors.length });
  if (errors.length) showErrors(errors);
  if (ctx.path === folder) await ctx.reload();
}
