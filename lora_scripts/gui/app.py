"""The FastAPI application: security guards, the pages, the static files, and one router per part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from lora_scripts import __version__
from lora_scripts.errors import UserError
from lora_scripts.gui import config_api, dataset_api, files_api, generate_api, library_api, runs_api
from lora_scripts.gui.generate_api import PipelineCache
from lora_scripts.gui.i18n import LANGUAGES, pick_language, strings
from lora_scripts.gui.lora_folders import LoraFolders
from lora_scripts.gui.roots import Roots
from lora_scripts.gui.security import SecurityMiddleware, SecuritySettings

HERE = Path(__file__).parent
LANGUAGE_COOKIE = "lora_scripts_lang"


@dataclass(frozen=True)
class GuiSettings:
    roots: Roots
    security: SecuritySettings
    max_upload_bytes: int = 50 * 2**20  # one uploaded image at most (--max-upload-mb)
    webui_lora_dir: Path | None = None  # WebUI's models/Lora (--webui-lora-dir), resolved

    def lora_folders(self) -> LoraFolders:
        return LoraFolders(self.roots, self.webui_lora_dir)


def create_app(settings: GuiSettings) -> FastAPI:
    app = FastAPI(title="lora-scripts", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.add_middleware(SecurityMiddleware, settings=settings.security)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError) -> JSONResponse:
        return JSONResponse({"errors": list(err.messages)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        """A missing or ill-typed parameter: one sentence per problem, in the app's error shape."""
        messages = []
        for problem in err.errors():
            where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "request"
            messages.append(f"{where}: {problem.get('msg')}.")
        return JSONResponse({"errors": messages}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        language = pick_language(request.cookies.get(LANGUAGE_COOKIE), request.headers.get("accept-language"))
        return templates.TemplateResponse(
            request,
            "index.html",
            {
                "t": strings(language),
                "language": language,
                "languages": LANGUAGES,
                "csrf_token": settings.security.csrf_token,
                "version": __version__,
            },
        )

    @app.get("/api/i18n/{language}")
    async def i18n(language: str) -> dict[str, str]:
        return strings(language)

    app.include_router(files_api.router)
    app.include_router(dataset_api.router_for(settings))
    app.include_router(config_api.router_for(settings))
    # One generate pipeline stays loaded between requests (as WebUI keeps its model); a training run started
    # here releases it first, so the two never share the GPU's memory.
    pipelines = PipelineCache()
    app.include_router(runs_api.router_for(settings, before_start=pipelines.clear))
    app.include_router(generate_api.router_for(settings, pipelines))
    app.include_router(library_api.router_for(settings))
    return app
