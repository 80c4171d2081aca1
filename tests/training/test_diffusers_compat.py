"""The files we write load in diffusers: every module applied, fused weights exact.

Run with `train_text_encoder: true` through `lora-scripts train` (the CLI function), so the text-encoder
keys are covered too, with transformers' adapter API refusing the installed peft (as transformers >= 5.24
does with peft 0.21): training must not need it.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from lora_scripts.cli import main
from tests.helpers.peft_veto import transformers_refuses_peft
from tests.training.conftest import write_config


@pytest.fixture(scope="module")
def te_lora_file(tmp_path_factory, tiny_model_dir, dataset_dir):
    out = tmp_path_factory.mktemp("te_run") / "char_v1"
    cfg = write_config(
        out.parent / "char.yaml",
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        base_model=str(tiny_model_dir),
        resolution=64,
        lora_rank=4,
        lora_alpha=2,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        train_text_encoder=True,
        text_encoder_lr=5e-4,
        batch_size=2,
        max_train_steps=4,
        learning_rate=1e-3,
        save_precision="fp32",
        output_dir=str(out),
    )
    with transformers_refuses_peft():  # the text encoder's LoRA goes through peft, whatever transformers says
        assert main(["train", "--config", str(cfg)]) == 0
    return out / "pytorch_lora_weights.safetensors"


def _pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    ).to(torch.float32)


def _lora_layers(module):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def test_text_encoder_keys_are_named_like_sd_scripts(te_lora_file):
    sd = safetensors.torch.load_file(te_lora_file)
    te_keys = [k for k in sd if k.startswith("lora_te_")]
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha" in sd
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)


@pytest.mark.parametrize("weight", [1.0, 0.7])
def test_diffusers_applies_every_module_and_fuses_exactly(te_lora_file, tiny_model_dir, weight):
    sd = safetensors.torch.load_file(te_lora_file)
    pipe = _pipeline(tiny_model_dir)
    base = {
        "unet": {k: v.clone() for k, v in pipe.unet.state_dict().items()},
        "te": {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()},
    }
    pipe.load_lora_weights(str(te_lora_file), adapter_name="ours")
    n_unet = sum(1 for k in sd if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    n_te = sum(1 for k in sd if k.startswith("lora_te_") and k.endswith("lora_down.weight"))
    assert len(_lora_layers(pipe.unet)) == n_unet > 0
    assert len(_lora_layers(pipe.text_encoder)) == n_te > 0

    pipe.set_adapters(["ours"], adapter_weights=[weight])
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["ours"])
    pipe.unload_lora_weights()

    def check(module, base_sd, prefix, name_of):
        fused = module.state_dict()
        checked = 0
        for key in sd:
            if not (key.startswith(prefix) and key.endswith(".lora_down.weight")):
                continue
            stem = key[: -len(".lora_down.weight")]
            down, up = sd[key].float(), sd[f"{stem}.lora_up.weight"].float()
            alpha = sd[f"{stem}.alpha"].item()
            weight_key = name_of(stem[len(prefix) :]) + ".weight"
            expected = base_sd[weight_key] + weight * (alpha / down.shape[0]) * (up @ down)
            torch.testing.assert_close(fused[weight_key], expected, atol=1e-5, rtol=0)
            assert not torch.equal(fused[weight_key], base_sd[weight_key])
            checked += 1
        return checked

    unet_names = {n.replace(".", "_"): n for n in _module_names(pipe.unet)}
    te_names = {
        ("text_model." + n if not n.startswith("text_model.") else n).replace(".", "_"): n
        for n in _module_names(pipe.text_encoder)
    }
    assert check(pipe.unet, base["unet"], "lora_unet_", unet_names.__getitem__) == n_unet
    assert check(pipe.text_encoder, base["te"], "lora_te_", te_names.__getitem__) == n_te


def _module_names(module):
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
