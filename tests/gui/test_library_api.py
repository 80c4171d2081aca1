"""The LoRA library's endpoints on fake runs: a run folder with a kohya LoRA (random weights on SD 1.5's real
layer shapes, so `inspect` resolves it) and sample images, and a WebUI LoRA folder to copy into."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from lora_scripts.export.hashes import precalculate_hashes
from lora_scripts.gui.app import create_app
from lora_scripts.gui.server import make_settings
from lora_scripts.models.meta_modules import meta_model
from tests.gui.conftest import BASE_URL, csrf_headers
from tests.helpers.synthetic_lora import synthetic_kohya

FILE = "pytorch_lora_weights.safetensors"
METADATA = {
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "ss_sd_model_name": "runwayml/stable-diffusion-v1-5",
    "ss_output_name": "ink_painting_v1",
    "ss_network_dim": "4",
    "ss_network_alpha": "2",
    "ss_steps": "120",
    "ss_epoch": "3",
    "ss_resolution": "(512, 512)",
    "ss_dataset_dirs": json.dumps({"10_ink": {"n_repeats": 10, "img_count": 4}}),
    # "inkstyle" is in all 4 captions: the trigger word
    "ss_tag_frequency": json.dumps({"10_ink": {"inkstyle": 4, "mountain": 3, "cat": 1}}),
}


@pytest.fixture(scope="module")
def lora_tensors() -> dict[str, torch.Tensor]:
    return synthetic_kohya(meta_model("sd_v1"), rank=4, alpha=2.0, text_encoder=False, odd_alpha_every=10**6)


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    meta = dict(metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_hashes(tensors, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    return path


def make_run(root: Path, tensors: dict[str, torch.Tensor], name: str = "ink", **metadata: str) -> Path:
    """A finished run's folder as find_runs knows it: config.yaml beside the LoRA files, samples, a state."""
    run = root / "output" / name
    (run / "sample").mkdir(parents=True)
    (run / "config.yaml").write_text("output_name: ink_painting_v1\n", encoding="utf-8")
    save_lora(run / FILE, tensors, METADATA | metadata)
    for step, colour in ((60, b"early"), (120, b"final")):
        for prompt in (0, 1):
            (run / "sample" / f"ink_painting_v1_s{step:06d}_p{prompt:02d}_a_cat.png").write_bytes(
                b"\x89PNG" + colour + bytes([prompt])
            )
    # A training state's LoRA is for resuming only: never listed.
    (run / "state" / "step-120").mkdir(parents=True)
    (run / "state" / "step-120" / "progress.json").write_text("{}", encoding="utf-8")
    save_lora(run / "state" / "step-120" / "lora.safetensors", tensors, {})
    return run


def app_client(root: Path, webui: Path | None) -> TestClient:
    app = create_app(make_settings([root], listen=False, webui_lora_dir=webui))
    client = TestClient(app, base_url=BASE_URL)
    client.get("/")
    return client


def copy(client: TestClient, body: dict):
    return client.post("/api/library/copy", json=body, headers=csrf_headers(client))


@pytest.fixture
def webui(tmp_path: Path) -> Path:
    folder = tmp_path / "stable-diffusion-webui" / "models" / "Lora"
    folder.mkdir(parents=True)
    return folder


