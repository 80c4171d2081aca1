"""The LoRA library page's endpoints (the logic is gui/library.py).

GET  /api/library                 {webui: {name, path} | null, files: [facts, ...]} newest first
GET  /api/library/detail?path=    `lora-scripts inspect`'s report of one file (reads the whole file)
POST /api/library/copy            {path, name?}: copy into the WebUI folder as <name>.safetensors, with a
                                  preview and WebUI's <name>.json when there are none; never replaces a file
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict

from lora_scripts.gui import library
from lora_scripts.gui.dataset_api import parse


class CopyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # ROOT/... or WebUI/... as the listing names the file
    name: str | None = None  # the name in the WebUI folder, without .safetensors; default: alias or stem


def router_for(settings: Any) -> APIRouter:  # noqa: ANN401 - GuiSettings (app.py imports this module)
    folders = settings.lora_folders()
    router = APIRouter(prefix="/api")

    # Plain `def` routes: FastAPI runs them in its thread pool, so reading and copying files (a LoRA of
    # hundreds of MB) never blocks the server's event loop.
    @router.get("/library")
    def listing() -> dict[str, Any]:
        return library.list_library(folders)

    @router.get("/library/detail")
    def detail(path: str = "") -> dict[str, Any]:
        return library.detail(folders, path)

    @router.post("/library/copy")
    def copy(body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        request = parse(CopyBody, body)
        return library.copy_to_webui(folders, request.path, request.name)

    return router
