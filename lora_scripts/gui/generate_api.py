"""The Generate page's endpoints. The work is in gui/generating.py (over generation/generate.py).

GET  /api/generate/options            samplers, the library's LoRA names, base models the configs use, the job
POST /api/generate                    {base_model, prompt, ...}: start rendering (202 {job}); a FLUX.1
                                      single file's vae / clip_l / t5xxl files and base_model_config, as
                                      `generate --vae --clip-l --t5xxl --base-model-config`, are optional
GET  /api/generate/job                the latest generate job (status, progress, images)
POST /api/generate/stop               stop after the current step (the images finished are kept)
POST /api/generate/unload             release the kept pipeline's memory
GET  /api/generate/gallery?folder=    the newest PNGs of an output folder with their infotext
GET  /api/generate/image?path=        one PNG under a root
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Body
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lora_scripts.errors import UserError
from lora_scripts.generation.options import MAX_SEED, GenerateOptions, parse_weight_list
from lora_scripts.gui.dataset_api import parse
from lora_scripts.gui.generating import GenerateState, PipelineCache, gallery, start_generate, stop_generate
from lora_scripts.gui.runs_api import MAX_CONFIGS
from lora_scripts.training.runs import find_runs

__all__ = ["PipelineCache", "router_for"]
DEFAULT_OUTPUT = "renders"  # under the first root


class GenerateBody(BaseModel):
    """The page's form; the limits are the page's, the CLI's checks (run_generate) apply on top."""

    model_config = ConfigDict(extra="forbid")
    base_model: str
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    sampler: str = ""  # "": the model's default (euler_a; FLUX.1: euler)
    steps: int = Field(30, ge=1, le=150)
    cfg_scale: float | None = Field(None, ge=0, le=30)  # None: the model's (7; FLUX.1's guidance 3.5)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    num_images: int = Field(1, ge=1, le=16)
    lora_weights: str = ""  # "0,0.5,1": one grid column per weight
    output: str  # ROOT/folder
    precision: str = "auto"
    # A FLUX.1 single file without its VAE and text encoders: their files (ROOT/relative/path), and a
    # diffusers-layout config folder for a non-standard single file; "": none (the CLI's defaults).
    vae: str = ""
    clip_l: str = ""
    t5xxl: str = ""
    base_model_config: str = ""


# The optional paths of the form: a part file (True) or a config folder (False), each under a root.
PART_PATHS = {"vae": True, "clip_l": True, "t5xxl": True, "base_model_config": False}


def router_for(settings: Any, pipelines: PipelineCache) -> APIRouter:  # noqa: ANN401 - GuiSettings
    state = GenerateState(settings.roots, settings.lora_folders(), pipelines)
    routes = GenerateRoutes(state)
    router = APIRouter(prefix="/api")
    router.add_api_route("/generate/options", routes.options, methods=["GET"])
    router.add_api_route("/generate", routes.start, methods=["POST"])
    router.add_api_route("/generate/job", routes.job, methods=["GET"])
    router.add_api_route("/generate/stop", routes.stop, methods=["POST"])
    router.add_api_route("/generate/unload", routes.unload, methods=["POST"])
    router.add_api_route("/generate/gallery", routes.gallery, methods=["GET"])
    router.add_api_route("/generate/image", routes.image, methods=["GET"])
    return router


