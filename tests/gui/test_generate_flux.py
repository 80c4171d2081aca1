"""The Generate page with a FLUX.1 single file that lacks its VAE and text encoders (ComfyUI's layout): the
part files given as vae / clip_l / t5xxl under a root, as `generate --vae --clip-l --t5xxl` takes them, render
with the family's sampler and guidance; paths outside the roots are refused. Through the API and in a real
headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lora_scripts.generation.infotext import parse_infotext
from lora_scripts.gui.app import create_app
from lora_scripts.gui.server import make_settings
from lora_scripts.models.tiny import build_tiny_flux, build_tiny_flux_components
from tests.gui.browser import require_chromium, screenshot_dir, served
from tests.gui.conftest import BASE_URL
from tests.gui.test_generate_api import post, wait_job
from tests.helpers.flux_files import write_flux_files
from tests.helpers.ports import free_port

PARTS = {"vae": "ae", "clip_l": "clip_l", "t5xxl": "t5xxl"}  # form field -> write_flux_files' name
RUN_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory) -> Path:
    """models/tiny-flux (the diffusers folder: the configs the tiny single file needs) and models/comfy/
    (the transformer as a BFL single file, ae, clip_l, t5xxl), built once."""
    models = tmp_path_factory.mktemp("flux") / "models"
    build_tiny_flux(models / "tiny-flux")
    files = write_flux_files(build_tiny_flux_components(), models / "comfy")
    for name in ("transformer_fp8", "t5xxl_embed", "all_in_one"):
        files[name].unlink()
    return models


@pytest.fixture
def flux_root(root: Path, flux_models: Path) -> Path:
    shutil.copytree(flux_models, root / "models")
    return root


def flux_form(root: Path, **values) -> dict:
    body = {
        "base_model": f"{root.name}/models/comfy/transformer.safetensors",
        "base_model_config": f"{root.name}/models/tiny-flux",
        "prompt": "ancient temple on mountain peak",
        "steps": 2,
        "seed": 5,
        "width": 64,
        "height": 80,
        "output": f"{root.name}/renders",
    }
    body |= {field: f"{root.name}/models/comfy/{name}.safetensors" for field, name in PARTS.items()}
    return body | values


@pytest.fixture
def flux_client(flux_root: Path) -> TestClient:
    client = TestClient(create_app(make_settings([flux_root], listen=False)), base_url=BASE_URL)
    client.get("/")
    return client


def test_a_flux_single_file_renders_with_its_part_files(flux_client, flux_root):
    started = post(flux_client, "/api/generate", flux_form(flux_root))
    assert started.status_code == 202, started.text
    job = wait_job(flux_client)
    assert job["status"] == "done", job
    [image] = job["result"]["images"]
    fields = image["fields"]
    # Sampler and CFG left empty: FLUX.1's flow-matching Euler and its guidance 3.5.
    assert (fields["Sampler"], fields["CFG scale"], fields["Size"], fields["Seed"]) == (
        "Euler",
        "3.5",
        "64x80",
        "5",
    )
    with Image.open(flux_root / "renders" / image["name"]) as png:
        assert png.size == (64, 80)
    loaded = flux_client.get("/api/generate/options").json()["loaded"]
    assert loaded == f"{flux_root.name}/models/comfy/transformer.safetensors"


def test_part_paths_outside_the_roots_are_refused(flux_client, flux_root, tmp_path):
    outside = tmp_path / "ae.safetensors"
    outside.write_bytes((flux_root / "models" / "comfy" / "ae.safetensors").read_bytes())
    name = flux_root.name
    refused = post(
        flux_client,
        "/api/generate",
        flux_form(
            flux_root,
            vae=str(outside),
            clip_l=f"{name}/../clip_l.safetensors",
            t5xxl=f"{name}/models/comfy",
            base_model_config=f"{name}/models/comfy/ae.safetensors",
        ),
    )
    assert refused.status_code == 400
    assert refused.json()["errors"] == [
        f"vae: '{outside}': give a path inside a root, as ROOT/relative/path.",
        f"clip_l: '{name}/../clip_l.safetensors': '..' is not allowed; give a path inside a root.",
        f"t5xxl: '{name}/models/comfy' is a folder; give the .safetensors file under a root.",
        f"base_model_config: '{name}/models/comfy/ae.safetensors' is a file; give a diffusers-layout config "
        "folder under a root.",
    ]
    missing = post(flux_client, "/api/generate", flux_form(flux_root, t5xxl=f"{name}/models/t5.safetensors"))
    assert missing.json()["errors"] == [f"t5xxl: '{name}/models/t5.safetensors': no such file or folder."]
    assert not (flux_root / "renders").exists()


def test_without_its_part_files_the_single_file_is_refused_by_the_loader(flux_client, flux_root):
    started = post(flux_client, "/api/generate", flux_form(flux_root, vae="", clip_l="", t5xxl=""))
    assert started.status_code == 202
    job = wait_job(flux_client)
    assert job["status"] == "failed" and any("vae" in error for error in job["errors"]), job


def test_the_browser_renders_a_flux_single_file_with_its_part_files(flux_root, tmp_path):
    executable = require_chromium()
    from playwright.sync_api import expect, sync_playwright

    app = create_app(make_settings([flux_root], listen=False))
    name = flux_root.name
    with served(app, free_port()) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url + "#generate")
        page.fill("#generate-base-model", f"{name}/models/comfy/transformer.safetensors")
        page.fill("#generate-prompt", "ancient temple on mountain peak")
        for field, value in (("steps", "2"), ("seed", "9"), ("width", "64"), ("height", "64")):
            page.fill(f"#generate-{field}", value)
        expect(page.locator("#generate-vae")).to_be_hidden()  # folded away until opened
        page.click("#generate-parts summary")
        for field, part in (("vae", "ae"), ("clip-l", "clip_l"), ("t5xxl", "t5xxl")):
            page.fill(f"#generate-{field}", f"{name}/models/comfy/{part}.safetensors")
        page.fill("#generate-base-model-config", f"{name}/models/tiny-flux")
        page.click("#generate-start")
        item = page.locator("#generate-gallery .gallery-item").first
        item.wait_for(timeout=RUN_TIMEOUT_MS)
        fields = parse_infotext(item.locator("pre.infotext").inner_text())
        assert (fields["Seed"], fields["Sampler"], fields["CFG scale"], fields["Size"]) == (
            "9",
            "Euler",
            "3.5",
            "64x64",
        )
        expect(item.locator("img")).to_have_js_property("naturalWidth", 64)  # waits for the picture to load
        expect(page.locator("#generate-status")).to_contain_text("seed 9")
        page.locator("#part-generate").screenshot(path=screenshot_dir(tmp_path) / "generate_flux.png")

        # A part file outside the roots: the page shows the server's sentence beside the form.
        page.fill("#generate-vae", "/etc/ae.safetensors")
        page.click("#generate-start")
        expect(page.locator("#generate-errors")).to_contain_text(
            "vae: '/etc/ae.safetensors': give a path inside a root"
        )
        browser.close()
