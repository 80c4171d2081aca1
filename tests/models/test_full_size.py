"""Full-size SD 1.5 / 2.1 architectures with random weights: a real-sized single file loads bit-identically.

These catch what tiny models cannot: SD's exact block layout in the LDM key mapping, the shipped configs
matching real checkpoints tensor for tensor, and loading offline with no config_dir. Random fp16 weights
(2.1 / 2.6 GB files) come from one random pool; modules are only built on the meta device for their shapes.
Each test takes ~20 s on 2 CPU cores; peak RAM is the loader's (fp16 file + fp32 modules, ~8 GB for SD 2.1).
"""

from __future__ import annotations

import gc

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lora_scripts.models.sd_loading import load_sd_components, shipped_config_dir
from tests.helpers.compvis import to_compvis_state_dict

POOL_SIZE = 64 * 2**20  # > the largest SD tensor (the 49408 x 1024 token embedding of SD 2.x)


def random_sd_weights(version: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{component: diffusers state dict} of N(0, 1) fp16 tensors shaped like the shipped `version` config.

    The tensors are views into one shared pool (128 MB), so keeping them as the reference costs nothing.
    """
    folder = shipped_config_dir(version)
    with init_empty_weights():
        modules = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder, subfolder="unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
        }
    # Drawing 1e9 normals takes ~10 s; slicing one 64 M-value pool at a different offset for every tensor
    # takes ~2 s and still gives every tensor (and every position in it) its own values, so a swapped,
    # transposed or mis-split tensor cannot compare equal.
    pool = torch.empty(POOL_SIZE, dtype=torch.float16).normal_(generator=torch.Generator().manual_seed(seed))
    weights: dict[str, dict[str, torch.Tensor]] = {}
    index = 0
    for name, module in modules.items():
        weights[name] = {}
        for key, value in module.state_dict().items():
            start = (index * 1_000_003) % (POOL_SIZE - value.numel())
            weights[name][key] = pool[start : start + value.numel()].view(value.shape)  # a view: no memory
            index += 1
    return weights


def write_and_load(
    tmp_path, version: str, weights: dict[str, dict[str, torch.Tensor]], extra: dict | None = None
):
    state = to_compvis_state_dict(
        weights["unet"],
        weights["vae"],
        weights["text_encoder"],
        layers_per_block=2,
        text_encoder="clip" if version == "sd_v1" else "open_clip",
    )
    path = tmp_path / f"{version}-random.safetensors"
    # safetensors refuses tensors that share storage (ours are views of one pool), hence the copies.
    save_file({key: value.clone() for key, value in {**state, **(extra or {})}.items()}, path)
    del state
    gc.collect()
    return load_sd_components(str(path))  # no config_dir: must pick the shipped config, offline


def assert_bit_identical(loaded, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, reference in weights.items():
        ours = getattr(loaded, name).state_dict()
        assert ours.keys() == reference.keys(), name
        for key, value in reference.items():
            assert ours[key].dtype == torch.float32, key
            assert torch.equal(ours[key], value.float()), f"{name}: {key}"


@pytest.mark.slow
def test_full_size_sd15_single_file(tmp_path):
    weights = random_sd_weights("sd_v1")
    loaded = write_and_load(tmp_path, "sd_v1", weights)
    assert (loaded.version, loaded.prediction_type) == ("sd_v1", "epsilon")
    assert loaded.unet.config.cross_attention_dim == 768
    assert_bit_identical(loaded, weights)


@pytest.mark.slow
def test_full_size_sd21_v_single_file(tmp_path):
    weights = random_sd_weights("sd_v2")
    loaded = write_and_load(tmp_path, "sd_v2", weights, extra={"v_pred": torch.tensor([])})
    assert (loaded.version, loaded.prediction_type) == ("sd_v2", "v_prediction")
    # stable-diffusion-2-1 (768-v) settings on top of the shipped 2-1-base config
    assert loaded.unet.config.sample_size == 96 and loaded.unet.config.upcast_attention
    assert loaded.tokenizer.pad_token == "!"
    assert_bit_identical(loaded, weights)  # OpenCLIP's fused q/k/v split back, the unused 24th block dropped
