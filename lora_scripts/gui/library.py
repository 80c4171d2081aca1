"""The LoRA library page's logic: the LoRA files of the runs and of the WebUI folder with their training
facts, one file's full `inspect` report, and copying a file into WebUI's `models/Lora` the way WebUI shows it
best.

The listing reads only the files' safetensors headers (the metadata sd-scripts' `ss_*` keys carry), so a
folder of many LoRAs lists at once; the full report reads the file and is asked for one file at a time.

A copy lands as `<name>.safetensors` (the file's `ss_output_name` by default: the name its runs trained it
under), never replacing a different file, with WebUI's card files beside it when there are none:
`<name>.preview.png` (the run's newest sample) and `<name>.json`, the user metadata WebUI's card editor
keeps (extensions-builtin/Lora/ui_edit_user_metadata.py: "description", "sd version", "activation text",
"preferred weight", "negative text", "notes").
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic, write_text_atomic
from lora_scripts.generation.lora_library import LoraFile, LoraLibrary
from lora_scripts.gui.lora_folders import WEBUI_NAME, LoraFolders
from lora_scripts.lora_tools.inspection import dataset_folders, inspect_lora, top_tags
from lora_scripts.training.runs import list_samples

SUFFIX = ".safetensors"
# File names WebUI takes as a card's preview (modules/ui_extra_networks.py: find_preview).
PREVIEW_NAMES = tuple(f"{{}}{p}.{e}" for p in ("", ".preview") for e in ("png", "jpg", "jpeg", "webp", "gif"))
_UNSAFE_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f]')  # not in a file name on Windows; ":" and ">" end a tag
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME = 150
PREFERRED_WEIGHT = 1.0  # what "Use in Generate" writes too; WebUI's card then inserts <lora:NAME:1.0>


def list_library(folders: LoraFolders) -> dict[str, Any]:
    """{"webui": {name, path} | None, "files": [facts, ...]}: every LoRA file of the runs and the WebUI
    folder, newest first (see `facts`)."""
    existing = [folder for folder in folders.folders() if folder.is_dir()]
    files = _unique(LoraLibrary.scan(existing).files)
    runs = [run.resolve() for run in folders.run_folders()]
    in_webui = {
        hash_: folders.shown(file.path)
        for file in files
        if _in_webui(folders, file.path) and (hash_ := _stored_hash(file))
    }
    tags = _TagNames(files)
    listed = []
    for file in files:
        try:
            listed.append(facts(folders, file, runs, in_webui, tags.of(file)))
        except FileNotFoundError:  # removed since the scan (a run replacing its step files): not there now
            continue
    listed.sort(key=lambda item: item["modified"], reverse=True)
    webui = None if folders.webui is None else {"name": WEBUI_NAME, "path": str(folders.webui)}
    return {"webui": webui, "files": listed}


def facts(
    folders: LoraFolders, file: LoraFile, runs: list[Path], in_webui: dict[str, str], tag: str
) -> dict[str, Any]:
    """What the page shows of one file, from its metadata alone (strings as sd-scripts writes them; numbers
    where they parse)."""
    meta = file.metadata
    stat = file.path.stat()
    run = _run_of(file.path, runs)
    stored = _stored_hash(file)
    source = "webui" if _in_webui(folders, file.path) else "run"
    return {
        "path": folders.shown(file.path),
        "source": source,
        "run": folders.shown(run) if run is not None else None,
        "file": file.path.name,
        "stem": file.stem,
        "alias": file.alias,
        "tag": tag,
        "size": stat.st_size,
        "modified": stat.st_mtime,
        "version": version_name(meta),
        "sd_version": a1111_sd_version(meta),
        "base_model": _value(meta, "ss_sd_model_name"),
        "rank": _number(meta.get("ss_network_dim")),
        "alpha": _number(meta.get("ss_network_alpha")),
        "steps": _number(meta.get("ss_steps")),
        "epoch": _number(meta.get("ss_epoch")),
        "resolution": _resolution(meta.get("ss_resolution")),
        "datasets": [asdict(d) for d in dataset_folders(meta)],
        "top_tags": top_tags(meta),
        "trigger": trigger_tags(meta),
        "hash": stored[:12] if stored else None,
        "in_webui": in_webui.get(stored) if stored and source == "run" else None,
    }


def detail(folders: LoraFolders, name: str) -> dict[str, Any]:
    """`lora-scripts inspect`'s report of one file (reads the whole file), its path as the page names it."""
    path = _lora_path(folders, name)
    report = asdict(inspect_lora(path))
    return report | {"path": folders.shown(path)}


