"""The Generate page's endpoints on the tiny model: options (samplers, the library's LoRA names, the base
models the configs train on), a job that renders PNGs with infotext through the CLI's code, the gallery, the
kept pipeline, stop, and the refusals."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from lora_scripts.generation.infotext import parse_infotext, parse_lora_hashes
from lora_scripts.generation.pipeline import load_pipeline
from lora_scripts.generation.samplers import resolve_sampler
from lora_scripts.gui import generating
from lora_scripts.gui.app import create_app
from lora_scripts.gui.generating import PipelineCache
from lora_scripts.gui.server import make_settings
from lora_scripts.models.tiny import build_tiny_sd
from tests.generation.kohya_files import TEXT_ENCODER, UNET_ATTENTION, make_modules, write_kohya_file
from tests.gui.conftest import BASE_URL, csrf_headers

DEADLINE_S = 120


@pytest.fixture(scope="module")
def model_and_lora(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model and a kohya LoRA file for it (ss_output_name ink_painting_v1), built once."""
    folder = tmp_path_factory.mktemp("generate")
    model = build_tiny_sd(folder / "tiny-sd")
    pipe = load_pipeline(
        str(model), resolve_sampler("euler"), device=torch.device("cpu"), dtype=torch.float32
    ).pipe
    modules = make_modules(pipe, UNET_ATTENTION, TEXT_ENCODER, rank=4, alpha=2.0, seed=1)
    lora = write_kohya_file(folder / "lora.safetensors", modules, output_name="ink_painting_v1")
    return model, lora


