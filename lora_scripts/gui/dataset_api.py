"""The dataset page's endpoints (JSON; every path is ROOT/relative and goes through `Roots.resolve`).

GET  /api/dataset?path=&resolution=         the folder: subfolders, images with caption, size, findings
GET  /api/dataset/thumbnail?path=&size=     one image as a JPEG thumbnail (ETag; 304 when unchanged)
PUT  /api/dataset/caption                   one caption: {path, file_name, caption, previous, caption_format}
POST /api/dataset/bulk/preview              {path, operation, text, find, replace}: the changes, unwritten
POST /api/dataset/bulk/apply                the same plus {expect}: writes them after a backup
GET  /api/dataset/tags?path=&kind=&limit=   tag (or word) counts of the captions
POST /api/dataset/folder                    {path}: a new folder
POST /api/dataset/upload?path=              multipart `files`: images kept in the folder
POST /api/dataset/label                     {path, captioner, ...}: starts a label job (202)
GET  /api/jobs/{id}                         a job's status, phase, progress, errors and result

The work is in gui/dataset.py, gui/uploads.py and gui/labeling.py; this module reads requests and shapes
answers. Mistakes are UserErrors: 400 {"errors": [one sentence each]}, also for a malformed body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Body, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from lora_scripts.captioning.edits import CaptionEdit, EditPlan
from lora_scripts.captioning.labeler import CaptionerOptions
from lora_scripts.data.captions import IMAGE_EXTENSIONS
from lora_scripts.errors import UserError
from lora_scripts.gui import dataset, labeling, uploads
from lora_scripts.gui.dataset import DEFAULT_RESOLUTION, DatasetState
from lora_scripts.gui.thumbnails import DEFAULT_SIDE

MAX_FILES_PER_UPLOAD = 100
MULTIPART_OVERHEAD = 1 << 20  # headers and boundaries a request may add to the files it carries
M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


class CaptionBody(_Body):
    file_name: str
    caption: str
    previous: str | None = None  # the caption the page showed; None: none
    caption_format: Literal["csv", "txt"] | None = None  # for a folder without captions yet
    resolution: int = Field(DEFAULT_RESOLUTION, ge=64, le=8192)


class BulkBody(_Body):
    operation: str
    text: str = ""
    find: str = ""
    replace: str = ""
    expect: dict[str, str] | None = None  # apply: file_name -> caption before, from the preview


class FolderBody(_Body):
    pass


class LabelBody(_Body):
    """The options of `lora-scripts label` (cli.py), by their long names with "_" for "-"."""

    captioner: Literal["blip", "wd14"] = "blip"
    model: str | None = None
    device: str | None = None
    batch_size: int = Field(8, ge=1, le=512)
    num_beams: int = Field(1, ge=1, le=16)
    max_new_tokens: int = Field(40, ge=1, le=512)
    threshold: float = Field(0.35, ge=0, le=1)
    character_threshold: float = Field(0.85, ge=0, le=1)
    exclude_tags: str = ""
    trigger: str = ""
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False
    prune: bool = False
    caption_format: Literal["csv", "txt"] | None = None


def parse(model: type[M], body: Any) -> M:
    """`body` checked against `model`; UserError with one sentence per problem."""
    try:
        return model.model_validate(body if body is not None else {})
    except ValidationError as err:
        raise UserError(
            [
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg'][0].lower()}{e['msg'][1:]}."
                for e in err.errors()
            ]
        ) from None


def whole_number(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}: '{text}' is not a whole number; give one from {low} to {high}.") from None
    if not low <= value <= high:
        raise UserError(f"{name}: {value} is out of range; give one from {low} to {high}.")
    return value


def plan_json(plan: EditPlan) -> dict[str, Any]:
    return {
        "changes": [{"file_name": c.file_name, "before": c.before, "after": c.after} for c in plan.changes],
        "unchanged": plan.unchanged,
        "skipped": [{"file_name": name, "reason": why} for name, why in plan.skipped],
    }


def router_for(settings: Any) -> APIRouter:  # noqa: ANN401 - GuiSettings (app.py imports this module)
    """The dataset endpoints of one app, sharing one DatasetState (caches, jobs, locks)."""
    state = DatasetState(
        roots=settings.roots,
        max_upload_bytes=settings.max_upload_bytes,
    )
    routes = DatasetRoutes(state)
    router = APIRouter(prefix="/api")
    router.add_api_route("/dataset", routes.listing, methods=["GET"])
    router.add_api_route("/dataset/thumbnail", routes.thumbnail, methods=["GET"])
    router.add_api_route("/dataset/caption", routes.caption, methods=["PUT"])
    router.add_api_route("/dataset/bulk/preview", routes.bulk_preview, methods=["POST"])
    router.add_api_route("/dataset/bulk/apply", routes.bulk_apply, methods=["POST"])
    router.add_api_route("/dataset/tags", routes.tags, methods=["GET"])
    router.add_api_route("/dataset/folder", routes.folder, methods=["POST"])
    router.add_api_route("/dataset/upload", routes.upload, methods=["POST"])
    router.add_api_route("/dataset/label", routes.label, methods=["POST"], status_code=202)
    router.add_api_route("/jobs/{job_id}", routes.job, methods=["GET"])
    return router


class DatasetRoutes:
    """The endpoint functions (sync ones run in FastAPI's thread pool: they read and write files)."""

    def __init__(self, state: DatasetState) -> None:
        self.state = state

    def folder_of(self, path: str) -> Path:
        folder = self.state.roots.resolve(path, must_exist=True)
        if not folder.is_dir():
            raise UserError(f"'{path}': not a folder; pick a folder of images.")
        return folder

    def listing(self, path: str = "", resolution: str = str(DEFAULT_RESOLUTION)) -> dict[str, Any]:
        size = whole_number("resolution", resolution, 64, 8192)
        return dataset.list_dataset(self.state, self.folder_of(path), size)

    def thumbnail(self, request: Request, path: str = "", size: str = str(DEFAULT_SIDE)) -> Response:
        image = self.state.roots.resolve(path, must_exist=True)
        if not image.is_file() or not image.name.lower().endswith(IMAGE_EXTENSIONS):
            raise UserError(f"'{path}': not an image file.")
        data, etag = self.state.thumbnails.get(image, whole_number("size", size, 16, 4096))
        headers = {"ETag": etag, "Cache-Control": "no-cache"}  # revalidate: a replaced image shows at once
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    def caption(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        edit = parse(CaptionBody, body)
        return dataset.edit_caption(
            self.state,
            self.folder_of(edit.path),
            edit.file_name,
            edit.caption,
            previous=edit.previous,
            caption_format=edit.caption_format,
            resolution=edit.resolution,
        )

    def bulk_preview(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008
        bulk = parse(BulkBody, body)
        edit = CaptionEdit(bulk.operation, text=bulk.text, find=bulk.find, replace=bulk.replace)
        return plan_json(dataset.preview_bulk(self.state, self.folder_of(bulk.path), edit))

    def bulk_apply(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008
        bulk = parse(BulkBody, body)
        edit = CaptionEdit(bulk.operation, text=bulk.text, find=bulk.find, replace=bulk.replace)
        plan, backups = dataset.apply_bulk(self.state, self.folder_of(bulk.path), edit, bulk.expect)
        shown = [self.state.shown(path) for path in backups]
        return {**plan_json(plan), "written": len(plan.changes), "backups": shown}

    def tags(self, path: str = "", kind: str = "tags", limit: str = "200") -> dict[str, Any]:
        count = whole_number("limit", limit, 1, 100_000)
        terms = dataset.term_counts(self.state, self.folder_of(path), kind, count)
        return {"kind": kind, "terms": [{"term": term, "count": n} for term, n in terms]}

    def folder(self, body: Any = Body(None)) -> dict[str, str]:  # noqa: B008
        target = self.state.roots.resolve(parse(FolderBody, body).path)
        return {"path": dataset.create_folder(self.state, target)}

    async def upload(self, request: Request, path: str = "") -> dict[str, Any]:
        """Each file on its own: the ones that pass are kept even when others are refused (400 then names
        both). The page sends one file per request, so its progress and errors are per file."""
        folder = self.folder_of(path)
        limit = self.state.max_upload_bytes
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise UserError("The upload has no Content-Length; send it from the page or with its length.")
        if int(length) > limit + MULTIPART_OVERHEAD:
            size, most = uploads.file_size(int(length)), uploads.file_size(limit)
            raise UserError(
                f"The upload is {size}, over the limit of {most} per file; send images one at a time, each "
                "under the limit."
            )
        saved, errors = [], []
        async with request.form(max_files=MAX_FILES_PER_UPLOAD, max_fields=10) as form:
            files = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
            if not files:
                raise UserError("The upload holds no files; send them in the form field 'files'.")
            for item in files:
                try:
                    name = await run_in_threadpool(
                        uploads.save_upload,
                        folder,
                        self.state.shown(folder),
                        item.filename or "",
                        item.file,
                        limit,
                    )
                    saved.append(name)
                except UserError as err:
                    errors += err.messages
        if errors:
            kept = [f"Kept the other files: {', '.join(saved)}."] if saved else []
            raise UserError(errors + kept)
        return {"path": self.state.shown(folder), "saved": saved}

    def label(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008
        options = parse(LabelBody, body)
        captioner = CaptionerOptions(
            name=options.captioner,
            model=labeling.model_source(self.state, options.model),
            device=options.device or None,
            max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams,
            threshold=options.threshold,
            character_threshold=options.character_threshold,
            exclude_tags=tuple(t.strip() for t in options.exclude_tags.split(",") if t.strip()),
        )
        job = labeling.start_label(
            self.state,
            self.folder_of(options.path),
            captioner,
            caption_format=options.caption_format,
            trigger=options.trigger,
            prefix=options.prefix,
            suffix=options.suffix,
            overwrite=options.overwrite,
            prune=options.prune,
            batch_size=options.batch_size,
        )
        return {"job": job.to_json()}

    def job(self, job_id: str) -> dict[str, Any]:
        return self.state.jobs.get(job_id).to_json()
