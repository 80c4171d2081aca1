"""Our FLUX.1 LoRA files load in ComfyUI and Forge: every key of a full-size file patches a weight of the
BFL-layout model they run (none is left unloaded, each product has its weight's shape), and on the tiny
model the weight each UI computes from a saved file is the trained network's weight, the q/k/v (and single
blocks' MLP input) updates concatenated into the fused BFL layer. The loaders are ported in
tests/helpers/comfy_flux_keys.py, with the files and functions of theirs each part follows."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lora_scripts.export.flux_keys import flux_networks
from lora_scripts.export.kohya import LoraNetwork, kohya_state_dict
from lora_scripts.export.lora_file import read_lora_metadata
from lora_scripts.export.metadata import RunMetadata
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.flux import FluxFamily
from lora_scripts.models.flux_loading import load_flux_components
from lora_scripts.models.lora import LoraSpec, add_lora_adapter
from lora_scripts.models.lora_presets import FLUX_PRESETS, TEXT_ENCODER_PRESETS, resolve_targets
from lora_scripts.training.saving import LoraSaver
from tests.export.test_flux_keys import ASSETS
from tests.helpers.comfy_flux_keys import (
    UiModel,
    bfl_shapes_of,
    clip_l_shapes,
    load_lora,
    patched_weight,
    t5_shapes,
    ui_model,
)
from tests.helpers.flux_files import to_bfl_transformer
from tests.helpers.webui_keys import materialise_lora_weights

UIS = ("ComfyUI", "Forge")
STRENGTH = 0.8  # the <lora:name:0.8> / LoraLoader strength: the update scales with it


def ui_models(transformer: nn.Module, text_encoders: list[nn.Module]) -> dict[str, UiModel]:
    """Each UI's FLUX.1 model of these widths (from the modules' configs only)."""
    clip, t5 = text_encoders[0].config, text_encoders[1].config
    encoders = clip_l_shapes(clip.hidden_size, clip.intermediate_size, clip.num_hidden_layers)
    encoders |= t5_shapes(t5.d_model, t5.d_kv, t5.num_heads, t5.d_ff, t5.num_layers, t5.vocab_size)
    return {ui: ui_model(ui, bfl_shapes_of(transformer.config), encoders) for ui in UIS}


# ---------------------------------------------------------------------------------------------------------
# Full size: FLUX.1-dev's modules on the meta device, every layer the kohya presets adapt
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size() -> tuple[dict[str, torch.Tensor], dict[str, UiModel]]:
    """(file tensors, each UI's model) of a rank-1 network on each block Linear of FLUX.1-dev's transformer
    and on CLIP-L's and T5-XXL's attention and MLP Linears (sd-scripts' train_t5xxl)."""
    transformer, encoders = FluxFamily.meta_modules(ASSETS / "flux_dev")
    add_lora_adapter(transformer, _targets(transformer, FLUX_PRESETS, "transformer"), 1, 1.0)
    for encoder in encoders:
        add_lora_adapter(encoder, _targets(encoder, TEXT_ENCODER_PRESETS, "text encoder"), 1, 1.0)
    networks = flux_networks(transformer, encoders)
    for network in networks:
        materialise_lora_weights(network.module)
    return kohya_state_dict(networks, torch.float16), ui_models(transformer, encoders)


def _targets(module: nn.Module, presets: tuple[str, ...], component: str) -> list[str]:
    return resolve_targets(module, "kohya", key="target_modules", component=component, presets=presets)


@pytest.mark.parametrize("ui", UIS)
def test_every_key_of_a_full_size_file_patches_a_weight_of_its_shape(full_size, ui):
    tensors, models = full_size
    model = models[ui]
    patches, unloaded = load_lora(tensors, model)
    assert unloaded == []
    assert len(patches) * 3 == len(tensors)  # one patch per module: its down, up and alpha
    for target, patch in patches.items():
        # ComfyUI reshapes up @ down to the weight (an error otherwise); Forge would pad a narrower one.
        assert (patch.up.shape[0], patch.down.shape[1]) == model.weights[target], target
    # Every Linear weight of every block (the fused qkv and linear1 each once) and of the encoders' layers.
    linears = {k for k, shape in model.weights.items() if k.endswith(".weight") and len(shape) == 2}
    blocks = {k for k in linears if k.startswith(("diffusion_model.double_", "diffusion_model.single_"))}
    encoders = {k for k in linears if k.startswith(("clip_l.", "t5xxl.transformer.encoder.block."))}
    encoders -= {k for k in encoders if "relative_attention_bias" in k}
    assert len(blocks) == 19 * 10 + 38 * 3 and len(encoders) == 12 * 6 + 24 * 7
    assert set(patches) == blocks | encoders


def test_a_key_the_model_lacks_is_reported_unloaded(full_size):
    """The check can fail: a module named by a layer the BFL model lacks (img_attn.to_q) and a stray alpha
    are left over."""
    tensors, models = full_size
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    bad = {k.replace(stem, "lora_unet_double_blocks_0_img_attn_to_q"): v for k, v in tensors.items()}
    bad["lora_te3_encoder_block_0_layer_0_SelfAttention_qq.alpha"] = torch.tensor(1.0)
    for ui in UIS:
        _, unloaded = load_lora(bad, models[ui])
        assert unloaded == [
            "lora_te3_encoder_block_0_layer_0_SelfAttention_qq.alpha",
            *(
                f"lora_unet_double_blocks_0_img_attn_to_q.{s}"
                for s in ("alpha", "lora_down.weight", "lora_up.weight")
            ),
        ]


# ---------------------------------------------------------------------------------------------------------
# The tiny model: the weights each UI makes from a file training saved
# ---------------------------------------------------------------------------------------------------------


def run_metadata(family: FluxFamily) -> RunMetadata:
    return RunMetadata(
        family=family.info, rank=4, alpha=2.0, target_modules="kohya", text_encoder_target_modules="kohya",
        resolution=64, num_train_images=1, num_batches_per_epoch=1, num_epochs=1, max_train_steps=1,
        batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-4, text_encoder_lr=None,
        lr_scheduler="constant", lr_warmup_steps=0, max_grad_norm=1.0, mixed_precision="no", seed=0,
        sd_model_name="tiny-flux", tag_frequency={},
    )  # fmt: skip


def merged_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, merged) state dicts of a module peft has wrapped, by the plain module paths: merged adds each
    LoRA layer's own update `scaling * B @ A` to its base weight (peft's merge)."""
    updates = {}
    for path, layer in module.named_modules():
        if isinstance(layer, LoraLayer):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            updates[f"{path}.weight"] = layer.scaling["default"] * (b @ a)
    base = {
        k.replace(".base_layer.", "."): v.detach()
        for k, v in module.state_dict().items()
        if ".lora_" not in k
    }
    assert updates.keys() <= base.keys()
    merged = {k: v + updates[k] if k in updates else v for k, v in base.items()}
    return base, merged


def ui_names(base: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A text encoder's state dict by the UIs' names (`clip_l.transformer.text_model.…`,
    `t5xxl.transformer.…`; transformers 5's CLIPTextModel has no `text_model.` level)."""
    if prefix == "clip_l":
        return {f"clip_l.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in base.items()}
    return {f"t5xxl.transformer.{k}": v for k, v in base.items()}


# Outside the blocks (sd-scripts' `in_dims`-style training): the embedders and the final projection (which
# `proj_out` also names in every single block), with to_q for a fused layer with one part.
OUTSIDE_BLOCKS = [
    "x_embedder", "context_embedder", "proj_out", "to_q",
    *(f"time_text_embed.{e}_embedder.linear_{i}" for e in ("timestep", "text", "guidance") for i in (1, 2)),
]  # fmt: skip


@pytest.mark.parametrize("preset", ["kohya", "attn", OUTSIDE_BLOCKS], ids=["kohya", "attn", "outside-blocks"])
def test_each_ui_makes_the_trained_weights_from_a_saved_file(flux_dir, tmp_path, preset):
    """Every layer the preset adapts, fused or not. `attn` leaves the MLP part of each single block's
    linear1 without LoRA, OUTSIDE_BLOCKS (through to_q) k, v and the MLP part: written as zero blocks, those
    rows of the fused weight must stay as they are."""
    family = FluxFamily(load_flux_components(str(flux_dir)))
    networks = family.add_lora(
        LoraTargets(preset, "kohya", text_encoder_mask=(True, True)), LoraSpec(rank=4, alpha=2.0)
    )
    _randomise(networks)
    [path, _] = LoraSaver(tmp_path, "flux", networks, torch.float32, run_metadata(family)).save_final(1, 1)
    assert read_lora_metadata(path)["ss_base_model_version"] == "flux1"
    lora = safetensors.torch.load_file(path)
    assert {k.split("_")[1] for k in lora} == {"unet", "te1", "te3"}
    if preset == OUTSIDE_BLOCKS:
        outside = ("img_in", "txt_in", "time_in_in_layer", "vector_in_out_layer", "guidance_in_out_layer")
        assert all(f"lora_unet_{name}.alpha" in lora for name in (*outside, "final_layer_linear"))

    transformer_base, transformer_merged = merged_state(family.transformer)
    clip_base, clip_merged = merged_state(family.text_encoder)
    t5_base, t5_merged = merged_state(family.text_encoder_2)
    # The UIs' model: BFL transformer (q/k/v and the MLP input concatenated, as BFL's checkpoints are),
    # the encoders by ComfyUI's names. Trained: the same, from each layer's merged diffusers weight.
    base = {f"diffusion_model.{k}": v for k, v in to_bfl_transformer(transformer_base).items()}
    base |= ui_names(clip_base, "clip_l") | ui_names(t5_base, "t5xxl")
    trained = {f"diffusion_model.{k}": v for k, v in to_bfl_transformer(transformer_merged).items()}
    trained |= ui_names(clip_merged, "clip_l") | ui_names(t5_merged, "t5xxl")
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert "diffusion_model.single_blocks.0.linear1.weight" in changed
    assert any(k.startswith("t5xxl.") for k in changed) and any(k.startswith("clip_l.") for k in changed)

    for ui, model in ui_models(family.transformer, family.text_encoders).items():
        assert {k: tuple(base[k].shape) for k in model.weights} == model.weights  # the model we emulate
        patches, unloaded = load_lora(lora, model)
        assert unloaded == [], ui
        assert set(patches) == changed, ui  # every trained weight patched, nothing else
        for target, patch in patches.items():
            theirs = patched_weight(ui, base[target], patch, STRENGTH)
            ours = base[target] + STRENGTH * (trained[target] - base[target])
            torch.testing.assert_close(
                theirs, ours, rtol=1e-5, atol=1e-6, msg=lambda m, u=ui, t=target: f"{u} {t}: {m}"
            )


def test_a_wrong_part_order_in_the_fused_qkv_is_caught(flux_dir, tmp_path):
    """The comparison sees a fused layer whose parts are swapped (k's rows where q's belong)."""
    family = FluxFamily(load_flux_components(str(flux_dir)))
    networks = family.add_lora(LoraTargets("attn", None), LoraSpec(rank=4, alpha=2.0))
    _randomise(networks)
    tensors = kohya_state_dict(networks, torch.float32)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    up = tensors[f"{stem}.lora_up.weight"]
    third = up.shape[0] // 3
    tensors[f"{stem}.lora_up.weight"] = torch.cat([up[third : 2 * third], up[:third], up[2 * third :]])
    base, merged = merged_state(family.transformer)
    target = "double_blocks.0.img_attn.qkv.weight"
    model = ui_models(family.transformer, family.text_encoders)["ComfyUI"]
    patches, _ = load_lora(tensors, model)
    theirs = patched_weight("ComfyUI", to_bfl_transformer(base)[target], patches[f"diffusion_model.{target}"])
    assert not torch.allclose(theirs, to_bfl_transformer(merged)[target], rtol=1e-5, atol=1e-6)


def test_the_bfl_model_written_from_the_architecture_is_flux1_dev():
    """The BFL model the UIs are given (from BFL's FluxParams) has FLUX.1-dev's widths."""
    transformer, encoders = FluxFamily.meta_modules(ASSETS / "flux_dev")
    weights = ui_models(transformer, encoders)["ComfyUI"].weights
    assert weights["diffusion_model.single_blocks.0.linear1.weight"] == (21504, 3072)
    assert weights["diffusion_model.single_blocks.37.linear2.weight"] == (3072, 15360)
    assert weights["diffusion_model.double_blocks.18.txt_attn.qkv.weight"] == (9216, 3072)
    assert weights["diffusion_model.txt_in.weight"] == (3072, 4096)
    assert weights["diffusion_model.vector_in.in_layer.weight"] == (3072, 768)
    assert weights["t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wi_0.weight"] == (10240, 4096)
    assert weights["clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)


def _randomise(networks: list[LoraNetwork], seed: int = 3) -> None:
    """Random lora_A and lora_B (peft starts B at zero, which would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for network in networks:
            for layer in network.module.modules():
                if isinstance(layer, LoraLayer):
                    for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