@pytest.fixture
def work(root: Path, model_and_lora) -> Path:
    """A root with the model under models/ and a finished run's folder holding the LoRA and its config."""
    model, lora = model_and_lora
    shutil.copytree(model, root / "models" / "tiny-sd")
    run = root / "output" / "ink_v1"
    run.mkdir(parents=True)
    (run / "pytorch_lora_weights.safetensors").write_bytes(lora.read_bytes())
    (run / "logs").mkdir()
    config = {"base_model": str(root / "models" / "tiny-sd"), "output_dir": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return root


@pytest.fixture
def gen_client(work: Path) -> TestClient:
    client = TestClient(create_app(make_settings([work], listen=False)), base_url=BASE_URL)
    client.get("/")
    return client


def post(client: TestClient, path: str, body: dict):
    return client.post(path, json=body, headers=csrf_headers(client))


def form(root: Path, **values) -> dict:
    body = {
        "base_model": f"{root.name}/models/tiny-sd",
        "prompt": "ancient temple, <lora:ink_painting_v1:0.7>, ink wash painting",
        "negative_prompt": "blurry",
        "sampler": "euler",
        "steps": 2,
        "seed": 42,
        "width": 64,
        "height": 64,
        "output": f"{root.name}/renders",
    }
    return body | values


def wait_job(client: TestClient) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        job = client.get("/api/generate/job").json()["job"]
        if job["status"] != "running":
            return job
        time.sleep(0.1)
    raise AssertionError("the generate job did not end")


def test_options_offer_samplers_lora_names_and_the_configs_base_models(gen_client, work):
    options = gen_client.get("/api/generate/options").json()
    assert {"key": "euler_a", "name": "Euler a"} in options["samplers"]
    names = {lora["name"]: lora["path"] for lora in options["loras"]}
    # The file's stem and its ss_output_name alias, as WebUI accepts both.
    assert names == {
        "ink_painting_v1": f"{work.name}/output/ink_v1/pytorch_lora_weights.safetensors",
        "pytorch_lora_weights": f"{work.name}/output/ink_v1/pytorch_lora_weights.safetensors",
    }
    assert options["base_models"] == [f"{work.name}/models/tiny-sd"]
    assert (
        options["output"] == f"{work.name}/renders" and options["job"] is None and options["loaded"] is None
    )


def test_generate_renders_pngs_with_infotext_and_keeps_the_pipeline(gen_client, work, monkeypatch):
    loads = []
    real = generating.PipelineCache.get

    def counting(self, key, load):
        return real(self, key, lambda: loads.append(key) or load())

    monkeypatch.setattr(generating.PipelineCache, "get", counting)
    started = post(gen_client, "/api/generate", form(work, num_images=2))
    assert started.status_code == 202, started.text
    job = wait_job(gen_client)
    assert job["status"] == "done", job
    assert (job["done"], job["total"]) == (4, 4)  # 2 images x 2 Euler steps
    images = job["result"]["images"]
    assert [i["name"] for i in images] == ["00000-42.png", "00001-43.png"]
    fields = images[0]["fields"]
    assert (fields["Seed"], fields["Steps"], fields["Sampler"], fields["Size"]) == (
        "42",
        "2",
        "Euler",
        "64x64",
    )
    assert fields["Negative prompt"] == "blurry" and "ink_painting_v1" in parse_lora_hashes(
        fields["Lora hashes"]
    )
    with Image.open(work / "renders" / "00000-42.png") as image:
        assert image.size == (64, 64)
        assert parse_infotext(image.info["parameters"])["Seed"] == "42"

    # The gallery shows the folder newest first; each picture is served under its root.
    gallery = gen_client.get("/api/generate/gallery", params={"folder": f"{work.name}/renders"}).json()
    assert {i["name"] for i in gallery["images"]} == {"00000-42.png", "00001-43.png"}
    png = gen_client.get("/api/generate/image", params={"path": images[0]["path"]})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    # A second request with the same model uses the kept pipeline; a weight grid renders one picture.
    assert gen_client.get("/api/generate/options").json()["loaded"] == f"{work.name}/models/tiny-sd"
    grid = post(gen_client, "/api/generate", form(work, lora_weights="0, 1", seed=5))
    assert grid.status_code == 202
    job = wait_job(gen_client)
    assert job["status"] == "done" and [i["name"] for i in job["result"]["images"]] == ["00002-5-grid.png"]
    assert job["result"]["images"][0]["fields"]["Lora weights"] == "0, 1"
    assert len(loads) == 1
    with Image.open(work / "renders" / "00002-5-grid.png") as grid_image:
        assert grid_image.width >= 128  # two 64 px columns

    # "Free memory" drops it; the next request loads again.
    assert post(gen_client, "/api/generate/unload", {}).json() == {"loaded": None}
    assert gen_client.get("/api/generate/options").json()["loaded"] is None


def test_stop_keeps_the_pictures_already_finished(gen_client, work):
    started = post(gen_client, "/api/generate", form(work, num_images=16, steps=150))
    assert started.status_code == 202
    deadline = time.monotonic() + DEADLINE_S
    while gen_client.get("/api/generate/job").json()["job"]["done"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    busy = post(gen_client, "/api/generate", form(work))
    assert busy.status_code == 400 and "being generated" in busy.json()["errors"][0]
    assert post(gen_client, "/api/generate/stop", {}).status_code == 200
    job = wait_job(gen_client)
    assert job["status"] == "done" and job["result"]["stopped"]
    written = sorted(p.name for p in (work / "renders").glob("*.png")) if (work / "renders").exists() else []
    assert [i["name"] for i in job["result"]["images"]] == written and len(written) < 16
    nothing = post(gen_client, "/api/generate/stop", {})
    assert nothing.status_code == 400 and nothing.json()["errors"] == ["Nothing is being generated."]


def test_mistakes_are_refused_with_one_sentence_each(gen_client, work, tmp_path):
    outside = post(gen_client, "/api/generate", form(work, base_model=str(tmp_path), output="/tmp/x"))
    assert outside.status_code == 400
    errors = outside.json()["errors"]
    assert errors[0].startswith("base_model: '") and "neither a file or folder inside a root" in errors[0]
    assert errors[1].startswith("'/tmp/x': give a path inside a root")
    weights = post(gen_client, "/api/generate", form(work, lora_weights="0,a"))
    assert weights.json()["errors"] == ["lora_weights: 'a' is not a number (write e.g. 0,0.5,0.7,1.0)."]
    steps = post(gen_client, "/api/generate", form(work, steps=0))
    assert steps.status_code == 400 and steps.json()["errors"][0].startswith("steps:")
    # What only the CLI's checks find (an unknown LoRA) ends the job with the CLI's sentence.
    post(gen_client, "/api/generate", form(work, prompt="a cat, <lora:ink_paintin_v1:1>"))
    job = wait_job(gen_client)
    assert job["status"] == "failed"
    assert (
        "no LoRA named 'ink_paintin_v1'" in job["errors"][0]
        and "Did you mean 'ink_painting_v1'" in job["errors"][0]
    )
    assert not (work / "renders").exists()
    sneaky = gen_client.get("/api/generate/image", params={"path": f"{work.name}/output/ink_v1/config.yaml"})
    assert sneaky.status_code == 400
    no_csrf = gen_client.post("/api/generate", json=form(work))
    assert no_csrf.status_code == 403


def test_a_training_run_started_from_the_app_releases_the_kept_pipeline():
    cache = PipelineCache()
    assert cache.get(("a",), lambda: "pipe") == "pipe"
    assert cache.get(("a",), lambda: "other") == "pipe"
    cache.clear()
    assert cache.loaded_key() is None and cache.get(("a",), lambda: "again") == "again"


def test_the_launcher_calls_before_start_just_before_a_run_starts(tmp_path, monkeypatch):
    from lora_scripts.gui import launcher

    order = []
    monkeypatch.setattr(launcher, "_spawn", lambda launch: order.append("spawn") or _Done())
    runs = launcher.RunLauncher(before_start=lambda: order.append("released"))
    runs.submit(tmp_path / "c.yaml", tmp_path / "out", resume=False)
    assert order == ["released", "spawn"]


class _Done:
    returncode = 0

    def poll(self) -> int:
        return 0
