// The Dataset page: pick or create a folder, see its images with their captions and the check's findings,
// edit a caption in place (saved on blur or Enter). Uploads, bulk edits, tag counts and labeling live in
// their own modules and share `ctx` (the open folder).
import { api, element, query, send, showErrors, t } from "./api.js";
import { initBulk, showTags } from "./dataset_bulk.js";
import { initLabel, showJob } from "./dataset_label.js";
import { initUpload } from "./dataset_upload.js";

const THUMB_SIDE = 256;
const RESOLUTION_KEY = "lora_scripts_resolution";
const $ = (id) => document.getElementById(id);

export const ctx = {
  path: null, // ROOT/relative of the open folder
  listing: null, // the last GET /api/dataset answer
  filter: null, // a finding kind: only images with it are shown
  locked: false, // a label job writes the captions: no edits meanwhile
  open: openFolder,
  reload: () => openFolder(ctx.path),
  // Where a folder without captions gets them: the page's choice; null once the folder has some.
  captionFormat: () => (ctx.listing?.caption_format ? null : $("dataset-caption-format").value),
  resolution: () => Number($("dataset-resolution").value),
  setLocked,
};

export async function initDataset(roots) {
  $("roots").replaceChildren(
    ...roots.map((root) => element("li", {}, [element("button", { type: "button", className: "folder", textContent: root.name, title: root.path, onclick: () => openFolder(root.name) })])),
  );
  const resolution = $("dataset-resolution");
  resolution.value = localStorage.getItem(RESOLUTION_KEY) || "512";
  resolution.addEventListener("change", () => {
    localStorage.setItem(RESOLUTION_KEY, resolution.value);
    if (ctx.path) ctx.reload();
  });
  $("dataset-reload").addEventListener("click", () => ctx.reload());
  $("dataset-new-folder").addEventListener("submit", createFolder);
  initUpload(ctx);
  initBulk(ctx);
  initLabel(ctx);
  const fromHash = location.hash.startsWith("#dataset/") ? decodeURIComponent(location.hash.slice("#dataset/".length)) : "";
  if (fromHash) await openFolder(fromHash).catch(() => null);
  else if (roots.length === 1) await openFolder(roots[0].name);
}

async function openFolder(path) {
  const listing = await api(`/api/dataset?${query({ path, resolution: ctx.resolution() })}`);
  if (listing.path !== ctx.path) ctx.filter = null;
  ctx.path = listing.path;
  ctx.listing = listing;
  history.replaceState(null, "", `#dataset/${encodeURIComponent(listing.path)}`);
  renderBreadcrumbs(listing.path);
  renderFolders(listing);
  renderSummary(listing);
  renderGrid(listing);
  renderFindingCounts();
  $("dataset-new-folder").hidden = false;
  $("dataset-view").hidden = false;
  showTags(ctx);
  showJob(ctx, listing.job);
}

async function createFolder(event) {
  event.preventDefault();
  const input = $("dataset-new-folder-name");
  const name = input.value.trim();
  if (!name || !ctx.path) return;
  const made = await send("POST", "/api/dataset/folder", { path: `${ctx.path}/${name}` });
  input.value = "";
  await openFolder(made.path);
}

function renderBreadcrumbs(path) {
  const parts = path.split("/");
  const crumbs = parts.map((part, i) => {
    const target = parts.slice(0, i + 1).join("/");
    const last = i === parts.length - 1;
    return element("button", { type: "button", className: last ? "crumb current" : "crumb", textContent: part, disabled: last, onclick: () => openFolder(target) });
  });
  $("dataset-breadcrumbs").replaceChildren(...crumbs.flatMap((crumb, i) => (i ? [element("span", { textContent: " / " }), crumb] : [crumb])));
}

function renderFolders(listing) {
  const items = listing.folders.map((name) =>
    element("li", {}, [element("button", { type: "button", className: "folder", textContent: name, onclick: () => openFolder(`${listing.path}/${name}`) })]),
  );
  $("dataset-folders").replaceChildren(...items);
}

export function renderSummary(listing) {
  const captioned = listing.images.filter((image) => image.caption?.trim()).length;
  $("dataset-counts").textContent = t("dataset.counts", { images: listing.images.length, captioned });
  const source = listing.caption_format === "csv" ? t("dataset.source.csv", { file: listing.caption_file }) : listing.caption_format === "txt" ? t("dataset.source.txt") : t("dataset.source.none");
  $("dataset-source").textContent = source;
  const problems = $("dataset-caption-errors");
  problems.replaceChildren(...listing.caption_errors.map((text) => element("li", { textContent: text })));
  problems.hidden = listing.caption_errors.length === 0;
  $("dataset-format-choice").hidden = Boolean(listing.caption_format);
  for (const node of document.querySelectorAll("#dataset-label .only-csv")) node.hidden = listing.caption_format === "txt";
}

function renderGrid(listing) {
  $("dataset-grid").replaceChildren(...listing.images.map(card));
  $("dataset-empty").hidden = listing.images.length > 0;
  applyFilter();
  setLocked(ctx.locked);
}

