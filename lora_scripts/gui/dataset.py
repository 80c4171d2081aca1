"""The dataset page's work on one folder: list images with captions and findings, edit captions one at a
time or in bulk, count tags. Everything goes through the library: captions through the caption stores of
`lora-scripts label` (captioning/metadata_csv.py), findings through the checks of `lora-scripts check`
(checks/folder.py), bulk edits through captioning/edits.py.

The folder's captions are its metadata.csv when it has one, else the `.txt` beside each image
(`folder_caption_format`); a folder without captions yet gets the format the page chose (metadata.csv by
default, as `label` writes). Images are those directly in the folder, as `label` without --recursive sees
them.

Never losing a caption:
- every write is atomic and keeps every other row of a metadata.csv byte for byte (render_metadata_csv);
- a caption file is backed up (`<name>.bak`, older backups moved to `.bak.1`, ...) before the app first
  replaces a caption in it, and again whenever it changed outside the app since the app last wrote it;
  every bulk edit backs up first;
- an edit names the caption the page showed; when the file holds another one (edited elsewhere meanwhile),
  the edit is refused, as is a bulk edit whose preview no longer matches;
- while `label` runs in a folder its captions cannot be edited (the labeler would write its own copy back).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_scripts.captioning.edits import CaptionEdit, EditPlan, plan_edits
from lora_scripts.captioning.labeler import top_terms
from lora_scripts.captioning.metadata_csv import (
    METADATA_FILE,
    CaptionStore,
    caption_file_of,
    folder_caption_format,
    list_images,
    open_folder_captions,
)
from lora_scripts.checks.images import ImageFacts, scan_images
from lora_scripts.errors import UserError
from lora_scripts.gui.jobs import JobRegistry
from lora_scripts.gui.roots import Roots
from lora_scripts.gui.thumbnails import ThumbnailCache

DEFAULT_MAX_UPLOAD_BYTES = 50 * 2**20
DEFAULT_RESOLUTION = 512  # the config's default: SD 1.x/2.x; the page can ask for 768 or 1024
MAX_CACHED_FACTS = 50_000  # ImageFacts of unchanged files, so listing a folder again decodes nothing
CAPTION_FORMATS = ("csv", "txt")


@dataclass
class DatasetState:
    """What the dataset endpoints of one app share: caches, the label jobs, write locks, backup records."""

    roots: Roots
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    thumbnails: ThumbnailCache = field(default_factory=ThumbnailCache)
    jobs: JobRegistry = field(default_factory=JobRegistry)
    _facts: dict[tuple[str, int, int], ImageFacts] = field(default_factory=dict)
    _folder_locks: dict[Path, threading.Lock] = field(default_factory=dict)
    _written: dict[Path, str] = field(default_factory=dict)  # caption file -> sha256 the app last wrote
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def shown(self, path: Path) -> str:
        return self.roots.name_of(path)

    @contextmanager
    def locked(self, folder: Path) -> Iterator[None]:
        """Hold the folder's write lock: caption writes, and starting a job, one at a time per folder."""
        with self._lock:
            lock = self._folder_locks.setdefault(folder, threading.Lock())
        with lock:
            yield

    @contextmanager
    def writing(self, folder: Path) -> Iterator[None]:
        """Hold the folder's write lock; UserError while a job (label) writes its captions."""
        with self.locked(folder):
            job = self.jobs.running(self.shown(folder))
            if job is not None:
                raise UserError(
                    f"'{self.shown(folder)}': {job.kind} is writing its captions; edit them when it finishes."
                )
            yield

    def needs_backup(self, caption_file: Path) -> bool:
        """Whether `caption_file` holds text the app did not write (then it is backed up before a change)."""
        return caption_file.is_file() and self._written.get(caption_file) != _sha256(caption_file)

    def record_write(self, caption_file: Path, backed_up: bool) -> None:
        """After the app wrote `caption_file`: its earlier text is safe when it was backed up or was the
        app's own; else (a row appended, nothing backed up) the next change backs it up."""
        if backed_up and caption_file.is_file():
            self._written[caption_file] = _sha256(caption_file)
        else:
            self._written.pop(caption_file, None)

    def image_facts(self, folder: Path, images: list[str]) -> list[ImageFacts]:
        """`scan_images` of the images, decoding only files that changed since they were last scanned."""
        keys = {}
        for name in images:
            stat = (folder / name).stat()
            keys[name] = (str(folder / name), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = {name: self._facts.get(key) for name, key in keys.items()}
        missing = [name for name, facts in cached.items() if facts is None]
        for facts in scan_images(folder, missing):
            cached[facts.file_name] = facts
            with self._lock:
                self._facts[keys[facts.file_name]] = facts
                while len(self._facts) > MAX_CACHED_FACTS:
                    del self._facts[next(iter(self._facts))]
        return [cached[name] for name in images]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_images(state: DatasetState, folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UserError(f"'{state.shown(folder)}': not a folder; pick a folder of images.")
    return list_images(folder, recursive=False)


def read_captions(folder: Path, images: list[str]) -> tuple[str | None, CaptionStore | None]:
    """(the folder's caption format or None, its caption store or None when it has no captions yet)."""
    caption_format = folder_caption_format(folder, images)
    if caption_format is None:
        return None, None
    return caption_format, open_folder_captions(folder, images, caption_format)


def list_dataset(state: DatasetState, folder: Path, resolution: int) -> dict[str, Any]:
    """The folder's subfolders, and each image with its caption, pixel size, file size and findings."""
    from lora_scripts.checks.folder import findings_by_image  # imports transformers: only when listing

    images = folder_images(state, folder)
    caption_errors: list[str] = []
    try:
        caption_format, store = read_captions(folder, images)
    except UserError as err:  # a CSV that cannot be parsed: still show the images, and why captions cannot
        caption_format, store, caption_errors = folder_caption_format(folder, images), None, err.messages
    captions = store.existing if store is not None else {}
    facts = state.image_facts(folder, images)
    findings = findings_by_image(facts, captions, resolution=resolution)
    job = state.jobs.latest(state.shown(folder))
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {
        "path": state.shown(folder),
        "folders": subfolders,
        "caption_format": caption_format,
        "caption_file": _caption_file_shown(state, folder, caption_format),
        "caption_errors": caption_errors,  # captions cannot be read (nor edited) until these are fixed
        "resolution": resolution,
        "images": [
            {
                "file_name": f.file_name,
                "caption": captions.get(f.file_name),
                "width": f.width,
                "height": f.height,
                "bytes": (folder / f.file_name).stat().st_size,
                "findings": [{"kind": x.kind, **x.facts} for x in findings[f.file_name]],
            }
            for f in facts
        ],
        "missing": list(store.missing) if store is not None else [],
        "job": job.to_json() if job is not None else None,
    }


def _caption_file_shown(state: DatasetState, folder: Path, caption_format: str | None) -> str | None:
    return state.shown(folder / METADATA_FILE) if caption_format == "csv" else None


def edit_caption(
    state: DatasetState,
    folder: Path,
    file_name: str,
    caption: str,
    *,
    previous: str | None = None,
    caption_format: str | None = None,
    resolution: int = DEFAULT_RESOLUTION,
) -> dict[str, Any]:
    """Write one image's caption. `previous`: the caption the page showed (None: no image had one), checked
    against the file; `caption_format`: where a folder without captions keeps them (default csv)."""
    caption = caption.strip()
    if not caption:
        raise UserError(f"'{file_name}': the caption is empty; write one (training refuses empty captions).")
    images = folder_images(state, folder)
    if file_name not in images:
        raise UserError(f"'{file_name}': no such image in '{state.shown(folder)}'; reload the folder.")
    with state.writing(folder):
        chosen = folder_caption_format(folder, images) or _format(caption_format)
        target = caption_file_of(folder, file_name, chosen)
        backup = state.needs_backup(target)
        store = open_folder_captions(folder, images, chosen, overwrite=True, backup=backup)
        current = store.existing.get(file_name)
        if (current or None) != (previous or None):
            raise UserError(
                f"'{file_name}': its caption changed on disk since the page showed it (now: "
                f"'{current or ''}'); reload the folder and edit again."
            )
        if current != caption:
            store.save({file_name: caption})
            state.record_write(target, backed_up=bool(store.backups) or not backup)
    return {
        "file_name": file_name,
        "caption": caption,
        "caption_format": chosen,
        "backups": [state.shown(path) for path in store.backups],
        "findings": _findings_of(state, folder, images, file_name, caption, resolution),
    }


def _format(caption_format: str | None) -> str:
    if caption_format is None:
        return "csv"
    if caption_format not in CAPTION_FORMATS:
        raise UserError(f"caption_format: '{caption_format}' is not a caption format; use csv or txt.")
    return caption_format


def _findings_of(
    state: DatasetState, folder: Path, images: list[str], file_name: str, caption: str, resolution: int
) -> list[dict[str, Any]]:
    """The findings of one image after its caption changed (duplicates need the folder's other images)."""
    from lora_scripts.checks.folder import findings_by_image

    facts = state.image_facts(folder, images)
    found = findings_by_image(facts, {file_name: caption}, resolution=resolution)[file_name]
    return [{"kind": x.kind, **x.facts} for x in found]


def preview_bulk(state: DatasetState, folder: Path, edit: CaptionEdit) -> EditPlan:
    """What `apply_bulk` would change, without writing."""
    images = folder_images(state, folder)
    _, store = read_captions(folder, images)
    return plan_edits(store.existing if store is not None else {}, edit)


def apply_bulk(
    state: DatasetState, folder: Path, edit: CaptionEdit, expect: dict[str, str] | None = None
) -> tuple[EditPlan, list[Path]]:
    """Apply `edit` to every caption after backing up the caption files it changes; (plan, backups).

    `expect`: file_name -> caption before, as the preview showed them; when the captions changed since,
    nothing is written.
    """
    images = folder_images(state, folder)
    with state.writing(folder):
        caption_format = folder_caption_format(folder, images)
        if caption_format is None:
            raise UserError(f"'{state.shown(folder)}': no captions to edit yet; write or label some first.")
        store = open_folder_captions(folder, images, caption_format, overwrite=True, backup=True)
        plan = plan_edits(store.existing, edit)
        if expect is not None and {c.file_name: c.before for c in plan.changes} != expect:
            raise UserError("The captions changed since the preview; preview the edit again, then apply it.")
        store.save(plan.captions)
        for name in {caption_file_of(folder, c.file_name, caption_format) for c in plan.changes}:
            state.record_write(name, backed_up=True)
    return plan, list(store.backups)


def term_counts(state: DatasetState, folder: Path, kind: str, limit: int) -> list[tuple[str, int]]:
    """The most frequent comma tags (`kind="tags"`, kohya's ss_tag_frequency) or words of the captions."""
    if kind not in ("tags", "words"):
        raise UserError(f"kind: '{kind}' is not a kind of count; use tags or words.")
    images = folder_images(state, folder)
    _, store = read_captions(folder, images)
    captions = [c for c in (store.existing.values() if store is not None else []) if c.strip()]
    return top_terms(captions, kind, n=limit)


def create_folder(state: DatasetState, folder: Path) -> str:
    """Make the folder (its parent must exist); UserError when it exists."""
    shown = state.shown(folder)
    if folder.exists():
        raise UserError(f"'{shown}': already exists; pick it, or choose another name.")
    if not folder.parent.is_dir():
        raise UserError(f"'{shown}': its parent folder does not exist; create that first.")
    folder.mkdir()
    return shown
