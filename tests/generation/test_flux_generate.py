"""`generate` with FLUX.1 on the tiny FLUX model: FluxPipeline renders with the family's defaults
(flow-matching Euler, guidance 3.5), a FLUX LoRA file in sd-scripts' names applies (weight 0 is the base
model bit for bit), the ComfyUI files load through --vae / --clip-l / --t5xxl, and a LoRA of another family
is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.errors import UserError
from lora_scripts.export.flux_keys import flux_networks
from lora_scripts.export.kohya import kohya_state_dict
from lora_scripts.generation.generate import run_generate
from lora_scripts.generation.infotext import parse_infotext
from lora_scripts.generation.options import GenerateOptions
from lora_scripts.models.lora import add_lora_adapter
from lora_scripts.models.lora_presets import FLUX_PRESETS, resolve_targets
from lora_scripts.models.tiny import build_tiny_flux_components
from tests.helpers.flux_files import write_flux_files


@pytest.fixture(scope="module")
def flux_lora_dir(tmp_path_factory) -> Path:
    """A FLUX LoRA for the tiny model, as training writes it (sd-scripts' fused names, flux1 metadata)."""
    tiny = build_tiny_flux_components()
    layers = resolve_targets(tiny.transformer, "attn", key="t", component="transformer", presets=FLUX_PRESETS)
    add_lora_adapter(tiny.transformer, layers, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(0)
    for module in tiny.transformer.modules():
        if isinstance(module, LoraLayer):
            weight = module.lora_B["default"].weight
            weight.data = torch.randn(weight.shape, generator=generator) * 0.5
    folder = tmp_path_factory.mktemp("loras")
    tensors = kohya_state_dict(flux_networks(tiny.transformer, [None, None]), torch.float16)
    metadata = {"ss_base_model_version": "flux1", "ss_output_name": "ink_flux"}
    safetensors.torch.save_file(tensors, folder / "ink_flux.safetensors", metadata=metadata)
    return folder


def _generate(base_model: Path, prompt: str, output: Path, **values):
    settings = dict(steps=3, width=64, height=64, seed=3, progress=False, t5xxl=None)
    settings.update(values)
    return run_generate(GenerateOptions(base_model=str(base_model), prompt=prompt, output=output, **settings))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_flux_renders_with_its_defaults_and_applies_a_lora(flux_dir, flux_lora_dir, tmp_path):
    base = _generate(flux_dir, "ink wash painting, a temple", tmp_path / "base.png")
    fields = parse_infotext(base.infotexts[0])
    assert (fields["Sampler"], fields["CFG scale"], fields["Size"]) == ("Euler", "3.5", "64x64")
    assert Image.open(base.files[0]).size == (64, 64)
    with_lora = _generate(
        flux_dir,
        "ink wash painting, a temple, <lora:ink_flux:1>",
        tmp_path / "lora.png",
        lora_dirs=[flux_lora_dir],
    )
    assert "ink_flux" in parse_infotext(with_lora.infotexts[0])["Lora hashes"]
    assert np.abs(_pixels(with_lora.files[0]) - _pixels(base.files[0])).max() > 0
    zero = _generate(
        flux_dir,
        "ink wash painting, a temple, <lora:ink_flux:0>",
        tmp_path / "zero.png",
        lora_dirs=[flux_lora_dir],
    )
    np.testing.assert_array_equal(_pixels(zero.files[0]), _pixels(base.files[0]))


def test_flux_refuses_other_samplers_and_sd_loras(flux_dir, tmp_path):
    with pytest.raises(UserError) as err:
        _generate(flux_dir, "a cat", tmp_path / "x.png", sampler="dpm++ 2m")
    assert "--sampler: FLUX.1 samples with flow-matching Euler only, not 'DPM++ 2M'" in str(err.value)
    sd_lora = tmp_path / "sd_style.safetensors"
    safetensors.torch.save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
        sd_lora,
        metadata={"ss_base_model_version": "sd_v1"},
    )
    with pytest.raises(UserError) as err:
        _generate(flux_dir, f"a cat <lora:{sd_lora}:1>", tmp_path / "y.png")
    assert "was made for SD 1.x/2.x but the base model is FLUX.1" in str(err.value)


def test_the_cli_loads_comfyui_files(flux_dir, tmp_path, capsys):
    files = write_flux_files(build_tiny_flux_components(), tmp_path / "comfy")
    argv = ["generate", "--base-model", str(files["transformer"]), "--base-model-config", str(flux_dir)]
    argv += ["--vae", str(files["ae"]), "--clip-l", str(files["clip_l"]), "--t5xxl", str(files["t5xxl"])]
    argv += ["--prompt", "a temple", "--steps", "2", "--width", "64", "--height", "48", "--seed", "5"]
    argv += ["--output", str(tmp_path / "comfy.png")]
    assert main(argv) == 0
    with Image.open(tmp_path / "comfy.png") as image:
        assert image.size == (64, 48)
        assert parse_infotext(image.info["parameters"])["Seed"] == "5"