def test_the_listing_shows_the_runs_loras_with_their_facts(root, webui, lora_tensors):
    make_run(root, lora_tensors)
    listing = app_client(root, webui).get("/api/library").json()
    assert listing["webui"] == {"name": "WebUI", "path": str(webui.resolve())}
    (item,) = listing["files"]
    assert item["path"] == f"{root.name}/output/ink/{FILE}"
    assert (item["source"], item["run"], item["file"]) == ("run", f"{root.name}/output/ink", FILE)
    assert (item["stem"], item["alias"]) == ("pytorch_lora_weights", "ink_painting_v1")
    assert item["tag"] == "pytorch_lora_weights"  # the only file of that stem
    assert (item["version"], item["sd_version"]) == ("SD 1.x", "SD1")
    assert item["base_model"] == "runwayml/stable-diffusion-v1-5"
    numbers = [item[key] for key in ("rank", "alpha", "steps", "epoch", "resolution")]
    assert numbers == [4, 2, 120, 3, "512x512"]
    assert item["datasets"] == [{"folder": "10_ink", "repeats": 10, "images": 4}]
    assert item["top_tags"] == [["inkstyle", 4], ["mountain", 3], ["cat", 1]]
    assert item["trigger"] == ["inkstyle"]
    assert item["size"] == (root / "output" / "ink" / FILE).stat().st_size
    assert len(item["hash"]) == 12 and item["in_webui"] is None


def test_the_listing_without_a_webui_folder_is_newest_first(root, lora_tensors):
    make_run(root, lora_tensors, "old")
    make_run(root, {k: v * 2 for k, v in lora_tensors.items()}, "new", ss_output_name="ink_v2")
    os.utime(root / "output" / "old" / FILE, (1_000_000, 1_000_000))
    listing = app_client(root, None).get("/api/library").json()
    assert listing["webui"] is None
    assert [f["run"] for f in listing["files"]] == [f"{root.name}/output/new", f"{root.name}/output/old"]
    # Two different files answer to the stem: each is typed by its alias, which only it answers to.
    assert [f["tag"] for f in listing["files"]] == ["ink_v2", "ink_painting_v1"]


def test_detail_is_the_inspect_report(root, webui, lora_tensors):
    make_run(root, lora_tensors)
    client = app_client(root, webui)
    path = f"{root.name}/output/ink/{FILE}"
    report = client.get("/api/library/detail", params={"path": path}).json()
    assert report["path"] == path
    assert (report["layout"], report["version"], report["network_type"]) == ("kohya", "SD 1.x", "LoRA")
    (unet,) = report["components"]
    assert (unet["component"], unet["modules"], unet["ranks"]) == ("unet", 128, {"4": 128})
    assert report["hashes"]["sshs_model_hash in the metadata"] == "matches"
    assert report["loads_in"]["A1111/Forge"] == "yes, all 128 modules"
    outside = client.get("/api/library/detail", params={"path": "../etc/passwd"})
    assert outside.status_code == 400 and "'..' is not allowed" in outside.json()["errors"][0]


def test_copy_to_webui_with_preview_and_card_metadata(root, webui, lora_tensors):
    run = make_run(root, lora_tensors)
    client = app_client(root, webui)
    path = f"{root.name}/output/ink/{FILE}"
    answer = copy(client, {"path": path})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "status": "copied",
        "path": "WebUI/ink_painting_v1.safetensors",
        "name": "ink_painting_v1",
        "tag": "<lora:ink_painting_v1:1>",
        "written": [
            "WebUI/ink_painting_v1.safetensors",
            "WebUI/ink_painting_v1.preview.png",
            "WebUI/ink_painting_v1.json",
        ],
    }
    assert (webui / "ink_painting_v1.safetensors").read_bytes() == (run / FILE).read_bytes()
    preview = (webui / "ink_painting_v1.preview.png").read_bytes()
    assert preview == b"\x89PNGfinal\x00"  # the newest step's, first prompt
    card = json.loads((webui / "ink_painting_v1.json").read_text(encoding="utf-8"))
    assert card["sd version"] == "SD1" and card["activation text"] == "inkstyle"
    assert card["preferred weight"] == 1.0 and card["negative text"] == ""
    assert card["description"] == "ink_painting_v1: a LoRA for SD 1.x (rank 4), made with lora-scripts."
    assert "Base model: runwayml/stable-diffusion-v1-5" in card["notes"] and "Steps: 120" in card["notes"]
    assert "Trained with: lora-scripts" in card["notes"]

    again = copy(client, {"path": path})
    assert again.json()["status"] == "already" and again.json()["written"] == []

    listing = client.get("/api/library").json()["files"]
    by_source = {f["source"]: f for f in listing}
    assert by_source["run"]["in_webui"] == "WebUI/ink_painting_v1.safetensors"
    assert by_source["webui"]["path"] == "WebUI/ink_painting_v1.safetensors"
    assert by_source["webui"]["tag"] == "ink_painting_v1" and by_source["webui"]["run"] is None