class GenerateRoutes:
    def __init__(self, state: GenerateState) -> None:
        self.state = state

    def options(self) -> dict[str, Any]:
        from lora_scripts.generation.samplers import SAMPLERS  # imports diffusers: on first use only

        first_root = next(iter(self.state.roots)).name
        latest = self.state.jobs.latest()
        return {
            "samplers": [{"key": s.key, "name": s.display_name} for s in SAMPLERS.values()],
            "loras": self._lora_names(),
            "base_models": self._base_models(),
            "output": f"{first_root}/{DEFAULT_OUTPUT}",
            "loaded": self._loaded_model(),
            "job": latest.to_json() if latest else None,
        }

    def start(self, body: Any = Body(None)) -> JSONResponse:  # noqa: B008 - FastAPI's idiom
        request = parse(GenerateBody, body)
        problems: list[str] = []
        base_model = output = None
        weights = None
        try:
            base_model = self.state.base_model(request.base_model)
        except UserError as err:
            problems.extend(err.messages)
        try:
            output = self.state.roots.resolve(request.output)
            if output.exists() and not output.is_dir():
                raise UserError(f"output: '{request.output}' is a file; give a folder under a root.")
        except UserError as err:
            problems.extend(err.messages)
        parts: dict[str, str | None] = {}
        for key, is_file in PART_PATHS.items():
            try:
                parts[key] = self._part_path(key, getattr(request, key), is_file=is_file)
            except UserError as err:
                problems.extend(err.messages)
        if request.lora_weights.strip():
            try:
                weights = parse_weight_list(request.lora_weights.replace("--lora-weights", "lora_weights"))
            except UserError as err:
                problems.extend(message.replace("--lora-weights", "lora_weights") for message in err.messages)
        if problems:
            raise UserError(problems)
        options = GenerateOptions(
            base_model=base_model,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            lora_dirs=self.state.folders.folders(),
            steps=request.steps,
            cfg_scale=request.cfg_scale,
            seed=request.seed,
            width=request.width,
            height=request.height,
            sampler=request.sampler or None,
            num_images=request.num_images,
            lora_weights=weights,
            output=output,
            precision=request.precision,  # type: ignore[arg-type] - run_generate refuses an unknown one
            progress=False,
            vae=parts["vae"],
            clip_l=parts["clip_l"],
            t5xxl=parts["t5xxl"],
            base_model_config=parts["base_model_config"],
        )
        job = start_generate(self.state, options)
        return JSONResponse({"job": job.to_json()}, status_code=202)

    def job(self) -> dict[str, Any]:
        latest = self.state.jobs.latest()
        return {"job": latest.to_json() if latest else None}

    def stop(self) -> dict[str, Any]:
        return {"job": stop_generate(self.state).to_json()}

    def unload(self) -> dict[str, Any]:
        self.state.pipelines.clear()
        return {"loaded": None}

    def gallery(self, folder: str = "") -> dict[str, Any]:
        path = self.state.roots.resolve(folder)
        return {"folder": folder, "images": gallery(self.state.roots, path)}

    def image(self, path: str = "") -> FileResponse:
        file = self.state.roots.resolve(path, must_exist=True)
        if not file.is_file() or file.suffix.lower() != ".png":
            raise UserError(f"'{path}': not a PNG image under a root.")
        return FileResponse(file, media_type="image/png")

    # --- helpers ---

    def _part_path(self, key: str, text: str, *, is_file: bool) -> str | None:
        """The file (or, not `is_file`, the folder) an optional path field names under a root; None for ""."""
        if not text.strip():
            return None
        try:
            path = self.state.roots.resolve(text.strip(), must_exist=True)
        except UserError as err:
            raise UserError([f"{key}: {message}" for message in err.messages]) from None
        if is_file and not path.is_file():
            raise UserError(f"{key}: '{text}' is a folder; give the .safetensors file under a root.")
        if not is_file and not path.is_dir():
            raise UserError(f"{key}: '{text}' is a file; give a diffusers-layout config folder under a root.")
        return str(path)

    def _lora_names(self) -> list[dict[str, str]]:
        """The names a `<lora:NAME>` tag can use, each with the file it means (names that two different
        files answer to are left out: the tag would be refused)."""
        try:
            library = self.state.library()
        except UserError:
            return []
        names = []
        for name in library.names():
            try:
                file = library.resolve(name)
            except UserError:
                continue
            names.append({"name": name, "path": self.state.folders.shown(file.path)})
        return names

    def _base_models(self) -> list[str]:
        """The base models the runs and the configs under the roots train on, as the page names them."""
        configs = [run.config_path for run in find_runs([root.path for root in self.state.roots])]
        for root in self.state.roots:
            configs += sorted(root.path.glob("*.yaml")) + sorted(root.path.glob("*/*.yaml"))
        found: dict[str, None] = {}
        for config in [c for c in configs if c is not None][:MAX_CONFIGS]:
            name = self._model_name(_configured_base_model(config))
            if name:
                found[name] = None
        return list(found)

    def _model_name(self, value: str | None) -> str | None:
        if not value:
            return None
        path = Path(value).expanduser()
        if path.exists():
            try:
                return self.state.roots.name_of(path)
            except UserError:
                return None  # outside every root: the page could not name it
        try:
            return self.state.base_model(value)
        except UserError:
            return None

    def _loaded_model(self) -> str | None:
        key = self.state.pipelines.loaded_key()
        return self._model_name(key[0]) or key[0] if key else None


def _configured_base_model(config: Path) -> str | None:
    """The `base_model` of a YAML config, read plainly: a broken config gives None."""
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("base_model")
    return value if isinstance(value, str) else None
