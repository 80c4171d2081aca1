// Bulk caption edits (preview, then apply exactly what was previewed) and the tag counts of the folder.
import { api, element, query, send, t } from "./api.js";

const $ = (id) => document.getElementById(id);
let preview = null; // {edit, plan} of the preview on screen

export function initBulk(ctx) {
  const form = $("dataset-bulk");
  $("dataset-bulk-operation").addEventListener("change", showOperation);
  form.addEventListener("input", (event) => {
    if (event.target.id !== "dataset-bulk-operation") hidePreview();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    previewEdit(ctx);
  });
  $("dataset-bulk-apply").addEventListener("click", () => applyEdit(ctx));
  $("dataset-bulk-cancel").addEventListener("click", hidePreview);
  $("dataset-tags-kind").addEventListener("change", () => showTags(ctx));
  showOperation();
}

function showOperation() {
  const operation = $("dataset-bulk-operation").value;
  for (const node of document.querySelectorAll("#dataset-bulk .bulk-replace")) node.hidden = operation !== "replace";
  document.querySelector("#dataset-bulk .bulk-text").hidden = operation === "replace";
  if (operation !== "replace") $("dataset-bulk-text-label").textContent = t(`bulk.text.${operation}`);
  $("dataset-bulk-hint").textContent = t(`bulk.hint.${operation}`);
  hidePreview();
}

function currentEdit(ctx) {
  const operation = $("dataset-bulk-operation").value;
  if (operation === "replace") return { path: ctx.path, operation, find: $("dataset-bulk-find").value, replace: $("dataset-bulk-replace").value };
  return { path: ctx.path, operation, text: $("dataset-bulk-text").value };
}

async function previewEdit(ctx) {
  const edit = currentEdit(ctx);
  const plan = await send("POST", "/api/dataset/bulk/preview", edit);
  preview = { edit, plan };
  const rows = plan.changes.map((change) =>
    element("tr", {}, [element("td", { textContent: change.file_name }), element("td", { className: "before", textContent: change.before }), element("td", { className: "after", textContent: change.after })]),
  );
  $("dataset-bulk-changes").tBodies[0].replaceChildren(...rows);
  const skipped = plan.skipped.map((item) => `${item.file_name} (${t(`bulk.skipped.${item.reason}`)})`).join(", ");
  $("dataset-bulk-summary").textContent = [
    t("bulk.summary", { changed: plan.changes.length, unchanged: plan.unchanged }),
    skipped ? t("bulk.skipped", { names: skipped }) : "",
  ].join(" ");
  const apply = $("dataset-bulk-apply");
  apply.textContent = t("bulk.apply", { count: plan.changes.length });
  apply.disabled = plan.changes.length === 0 || ctx.locked;
  $("dataset-bulk-changes").hidden = plan.changes.length === 0;
  $("dataset-bulk-result").hidden = false;
}

async function applyEdit(ctx) {
  if (!preview) return;
  const expect = Object.fromEntries(preview.plan.changes.map((change) => [change.file_name, change.before]));
  const apply = $("dataset-bulk-apply");
  apply.disabled = true;
  try {
    const result = await send("POST", "/api/dataset/bulk/apply", { ...preview.edit, expect });
    hidePreview();
    $("dataset-bulk-summary").textContent = t("bulk.applied", { count: result.written, backups: result.backups.join(", ") || "—" });
    $("dataset-bulk-result").hidden = false;
    $("dataset-bulk-changes").hidden = true;
    apply.hidden = true;
    await ctx.reload();
  } catch {
    apply.disabled = false;
  }
}

function hidePreview() {
  preview = null;
  $("dataset-bulk-result").hidden = true;
  $("dataset-bulk-apply").hidden = false;
}

// The tag (or word) counts; a tag's button fills the bulk form to remove it, then previews that.
export async function showTags(ctx) {
  const kind = $("dataset-tags-kind").value;
  const answer = await api(`/api/dataset/tags?${query({ path: ctx.path, kind })}`);
  const items = answer.terms.map(({ term, count }) => {
    const remove = element("button", { type: "button", className: "tag-remove", textContent: "×", title: t("tags.remove", { tag: term }), onclick: () => removeTag(ctx, term) });
    const item = element("li", {}, [element("span", { className: "tag-term", textContent: term, title: term }), " ", element("span", { className: "tag-count", textContent: String(count) }), ...(kind === "tags" ? [" ", remove] : [])]);
    item.dataset.term = term;
    return item;
  });
  $("dataset-tags").replaceChildren(...(items.length ? items : [element("li", { className: "help", textContent: t("tags.none") })]));
}

function removeTag(ctx, term) {
  $("dataset-bulk-operation").value = "remove_tag";
  showOperation();
  $("dataset-bulk-text").value = term;
  $("dataset-bulk-panel").open = true;
  previewEdit(ctx);
}