def test_copy_never_replaces_a_different_file(root, webui, lora_tensors):
    make_run(root, lora_tensors)
    (webui / "ink_painting_v1.safetensors").write_bytes(b"someone else's LoRA")
    (webui / "mine.preview.png").write_bytes(b"their preview")
    client = app_client(root, webui)
    path = f"{root.name}/output/ink/{FILE}"
    refused = copy(client, {"path": path})
    assert refused.status_code == 400
    assert refused.json()["errors"] == [
        "name 'ink_painting_v1': the WebUI folder already has a different ink_painting_v1.safetensors; "
        "it is never replaced, so give another name."
    ]
    assert (webui / "ink_painting_v1.safetensors").read_bytes() == b"someone else's LoRA"
    renamed = copy(client, {"path": path, "name": "mine.safetensors"}).json()
    assert renamed["status"] == "copied" and renamed["tag"] == "<lora:mine:1>"
    assert renamed["written"] == ["WebUI/mine.safetensors", "WebUI/mine.json"]  # their preview is kept
    assert (webui / "mine.preview.png").read_bytes() == b"their preview"


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "x:y", "<lora>", ".hidden", "a..b"])
def test_copy_refuses_unsafe_names(root, webui, lora_tensors, name):
    make_run(root, lora_tensors)
    refused = copy(app_client(root, webui), {"path": f"{root.name}/output/ink/{FILE}", "name": name})
    assert refused.status_code == 400 and "not usable as a file name" in refused.json()["errors"][0]
    assert list(webui.iterdir()) == []


def test_copy_refuses_other_files_and_needs_a_webui_folder(root, webui, lora_tensors, tmp_path):
    run = make_run(root, lora_tensors)
    client = app_client(root, webui)
    for path, words in (
        ("/etc/passwd", "give a path inside a root"),
        (f"{root.name}/../x.safetensors", "'..' is not allowed"),
        (f"{root.name}/data/ink/a.png", "not a LoRA file"),
        (f"{root.name}/output/ink/state/step-120/lora.safetensors", "not a LoRA file in a run's folder"),
    ):
        refused = copy(client, {"path": path})
        assert refused.status_code == 400 and words in refused.json()["errors"][0], (path, refused.text)
    assert list(webui.iterdir()) == []
    assert run.is_dir()

    no_webui = copy(app_client(root, None), {"path": f"{root.name}/output/ink/{FILE}"})
    assert no_webui.status_code == 400
    assert no_webui.json()["errors"] == [
        "No WebUI LoRA folder is set; start the web app with `lora-scripts gui --webui-lora-dir "
        "~/stable-diffusion-webui/models/Lora` to copy LoRA files there."
    ]
    unknown = copy(client, {"path": "x", "nme": "typo"})
    assert unknown.status_code == 400 and unknown.json()["errors"][0].startswith("nme: ")


def test_a_webui_folders_own_loras_are_listed(root, webui, lora_tensors):
    sdxl = {"ss_base_model_version": "sdxl_base_v1-0"}
    save_lora(webui / "sdxl" / "their_xl.safetensors", lora_tensors, sdxl)
    (webui / ".hidden").mkdir()
    save_lora(webui / ".hidden" / "half.safetensors", lora_tensors, {})
    listing = app_client(root, webui).get("/api/library").json()["files"]
    (item,) = listing
    assert (item["path"], item["source"]) == ("WebUI/sdxl/their_xl.safetensors", "webui")
    assert item["tag"] == "their_xl"
    assert (item["version"], item["sd_version"], item["rank"], item["trigger"]) == ("SDXL", "SDXL", None, [])
