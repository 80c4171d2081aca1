"""Browsing the roots: the folders and images a request may see (everything through `Roots.resolve`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from lora_scripts.data.captions import IMAGE_EXTENSIONS
from lora_scripts.gui.roots import Roots

router = APIRouter(prefix="/api")


def roots_of(request: Request) -> Roots:
    return request.app.state.settings.roots


@router.get("/roots")
async def list_roots(request: Request) -> list[dict[str, str]]:
    return [{"name": root.name, "path": str(root.path)} for root in roots_of(request)]


@router.get("/files")
async def list_folder(request: Request, path: str) -> dict:
    """The subfolders and images of folder `path` (ROOT/relative), sorted by name, hidden ones left out."""
    roots = roots_of(request)
    folder = roots.resolve(path, must_exist=True)
    entries = sorted(
        (p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name.lower()
    )
    return {
        "path": roots.name_of(folder),
        "folders": [p.name for p in entries if p.is_dir()],
        "images": [p.name for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS],
    }
