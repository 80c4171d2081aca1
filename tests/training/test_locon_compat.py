"""A LoCon file we write (UNet: kohya preset + 3x3 convs at their own rank/alpha; text encoder: kohya preset)
loads in diffusers and fuses exactly: every adapted weight becomes `W + w * (alpha / rank) * up @ down`
(convs: the product reshaped to the kernel), with each module's own alpha, and nothing else changes.
Its keys are also the ones A1111 and ComfyUI resolve."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from lora_scripts.export.kohya import count_modules, kohya_state_dict
from lora_scripts.export.lora_file import save_lora_file
from lora_scripts.export.metadata import RunMetadata
from lora_scripts.generation.lora_apply import load_lora, set_lora_weights
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.tiny import build_tiny_sd
from tests.helpers.webui_keys import a1111_dropped, a1111_layers, comfyui_dropped, comfyui_model
from tests.models.test_lora_network import lora_layers, tiny_family

SPEC = LoraSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
WEIGHT = 0.7


def run_metadata(family) -> RunMetadata:
    return RunMetadata(
        family=family.info,
        rank=SPEC.rank,
        alpha=SPEC.alpha,
        target_modules="kohya",
        text_encoder_target_modules="kohya",
        resolution=64,
        num_train_images=1,
        num_batches_per_epoch=1,
        num_epochs=1,
        max_train_steps=1,
        batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        text_encoder_lr=None,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        max_grad_norm=1.0,
        mixed_precision="no",
        seed=0,
        sd_model_name="tiny-sd",
        tag_frequency={},
    )


def randomise(networks, seed: int) -> None:
    """Every lora_A and lora_B gets random values (B is zero after init, which would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in networks:
            for layer in lora_layers(net.module).values():
                for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("locon_model") / "tiny-sd")


@pytest.fixture(scope="module")
def trained():
    """The tiny model with the LoCon network attached and random LoRA weights (as if trained)."""
    family = tiny_family()
    networks = family.add_lora(LoraTargets("kohya", "kohya"), SPEC)
    randomise(networks, seed=1)
    return family, networks


@pytest.fixture(scope="module")
def locon_file(tmp_path_factory, trained):
    family, networks = trained
    path = tmp_path_factory.mktemp("locon") / "locon.safetensors"
    tensors = kohya_state_dict(networks, torch.float32)
    save_lora_file(path, tensors, run_metadata(family), output_name="locon", steps=1, epoch=1)
    return path


def test_locon_file_has_kohya_keys_and_per_module_alpha(locon_file):
    sd = safetensors.torch.load_file(locon_file)
    assert count_modules(sd) == 48 + 13 + 18 + 2 * 6  # + resnet time_emb_proj/conv_shortcut (kohya)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in sd)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert sd[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert sd[f"{conv}.alpha"].item() == 1.0
    sampler = "lora_unet_down_blocks_0_downsamplers_0_conv"
    assert sd[f"{sampler}.lora_down.weight"].shape == (2, 32, 3, 3) and sd[f"{sampler}.alpha"].item() == 1.0
    proj_in = "lora_unet_mid_block_attentions_0_proj_in"  # a 1x1 conv in SD 1.x: 4-D, the linear rank
    assert sd[f"{proj_in}.lora_down.weight"].shape == (4, 64, 1, 1)
    assert sd[f"{proj_in}.lora_up.weight"].shape == (64, 4, 1, 1) and sd[f"{proj_in}.alpha"].item() == 2.0
    fc2 = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    assert sd[f"{fc2}.lora_down.weight"].shape == (4, 64) and sd[f"{fc2}.alpha"].item() == 2.0
    assert not any("conv_in" in k or "conv_out" in k for k in sd)
    shortcut = (
        "lora_unet_up_blocks_0_resnets_0_conv_shortcut"  # 1x1: the linear rank and alpha, as sd-scripts
    )
    assert sd[f"{shortcut}.lora_down.weight"].shape[0] == 4 and sd[f"{shortcut}.alpha"].item() == 2.0


