"""The Train page's endpoints: start, queue, watch, stop and resume training runs.

Runs are separate processes (gui/launcher.py); everything shown is read from their output folders
(training/runs.py), so a closed browser or a restarted server loses nothing.

POST /api/runs                {config: ROOT/x.yaml}: start it (or queue it behind the running one)
POST /api/runs/resume         {path: ROOT/output_dir}: `train --resume auto` with the run's config, queued
POST /api/runs/stop           {path}: stop as Ctrl-C does (or take it out of the queue)
GET  /api/runs                {runs: [...], queue: [...], configs: [ROOT/x.yaml, ...]}
GET  /api/runs/detail?path=   one run: status, step, total, rate, eta, curves, samples, log tail
GET  /api/runs/events?path=&offset=   progress events from a byte offset, for polling
GET  /api/runs/sample?path=   one sample image (a PNG under a root)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.gui.dataset_api import parse
from lora_scripts.gui.launch_record import LaunchStore
from lora_scripts.gui.launcher import Launch, RunLauncher
from lora_scripts.gui.roots import Roots
from lora_scripts.training.runs import RunInfo, find_runs, read_events, read_run

CONFIG_SUFFIXES = (".yaml", ".yml")
MAX_CONFIGS = 200


class StartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str  # ROOT/relative.yaml


class PathBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # ROOT/output_dir


def router_for(settings: Any, before_start: Callable[[], None] = lambda: None) -> APIRouter:  # noqa: ANN401
    """The routes over `settings` (GuiSettings; app.py imports this module); `before_start` runs, without
    blocking, just before a run's process starts (the app frees the generate pipeline's memory)."""
    routes = RunRoutes(settings.roots, before_start)
    router = APIRouter(prefix="/api")
    router.add_api_route("/runs", routes.list_runs, methods=["GET"])
    router.add_api_route("/runs", routes.start, methods=["POST"])
    router.add_api_route("/runs/resume", routes.resume, methods=["POST"])
    router.add_api_route("/runs/stop", routes.stop, methods=["POST"])
    router.add_api_route("/runs/detail", routes.detail, methods=["GET"])
    router.add_api_route("/runs/events", routes.events, methods=["GET"])
    router.add_api_route("/runs/sample", routes.sample, methods=["GET"])
    return router


class RunRoutes:
    def __init__(self, roots: Roots, before_start: Callable[[], None] = lambda: None) -> None:
        self.roots = roots
        store = LaunchStore(next(iter(roots)).path)
        self.launcher = RunLauncher(self._any_running, before_start, store)

    def list_runs(self) -> dict[str, Any]:
        runs = find_runs([root.path for root in self.roots])
        found = {run.output_dir.resolve() for run in runs}
        launches = self.launcher.launches()
        queued = [self._launch_json(launch) for launch in launches if launch.state == "queued"]
        # A run that ended before writing any progress (a config error, a crash while loading) is not a
        # run folder yet; the page still shows it, with its log.
        unseen = [
            self._launch_json(launch)
            for launch in launches
            if launch.state != "queued" and not launch.dequeued and launch.output_dir.resolve() not in found
        ]
        return {
            "runs": unseen + [self._run_json(run, brief=True) for run in runs],
            "queue": queued,
            "configs": self._configs(),
        }

    def start(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        request = parse(StartBody, body)
        config_path = self._config_file(request.config)
        return self._submit(config_path, self._output_dir_of(config_path), resume=False)

    def resume(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008
        request = parse(PathBody, body)
        output_dir = self._run_folder(request.path)
        run = read_run(output_dir, log_lines=0)
        if run.status == "running":
            raise UserError(f"'{request.path}': the run is still going; stop it first.")
        if not run.states:
            raise UserError(f"'{request.path}': no saved training state to resume from.")
        if run.config_path is None or not run.config_path.is_file():
            raise UserError(f"'{request.path}': the config it was started with is gone; start it again.")
        return self._submit(run.config_path, output_dir, resume=True)

    def stop(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008
        request = parse(PathBody, body)
        output_dir = self.roots.resolve(request.path)
        outcome = self.launcher.stop(output_dir)
        if outcome == "none":
            raise UserError(f"'{request.path}': no run is going or queued there.")
        return {"path": self.roots.name_of(output_dir), "stop": outcome}

    def detail(self, path: str = "") -> dict[str, Any]:
        return self._run_json(read_run(self._run_folder(path), log_lines=200), brief=False)

    def events(self, path: str = "", offset: int = 0) -> dict[str, Any]:
        events, next_offset = read_events(self._run_folder(path), max(0, offset))
        return {"events": events, "offset": next_offset}

    def sample(self, path: str = "") -> FileResponse:
        file = self.roots.resolve(path, must_exist=True)
        if not file.is_file() or file.suffix.lower() != ".png" or file.parent.name != "sample":
            raise UserError(f"'{path}': not a sample image (sample/*.png in a run's folder).")
        return FileResponse(file, media_type="image/png")

    # --- helpers ---

    def _submit(self, config_path: Path, output_dir: Path, *, resume: bool) -> dict[str, Any]:
        launch = self.launcher.submit(config_path, output_dir, resume=resume)
        return self._launch_json(launch)

    def _any_running(self) -> bool:
        return any(run.status == "running" for run in find_runs([root.path for root in self.roots]))

    def _config_file(self, path: str) -> Path:
        file = self.roots.resolve(path, must_exist=True)
        if not file.is_file() or not file.name.lower().endswith(CONFIG_SUFFIXES):
            raise UserError(f"'{path}': not a config file; give a .yaml file under a root.")
        return file

    def _output_dir_of(self, config_path: Path) -> Path:
        """The config's output_dir, which must lie under a root (else the page could not watch the run).
        The config is read as `train` reads it, so a broken one is refused here with the CLI's sentences."""
        output_dir = Path(load_config(config_path).output_dir).resolve()
        try:
            self.roots.name_of(output_dir)
        except UserError:
            raise UserError(
                f"{config_path.name}: output_dir {output_dir} is outside every root; the page could not "
                "watch the run. Put it under a root (--root)."
            ) from None
        return output_dir

    def _run_folder(self, path: str) -> Path:
        folder = self.roots.resolve(path, must_exist=True)
        if not folder.is_dir():
            raise UserError(f"'{path}': not a folder; give a run's output_dir.")
        return folder

    def _configs(self) -> list[str]:
        """The config files under the roots (a few levels down), for the page's picker."""
        found: list[str] = []
        for root in self.roots:
            for pattern in ("*.yaml", "*/*.yaml", "*/*/*.yaml"):
                for file in sorted(root.path.glob(pattern)):
                    hidden = any(part.startswith(".") for part in file.relative_to(root.path).parts)
                    if file.name != "config.yaml" and not hidden and len(found) < MAX_CONFIGS:
                        found.append(self.roots.name_of(file))
        return found

    def _name(self, path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            return self.roots.name_of(path)
        except UserError:
            return None

    def _launch_json(self, launch: Launch) -> dict[str, Any]:
        status = {"queued": "queued", "running": "starting"}.get(launch.state, "failed")
        if launch.state == "ended" and launch.returncode in (0, 130):
            status = "stopped" if launch.returncode == 130 else "finished"
        elif launch.state == "ended" and launch.returncode is None:
            status = "stopped" if launch.dequeued else "unknown"  # "unknown": it was going at a restart
        return {
            "path": self._name(launch.output_dir),
            "config": self._name(launch.config_path),
            "status": status,
            "resume": launch.resume,
            "returncode": launch.returncode,
        }

    def _run_json(self, run: RunInfo, *, brief: bool) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "path": self._name(run.output_dir),
            "name": run.output_dir.name,
            "status": run.status,
            "message": run.message,
            "config": self._name(run.config_path) if run.config_path else None,
            "step": run.step,
            "total": run.total_steps,
            "epoch": run.epoch,
            "epochs": run.epochs,
            "rate": run.rate,
            "eta": run.eta_s,
            "updated": run.updated,
            "resumable": run.resumable,
        }
        if brief:
            return facts
        return facts | {
            "steps": run.steps,
            "loss": run.loss,
            "lr": run.lr,
            "samples": [
                {"step": s.step, "prompt": s.prompt_index, "path": self._name(s.path)} for s in run.samples
            ],
            "lora_files": [p.name for p in run.lora_files],
            "states": [s.step for s in run.states],
            "log": run.log_tail,
        }
