"""`lora-scripts bench` on FLUX.1: `--model flux-dev` builds the full-size architecture (checked on the meta
device: the parameter counts of FLUX.1-dev, CLIP-L and the T5-XXL encoder), and `--model tiny-flux` runs our
loop on the tiny FLUX written as a folder, with the reference loop skipped and the reason given."""

from __future__ import annotations

import json

import torch

from lora_scripts.bench.flops import step_flops_per_image
from lora_scripts.bench.workspace import BenchSettings, load_bench_family, model_version
from lora_scripts.cli import main
from lora_scripts.models.flux import FluxFamily

ARGS = ["bench", "--resolution", "64", "--steps", "1", "--warmup", "1", "--batch-size", "2"]


def test_flux_dev_is_the_full_size_architecture_at_1024():
    with torch.device("meta"):
        family = load_bench_family("flux-dev")
    assert isinstance(family, FluxFamily) and family.variant == "dev"
    parts = {
        "transformer": family.transformer,
        "vae": family.vae,
        "clip_l": family.text_encoder,
        "t5": family.text_encoder_2,
    }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    # FLUX.1-dev's transformer (with its guidance embedder), ae, CLIP ViT-L/14 text and T5 v1.1 XXL encoder.
    assert counts == {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "clip_l": 123_060_480,
        "t5": 4_762_310_656,
    }
    assert len(family.transformer.transformer_blocks) == 19
    assert len(family.transformer.single_transformer_blocks) == 38
    assert BenchSettings(model="flux-dev").image_size == 1024 and model_version("flux-dev") == "flux1"


def test_flux_dev_flops_per_image_at_512():
    """The cached step's FLOPs at 512² (1024 image tokens + 512 T5 tokens), counted on the meta device:
    about 2 x 6.5 B per-token weights x 1536 tokens forward, as much again backward, plus attention."""
    with torch.device("meta"):
        family = load_bench_family("flux-dev")
    flops = step_flops_per_image(family, 512)
    assert 40e12 < flops < 50e12


def test_bench_on_tiny_flux_runs_our_loop_alone(capsys):
    assert main([*ARGS, "--model", "tiny-flux", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["model"] == "tiny-flux" and report["settings"]["resolution"] == 64
    assert report["images_per_sec"] > 0 and report["flops_per_image"] > 0
    assert report["reference_skipped"].startswith("no reference loop for FLUX.1 models")
    assert report["loops"]["reference"] is None and report["speedup"] is None
