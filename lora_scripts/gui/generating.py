"""`generate` from the web app: the CLI's `run_generate` in a background job, over one pipeline kept loaded
between requests (WebUI keeps its model; loading SDXL anew for every picture would take longer than the
picture), with the LoRA names of the library and a gallery of what the output folder holds.

Generation runs in the server's process, unlike training: a picture is short, and keeping the model loaded is
the point. A training run started from the app releases the kept pipeline first (`PipelineCache.clear`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_scripts.errors import UserError
from lora_scripts.generation.infotext import parse_infotext
from lora_scripts.generation.lora_library import LoraLibrary
from lora_scripts.generation.options import GenerateOptions
from lora_scripts.generation.outputs import read_png_infotext
from lora_scripts.gui.jobs import Job, JobRegistry
from lora_scripts.gui.lora_folders import LoraFolders
from lora_scripts.gui.roots import Roots

# A Hugging Face hub id (owner/name); the model must be in the local cache, as everywhere offline.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GALLERY_LIMIT = 60


class PipelineCache:
    """The last pipeline `generate` loaded, kept for the next request with the same base model (and part
    files), device, dtype and config. `clear` never waits for a render that is using it: that render keeps
    its reference and the memory is freed when it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._loaded: Any = None  # generation.pipeline.LoadedPipeline

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:  # noqa: ANN401 - a LoadedPipeline
        with self._lock:
            if self._key == key:
                return self._loaded
            self._key, self._loaded = None, None  # the old one goes before the new one loads
        loaded = load()
        with self._lock:
            self._key, self._loaded = key, loaded
        return loaded

    def loaded_key(self) -> tuple | None:
        with self._lock:
            return self._key

    def clear(self) -> None:
        with self._lock:
            self._key, self._loaded = None, None


@dataclass
class GenerateState:
    roots: Roots
    folders: LoraFolders
    pipelines: PipelineCache
    jobs: JobRegistry = field(default_factory=JobRegistry)
    stops: dict[str, threading.Event] = field(default_factory=dict)  # the running job's stop flag
    starting: threading.Lock = field(default_factory=threading.Lock)  # one job at a time, also under races

    def base_model(self, text: str) -> str:
        """The base model a request names: a file or diffusers folder inside a root (ROOT/relative/path), or
        a hub id in the local cache (owner/name, where owner is not a root's name)."""
        text = (text or "").strip()
        if not text:
            raise UserError("base_model: give the base model, a file or folder under a root or a hub id.")
        first = text.replace("\\", "/").split("/")[0]
        if first in {root.name for root in self.roots}:
            return str(self.roots.resolve(text, must_exist=True))
        if _HUB_ID.match(text) and ".." not in text:
            return text
        raise UserError(
            f"base_model: '{text}' is neither a file or folder inside a root (ROOT/relative/path) nor a hub "
            "id (owner/name); put the model under a root (--root) or give its hub id."
        )

    def library(self) -> LoraLibrary:
        return LoraLibrary.scan(self.folders.folders())

    def running(self) -> Job | None:
        return next((job for job in self.jobs.all() if job.status == "running"), None)


def start_generate(state: GenerateState, options: GenerateOptions) -> Job:
    """Start rendering `options` in a job (one at a time); the job's result lists the files written."""
    # Imported here: diffusers and torch load when the first picture is asked for, not with the server.
    import torch

    from lora_scripts.generation.generate import load_fresh, run_generate

    stop = threading.Event()

    def keep_loaded(options: GenerateOptions, sampler: Any, device: torch.device, dtype: torch.dtype) -> Any:  # noqa: ANN401
        parts = (options.vae, options.clip_l, options.t5xxl)  # a FLUX.1 single file's other files
        key = (options.base_model, options.base_model_config, *parts, str(device), str(dtype))
        return state.pipelines.get(key, lambda: load_fresh(options, sampler, device, dtype))

    def work(job: Job) -> dict[str, Any]:
        job.update(phase="loading")

        def on_progress(done: int, total: int) -> None:
            job.update(phase="rendering", done=done, total=total)

        result = run_generate(options, load=keep_loaded, on_progress=on_progress, should_stop=stop.is_set)
        return {
            "images": [
                image_json(state.roots, path, text)
                for path, text in zip(result.files, result.infotexts, strict=True)
            ],
            "seed": result.seed,
            "stopped": result.stopped,
        }

    with state.starting:
        if state.running() is not None:
            raise UserError("Images are being generated; wait until they are done, or stop them.")
        job = state.jobs.start("generate", state.roots.name_of(options.output), work)
        state.stops = {job.id: stop}
    return job


def stop_generate(state: GenerateState) -> Job:
    job = state.running()
    if job is None:
        raise UserError("Nothing is being generated.")
    state.stops[job.id].set()
    return job


def image_json(roots: Roots, path: Path, infotext: str | None) -> dict[str, Any]:
    fields = parse_infotext(infotext) if infotext else {}
    return {"path": roots.name_of(path), "name": path.name, "infotext": infotext or "", "fields": fields}


def gallery(roots: Roots, folder: Path, limit: int = GALLERY_LIMIT) -> list[dict[str, Any]]:
    """The newest PNGs of `folder` with their infotext (WebUI's PNG Info), newest first."""
    if not folder.is_dir():
        return []
    pngs = sorted(
        (
            p
            for p in folder.iterdir()
            if p.suffix.lower() == ".png" and p.is_file() and not p.name.startswith(".")
        ),
        key=lambda p: (p.stat().st_mtime, p.name),
        reverse=True,
    )
    images = []
    for path in pngs[:limit]:
        try:
            text = read_png_infotext(path)
        except OSError:
            continue  # being written, or not a PNG after all
        images.append(image_json(roots, path, text))
    return images