def test_file_update_equals_the_trained_network_update(locon_file, trained):
    # The file's (alpha / rank) * up @ down is what peft applied while training, module by module.
    sd = safetensors.torch.load_file(locon_file)
    checked = 0
    for net in trained[1]:
        for path, layer in lora_layers(net.module).items():
            stem = net.kohya_name(path)
            down, up = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]
            scale = sd[f"{stem}.alpha"].item() / down.shape[0]
            file_delta = scale * (up.flatten(1) @ down.flatten(1)).reshape(
                layer.get_base_layer().weight.shape
            )
            torch.testing.assert_close(file_delta, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
            checked += 1
    assert checked == count_modules(sd) == 91


def _pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    ).to(torch.float32)


def _weight_names(model, text_model: bool) -> dict[str, str]:
    """kohya stem (without lora_unet_/lora_te_) → the model's weight key."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            kohya = f"text_model.{name}" if text_model and not name.startswith("text_model.") else name
            names[kohya.replace(".", "_")] = f"{name}.weight"
    return names


@pytest.mark.parametrize("loader", ["lora_apply", "diffusers"])
def test_diffusers_fuses_each_module_with_its_own_alpha(locon_file, model_dir, loader):
    sd = safetensors.torch.load_file(locon_file)
    pipe = _pipeline(model_dir)
    base = {"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}
    base = {part: {k: v.clone() for k, v in weights.items()} for part, weights in base.items()}
    if loader == "lora_apply":
        loaded = load_lora(pipe, locon_file, "ours")
        set_lora_weights(pipe, [loaded], [(WEIGHT, WEIGHT)])
    else:
        pipe.load_lora_weights(str(locon_file), adapter_name="ours")
        pipe.set_adapters(["ours"], adapter_weights=[WEIGHT])
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["ours"])
    pipe.unload_lora_weights()

    kinds = {"linear": 0, "conv1x1": 0, "conv3x3": 0}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        model = getattr(pipe, part)
        fused, names = model.state_dict(), _weight_names(model, part == "text_encoder")
        changed = set()
        for key in sd:
            if not (key.startswith(prefix) and key.endswith(".lora_down.weight")):
                continue
            stem = key.removesuffix(".lora_down.weight")
            down, up = sd[key].double(), sd[f"{stem}.lora_up.weight"].double()
            alpha, rank = sd[f"{stem}.alpha"].item(), down.shape[0]
            weight_key = names[stem.removeprefix(prefix)]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(base[part][weight_key].shape)
            expected = base[part][weight_key].double() + WEIGHT * (alpha / rank) * delta
            torch.testing.assert_close(fused[weight_key].double(), expected, atol=1e-5, rtol=0)
            kinds["linear" if down.dim() == 2 else f"conv{down.shape[2]}x{down.shape[3]}"] += 1
            changed.add(weight_key)
        for weight_key, value in base[part].items():  # biases, norms, conv_in/out, shortcuts, ...
            if weight_key not in changed:
                assert torch.equal(fused[weight_key], value), weight_key
    # UNet: 40 Linears + 8 proj_in/out (1x1) + 18 3x3 convs; text encoder: 12 Linears.
    assert kinds == {"linear": 40 + 12 + 8, "conv1x1": 8 + 5, "conv3x3": 18}  # + 8 time_emb_proj, 5 shortcuts


def test_every_key_resolves_in_a1111_and_comfyui(locon_file):
    # The tiny model's module names are a subset of SD 1.5's, so the full-size key maps apply.
    names = sorted({k.split(".", 1)[0] for k in safetensors.torch.load_file(locon_file)})
    assert len(names) == 91
    assert a1111_dropped(names, a1111_layers(False)) == {}
    assert comfyui_dropped(names, comfyui_model("sd_v1")) == {}