def copy_to_webui(folders: LoraFolders, source_name: str, name: str | None = None) -> dict[str, Any]:
    """Copy the LoRA `source_name` (a page name) into the WebUI folder as `<name>.safetensors`, with a preview
    and WebUI's user-metadata file when there are none. {"status": "copied" | "already", "path", "name",
    "tag", "written": [page names]}; UserError for anything refused (see the module docstring)."""
    if folders.webui is None:
        raise UserError(
            "No WebUI LoRA folder is set; start the web app with `lora-scripts gui --webui-lora-dir "
            "~/stable-diffusion-webui/models/Lora` to copy LoRA files there."
        )
    source = _lora_file(folders, source_name)
    name = _checked_name(name if name and name.strip() else source.alias or source.stem)
    target = folders.webui / f"{name}{SUFFIX}"
    answer = {"path": folders.shown(target), "name": name, "tag": f"<lora:{name}:{PREFERRED_WEIGHT:g}>"}
    if target.exists():
        if target.is_file() and filecmp.cmp(source.path, target, shallow=False):
            return answer | {"status": "already", "written": []}
        raise UserError(_taken(name, target))
    try:
        write_atomic(target, lambda tmp: shutil.copyfile(source.path, tmp), overwrite=False)
    except FileExistsError:  # written by someone else while we copied
        raise UserError(_taken(name, target)) from None
    written = [target]
    preview = _newest_sample(folders, source)
    if preview is not None and not any((folders.webui / p.format(name)).exists() for p in PREVIEW_NAMES):
        written.append(folders.webui / f"{name}.preview.png")
        write_atomic(written[-1], lambda tmp: shutil.copyfile(preview, tmp))
    sidecar = folders.webui / f"{name}.json"
    if not sidecar.exists():
        write_text_atomic(sidecar, json.dumps(user_metadata(source, name), indent=4, ensure_ascii=False))
        written.append(sidecar)
    return answer | {"status": "copied", "written": [folders.shown(path) for path in written]}


def user_metadata(file: LoraFile, name: str) -> dict[str, Any]:
    """WebUI's card metadata (`<name>.json`, the keys its editor saves) for `file`."""
    meta = file.metadata
    version = version_name(meta) or "Stable Diffusion"
    rank = meta.get("ss_network_dim")
    ranked = f" (rank {rank})" if rank else ""
    description = f"{name}: a LoRA for {version}{ranked}, made with lora-scripts."
    notes = [
        f"{label}: {value}"
        for label, value in (
            ("Base model", _value(meta, "ss_sd_model_name")),
            ("Steps", _value(meta, "ss_steps")),
            ("Epoch", _value(meta, "ss_epoch")),
            ("Resolution", _resolution(meta.get("ss_resolution"))),
            ("Rank / alpha", f"{rank} / {meta.get('ss_network_alpha', '?')}" if rank else None),
            ("Trained with", "lora-scripts"),
            ("Source file", file.path.name),
        )
        if value
    ]
    return {
        "description": description,
        "sd version": a1111_sd_version(meta),
        "activation text": ", ".join(trigger_tags(meta)),
        "preferred weight": PREFERRED_WEIGHT,
        "negative text": "",
        "notes": "\n".join(notes),
    }


def trigger_tags(metadata: dict[str, str]) -> list[str]:
    """The caption tags in every training image (a run's trigger word, as far as the metadata can tell):
    `ss_tag_frequency` counts each tag once per caption, so a tag whose count reaches its folder's image
    count (`ss_dataset_dirs`) is in every caption there. [] when no folder's image count is known."""
    frequency = _json_object(metadata.get("ss_tag_frequency"))
    images = {d.folder: d.images for d in dataset_folders(metadata) if d.images}
    common: set[str] | None = None
    for folder, tags in frequency.items():
        if folder not in images or not isinstance(tags, dict):
            continue
        everywhere = {str(tag).strip() for tag, n in tags.items() if _number(n) == images[folder]}
        common = everywhere if common is None else common & everywhere
    if not common:
        return []
    order = [tag for tag, _ in top_tags(metadata)]  # most frequent first, then by name
    return sorted(common, key=lambda tag: (order.index(tag) if tag in order else len(order), tag))


def version_name(metadata: dict[str, str]) -> str | None:
    """The model version from sd-scripts' `ss_base_model_version` (or `ss_v2`): "SD 1.x", "SD 2.x", "SDXL",
    else the declared value as it is."""
    declared = metadata.get("ss_base_model_version", "")
    for prefix, name in (("sdxl", "SDXL"), ("sd_v2", "SD 2.x"), ("sd_v1", "SD 1.x")):
        if declared.startswith(prefix):
            return name
    if declared:
        return declared
    return "SD 2.x" if metadata.get("ss_v2") == "True" else None


