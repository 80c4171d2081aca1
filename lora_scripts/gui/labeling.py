"""`lora-scripts label` from the dataset page: the CLI's labeler (captioning/labeler.py) in a background job,
with the same options and the same never-lose-a-caption rules, reporting its progress to the job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_scripts.captioning.labeler import (
    CaptionerOptions,
    LabelOptions,
    LabelSummary,
    label_images,
    load_captioner,
    summary_lines,
)
from lora_scripts.captioning.metadata_csv import folder_caption_format
from lora_scripts.errors import UserError
from lora_scripts.gui.dataset import DatasetState, folder_images
from lora_scripts.gui.jobs import Job

# A Hugging Face hub id: owner/name, letters, digits, "-", "_" and "." (no "..", checked separately).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_source(state: DatasetState, model: str | None) -> str | None:
    """The `--model` the labeler gets: None (the captioner's default), a folder inside a root (named
    ROOT/relative), or a hub id (owner/name, where owner is not a root's name)."""
    if not model or not model.strip():
        return None
    model = model.strip()
    first = model.replace("\\", "/").split("/")[0]
    if first in {root.name for root in state.roots}:
        folder = state.roots.resolve(model, must_exist=True)
        if not folder.is_dir():
            raise UserError(f"model: '{model}' is not a folder; give the folder the model was saved in.")
        return str(folder)
    if _HUB_ID.match(model) and ".." not in model:
        return model
    raise UserError(
        f"model: '{model}' is neither a folder inside a root (ROOT/relative/path) nor a hub id (owner/name)."
    )


def start_label(
    state: DatasetState,
    folder: Path,
    captioner: CaptionerOptions,
    *,
    caption_format: str | None = None,
    trigger: str = "",
    prefix: str = "",
    suffix: str = "",
    overwrite: bool = False,
    prune: bool = False,
    batch_size: int = 8,
) -> Job:
    """Start labeling the images of `folder` into its captions (metadata.csv or .txt, whichever it uses;
    `caption_format`, default csv, for a folder without captions). UserError when another job runs there."""
    images = folder_images(state, folder)
    if not images:
        raise UserError(f"'{state.shown(folder)}': no images to label; upload some first.")
    options = LabelOptions(
        input_dir=folder,
        format=folder_caption_format(folder, images) or caption_format or "csv",
        overwrite=overwrite,
        prune=prune,
        trigger=trigger,
        prefix=prefix,
        suffix=suffix,
        batch_size=batch_size,
        captioner=captioner.name,
    )

    def work(job: Job) -> dict[str, Any]:
        def load():  # noqa: ANN202 - a Captioner
            job.update(phase="loading")
            loaded = load_captioner(captioner)
            job.update(phase="captioning")
            return loaded

        summary = label_images(options, load, progress=lambda done, total: job.update(done=done, total=total))
        return _result(state, summary)

    with state.locked(folder):  # an edit half-written when the labeler reads the captions would be lost
        return state.jobs.start("label", state.shown(folder), work)


def _result(state: DatasetState, summary: LabelSummary) -> dict[str, Any]:
    return {
        "captioned": len(summary.captioned),
        "kept": summary.kept,
        "skipped": [{"file_name": name, "reason": why} for name, why in summary.skipped],
        "missing": summary.missing,
        "backups": [state.shown(path) for path in summary.backups],
        "top_terms": [{"term": term, "count": count} for term, count in summary.top_terms],
        "lines": summary_lines(summary),
    }
