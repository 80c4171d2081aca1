"""The shipped SD 1.x / 2.x configs and the derived CLIP tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lora_scripts.models.sd_loading import CLIP_TOKENIZER_DIR, load_clip_tokenizer, shipped_config_dir

REPO = Path(__file__).resolve().parents[2]
OPEN_CLIP_WHEEL = Path(os.environ.get("OPEN_CLIP_WHEEL", "/tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl"))


def _tool():
    spec = importlib.util.spec_from_file_location(
        "make_clip_tokenizer", REPO / "tools" / "make_clip_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", ["sd_v1", "sd_v2"])
def test_tokenizer_gives_openai_clip_ids(version):
    tokenizer = load_clip_tokenizer(version)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77


def test_pad_token_differs_between_sd1_and_sd2():
    sd1 = load_clip_tokenizer("sd_v1")("a cat", padding="max_length", max_length=6).input_ids
    sd2 = load_clip_tokenizer("sd_v2")("a cat", padding="max_length", max_length=6).input_ids
    assert sd1 == [49406, 320, 2368, 49407, 49407, 49407]
    assert sd2 == [49406, 320, 2368, 49407, 0, 0]  # "!" is id 0


def test_vocab_is_exactly_what_the_committed_merges_derive():
    """vocab.json and merges.txt agree with OpenAI's SimpleTokenizer construction (49408 ids)."""
    merges_lines = (CLIP_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges_lines[0] == "#version: 0.2"
    vocab, merges = _tool().derive_vocab_and_merges(merges_lines)
    assert len(merges) == 49152 - 256 - 2
    committed = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert committed == vocab
    assert committed["<|startoftext|>"] == 49406 and committed["<|endoftext|>"] == 49407


@pytest.mark.skipif(not OPEN_CLIP_WHEEL.is_file(), reason="open_clip_torch wheel not available")
def test_tool_regenerates_the_committed_files_from_the_wheel(tmp_path):
    tool = _tool()
    tool.write_tokenizer(tool.read_bpe_lines(OPEN_CLIP_WHEEL), tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (CLIP_TOKENIZER_DIR / name).read_bytes(), name


# Parameter counts of the released models (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1).
EXPECTED_PARAMETERS = {
    "sd_v1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd_v2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


@pytest.mark.parametrize("version", ["sd_v1", "sd_v2"])
def test_shipped_configs_build_the_released_architectures(version):
    folder = shipped_config_dir(version)
    with init_empty_weights():  # shapes only; nothing allocated
        modules = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder, subfolder="unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
        }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts == EXPECTED_PARAMETERS[version]
    assert modules["unet"].config.cross_attention_dim == modules["text_encoder"].config.hidden_size
    assert modules["vae"].config.scaling_factor == 0.18215
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]


@pytest.mark.parametrize("version", ["sd_v1", "sd_v2"])
def test_shipped_scheduler_is_sd_scaled_linear(version):
    scheduler = DDPMScheduler.from_config(
        DDPMScheduler.load_config(shipped_config_dir(version), subfolder="scheduler")
    )
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(scheduler.betas[[0, -1]], torch.tensor([0.00085, 0.012]))
