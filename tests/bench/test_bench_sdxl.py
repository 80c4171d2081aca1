"""`lora-scripts bench` on SDXL: `--model sdxl` builds the full-size architecture (checked on the meta
device), its path runs our loop on a tiny SDXL with the images' size conditioning reaching the UNet, and the
reference loop (diffusers' SD 1.x/2.x script) is skipped with the reason in the report and the table."""

from __future__ import annotations

import json

import torch

from lora_scripts.bench import workspace
from lora_scripts.bench.workspace import (
    BenchSettings,
    BuiltInModel,
    default_resolution,
    load_bench_family,
    model_version,
    tiny_sdxl_family,
)
from lora_scripts.cli import main
from lora_scripts.models.sdxl import SDXLFamily
from lora_scripts.models.tiny import build_tiny_sd, build_tiny_sdxl

ARGS = ["bench", "--resolution", "64", "--steps", "1", "--warmup", "1", "--batch-size", "2"]


def test_sdxl_is_the_full_size_architecture_at_1024():
    with torch.device("meta"):
        family = load_bench_family("sdxl")
    assert isinstance(family, SDXLFamily)
    parts = {"unet": family.unet, "vae": family.vae, "te1": family.text_encoder, "te2": family.text_encoder_2}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    # SDXL base 1.0's parameter counts.
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "te1": 123_060_480, "te2": 694_659_840}
    assert family.info.base_model_version == "sdxl_base_v1-0"
    assert BenchSettings(model="sdxl").image_size == 1024 and model_version("sdxl") == "sdxl"


def test_a_users_sdxl_model_defaults_to_1024(tmp_path):
    assert default_resolution(str(build_tiny_sdxl(tmp_path / "xl"))) == 1024
    assert default_resolution(str(build_tiny_sd(tmp_path / "sd"))) == 512


def test_bench_sdxl_runs_our_loop_alone_with_size_conditioning(monkeypatch, capsys):
    """The `sdxl` path (a model built in memory, as the full-size one is) on a tiny SDXL: our loop's steps
    reach the UNet with each image's time ids (64² images, uncropped), and the report has no reference."""
    monkeypatch.setitem(workspace.BUILT_IN_MODELS, "sdxl", BuiltInModel("sdxl", 1024, tiny_sdxl_family))
    seen = []
    real_predict = SDXLFamily.predict

    def predict(self, noisy_latents, timesteps, cond):
        seen.append(cond["time_ids"].tolist())
        return real_predict(self, noisy_latents, timesteps, cond)

    monkeypatch.setattr(SDXLFamily, "predict", predict)
    assert main([*ARGS, "--model", "sdxl", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["model"] == "sdxl" and report["settings"]["resolution"] == 64
    assert report["images_per_sec"] > 0 and report["flops_per_image"] > 0
    assert report["reference_skipped"].startswith("no reference loop for SDXL models")
    assert report["loops"]["reference"] is None and report["phases"]["reference"] is None
    assert report["speedup"] is None and report["reference_s_per_step"] is None
    # warm-up 1 + first round 1 + 5 timed rounds of 1 + the instrumented run of 1: 8 steps of 2 images.
    assert seen == [[[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2] * 8


def test_bench_table_on_tiny_sdxl_says_why_there_is_no_reference(capsys):
    """`--model tiny-sdxl`: the tiny SDXL written as a folder and loaded like a user's model."""
    assert main([*ARGS, "--model", "tiny-sdxl"]) == 0
    table = capsys.readouterr().out
    assert "lora-scripts bench: model tiny-sdxl, 64², batch 2" in table
    assert "no reference loop for SDXL models: bench/reference.py is diffusers' SD 1.x/2.x script" in table
    assert "speedup" not in table
    rows = {line[:34].strip(): line[34:].split() for line in table.splitlines()}
    assert len(rows["UNet forward + loss"]) == 1  # our column only
    assert float(rows["total (instrumented run)"][0]) > 0