def a1111_sd_version(metadata: dict[str, str]) -> str:
    """WebUI's SdVersion name, by its own rule (extensions-builtin/Lora/network.py: detect_version)."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if metadata.get("ss_v2") == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


# --- helpers ---------------------------------------------------------------------------------------------


class _TagNames:
    """The name to type in `<lora:NAME>` for each file: its stem, or its alias when another file takes the
    stem, as WebUI and the Generate page look names up (stems first, then aliases)."""

    def __init__(self, files: list[LoraFile]) -> None:
        self.by_stem: dict[str, set[str]] = {}
        self.by_alias: dict[str, set[str]] = {}
        for file in files:
            self.by_stem.setdefault(file.stem, set()).add(_identity(file))
            if file.alias:
                self.by_alias.setdefault(file.alias, set()).add(_identity(file))

    def of(self, file: LoraFile) -> str:
        for name in (file.stem, file.alias):
            if name and (self.by_stem.get(name) or self.by_alias.get(name)) == {_identity(file)}:
                return name
        return file.stem


def _identity(file: LoraFile) -> str:
    """Copies of one file count as one (same tensors hash); a file without a stored hash is itself."""
    return _stored_hash(file) or str(file.path.resolve())


def _stored_hash(file: LoraFile) -> str | None:
    stored = file.metadata.get("sshs_model_hash", "").strip().lower()
    return stored if _SHA256.match(stored) else None


def _unique(files: list[LoraFile]) -> list[LoraFile]:
    """Each file once (the WebUI folder may lie inside a root, or a link point at a run's file)."""
    seen: dict[Path, LoraFile] = {}
    for file in files:
        seen.setdefault(file.path.resolve(), file)
    return [LoraFile(path=path, metadata=file.metadata) for path, file in seen.items()]


def _in_webui(folders: LoraFolders, path: Path) -> bool:
    return folders.webui is not None and folders.webui in path.resolve().parents


def _run_of(path: Path, runs: list[Path]) -> Path | None:
    parents = path.resolve().parents
    return next((run for run in runs if run in parents), None)


def _lora_path(folders: LoraFolders, name: str) -> Path:
    path = folders.resolve(name)
    if not path.is_file() or path.suffix.lower() != SUFFIX:
        raise UserError(f"'{name}': not a LoRA file; give a .safetensors file the library lists.")
    return path


def _lora_file(folders: LoraFolders, name: str) -> LoraFile:
    """The library's file for page name `name`; UserError for anything the library does not list."""
    path = _lora_path(folders, name).resolve()
    existing = [folder for folder in folders.folders() if folder.is_dir()]
    found = next((f for f in LoraLibrary.scan(existing).files if f.path.resolve() == path), None)
    if found is None:
        raise UserError(
            f"'{name}': not a LoRA file in a run's folder or the WebUI folder; copy a file the library lists."
        )
    return found


def _checked_name(name: str) -> str:
    """`name` (a trailing .safetensors dropped) if it is safe as a file name and a `<lora:NAME>` tag."""
    name = name.strip()
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not name or name in (".", "..") or ".." in name or name.startswith(".") or _UNSAFE_NAME.search(name):
        raise UserError(
            f"name '{name}': not usable as a file name; use letters, digits, '-', '_' and '.' "
            "(no '/', '\\', '..', ':', '<', '>' or a leading '.')."
        )
    if len(name) > MAX_NAME:
        raise UserError(f"name '{name[:40]}…': longer than {MAX_NAME} characters; give a shorter name.")
    return name


def _taken(name: str, target: Path) -> str:
    return (
        f"name '{name}': the WebUI folder already has a different {target.name}; it is never replaced, "
        "so give another name."
    )


def _newest_sample(folders: LoraFolders, file: LoraFile) -> Path | None:
    """The run's newest sample image at or before the file's step (a step file's own samples)."""
    run = _run_of(file.path, [run.resolve() for run in folders.run_folders()])
    if run is None:
        return None
    samples = list_samples(run)
    step = _number(file.metadata.get("ss_steps"))
    if isinstance(step, int):
        samples = [s for s in samples if s.step <= step] or samples
    if not samples:
        return None
    last = max(s.step for s in samples)
    return min((s for s in samples if s.step == last), key=lambda s: (s.prompt_index, s.path.name)).path


def _value(metadata: dict[str, str], key: str) -> str | None:
    value = metadata.get(key)
    return None if value in (None, "", "None") else value


def _number(value: object) -> int | float | str | None:
    """An int or float when `value` parses as one; other text as it is ("Dynamic"); None when missing."""
    if value in (None, "", "None"):
        return None
    for kind in (int, float):
        try:
            return kind(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            continue
    return str(value)


def _resolution(value: str | None) -> str | None:
    """sd-scripts' "(512, 512)" (width, height) as "512x512"."""
    numbers = re.findall(r"\d+", value or "")
    return "x".join(numbers[:2]) if len(numbers) >= 2 else _value({"v": value or ""}, "v")


def _json_object(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