function card(image) {
  const path = `${ctx.path}/${image.file_name}`;
  const scale = Math.min(1, THUMB_SIDE / Math.max(image.width || 1, image.height || 1));
  const thumb = element("img", {
    className: "dataset-thumb",
    src: `/api/dataset/thumbnail?${query({ path, size: THUMB_SIDE })}`,
    alt: image.file_name,
    loading: "lazy",
    width: Math.round((image.width || THUMB_SIDE) * scale),
    height: Math.round((image.height || THUMB_SIDE) * scale),
  });
  const name = element("figcaption", { className: "dataset-file-name", title: image.file_name }, [
    image.file_name,
    element("small", { textContent: image.width ? ` ${image.width}×${image.height}` : "" }),
  ]);
  const box = element("textarea", { className: "dataset-caption", rows: 3, value: image.caption ?? "", placeholder: t("caption.placeholder"), spellcheck: false });
  box.setAttribute("aria-label", t("caption.label", { name: image.file_name }));
  const state = element("span", { className: "dataset-caption-state" });
  state.setAttribute("aria-live", "polite");
  const node = element("li", { className: "dataset-card" }, [element("figure", {}, [thumb, name]), element("ul", { className: "dataset-badges" }), box, state]);
  node.dataset.fileName = image.file_name;
  renderBadges(node, image);
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();
      box.blur(); // saves; captions are one line (a newline would end up inside a .txt caption)
    } else if (event.key === "Escape") {
      box.value = image.caption ?? "";
      box.blur();
    }
  });
  box.addEventListener("blur", () => saveCaption(node, box, image));
  return node;
}

function renderBadges(node, image) {
  node.dataset.findings = image.findings.map((finding) => finding.kind).join(" ");
  node.classList.toggle("has-findings", image.findings.length > 0);
  node.querySelector(".dataset-badges").replaceChildren(...image.findings.map(badge));
}

function badge(finding) {
  const values = { ...finding, of: (finding.of || []).join(", ") };
  const item = element("li", { className: `badge badge-${finding.kind}`, textContent: t(`finding.${finding.kind}`), title: t(`finding.${finding.kind}.detail`, values) });
  item.dataset.kind = finding.kind;
  return item;
}

async function saveCaption(node, box, image) {
  const text = box.value.trim();
  const state = node.querySelector(".dataset-caption-state");
  if (text === (image.caption ?? "").trim()) return;
  if (!text) {
    showErrors([t("caption.empty", { name: image.file_name })]);
    box.value = image.caption ?? "";
    return;
  }
  node.classList.add("saving");
  node.classList.remove("error");
  state.textContent = t("caption.saving");
  try {
    const saved = await send("PUT", "/api/dataset/caption", {
      path: ctx.path,
      file_name: image.file_name,
      caption: text,
      previous: image.caption,
      caption_format: ctx.captionFormat(),
      resolution: ctx.resolution(),
    });
    Object.assign(image, { caption: saved.caption, findings: saved.findings });
    if (box.value.trim() === text) box.value = saved.caption; // unless typed on meanwhile
    renderBadges(node, image);
    state.textContent = saved.backups.length ? t("caption.saved_backup", { file: saved.backups.join(", ") }) : t("caption.saved");
    if (!ctx.listing.caption_format) ctx.listing.caption_format = saved.caption_format;
    renderSummary(ctx.listing);
    renderFindingCounts();
    showTags(ctx);
  } catch {
    node.classList.add("error");
    state.textContent = t("caption.not_saved");
  } finally {
    node.classList.remove("saving");
  }
}

function renderFindingCounts() {
  const counts = new Map();
  for (const image of ctx.listing.images) for (const finding of image.findings) counts.set(finding.kind, (counts.get(finding.kind) || 0) + 1);
  if (ctx.filter && !counts.has(ctx.filter)) ctx.filter = null;
  const buttons = [...counts].map(([kind, count]) => {
    const button = element("button", { type: "button", className: `finding-filter badge badge-${kind}`, textContent: `${t(`finding.${kind}`)} (${count})`, title: t("findings.filter") });
    button.dataset.kind = kind;
    button.setAttribute("aria-pressed", String(ctx.filter === kind));
    button.addEventListener("click", () => {
      ctx.filter = ctx.filter === kind ? null : kind;
      renderFindingCounts();
      applyFilter();
    });
    return button;
  });
  const title = element("span", { textContent: counts.size ? t("findings.title") : t("findings.none") });
  $("dataset-findings").replaceChildren(title, ...buttons);
}

function applyFilter() {
  for (const node of $("dataset-grid").children) {
    node.hidden = Boolean(ctx.filter) && !node.dataset.findings.split(" ").includes(ctx.filter);
  }
}

// While a label job writes the folder's captions they cannot be edited (the server refuses too).
function setLocked(locked) {
  ctx.locked = locked;
  for (const box of document.querySelectorAll("#dataset-grid .dataset-caption")) box.readOnly = locked;
  $("dataset-grid").classList.toggle("locked", locked);
}
