"""Every kohya key we write for the full SD 1.5 / SD 2.1 architectures is used by A1111's WebUI and ComfyUI.

The loaders' name resolution is ported in tests/helpers/webui_keys.py (with source references); the models
are built on the meta device from the shipped configs, so only names exist and the tests stay fast.
"""

from __future__ import annotations

from functools import cache

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from lora_scripts.export.kohya import LoraNetwork, count_modules, kohya_state_dict
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec, adaptable_module_names
from lora_scripts.models.sd_loading import SDComponents
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from tests.helpers.compvis import unet_to_compvis
from tests.helpers.webui_keys import (
    MetaSDModel,
    a1111_convert,
    a1111_dropped,
    a1111_layer_names,
    a1111_layers,
    a1111_match,
    comfyui_detect_unet_config,
    comfyui_dropped,
    comfyui_model,
    materialise_lora_weights,
    meta_sd_model,
)

VERSIONS = ["sd_v1", "sd_v2"]
UNET_PRESETS = {
    "q_v": ["to_q", "to_v"],
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention_proj_ff": [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
    ],
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# SD 1.5 and SD 2.1 share the UNet layout: 16 Transformer2DModels (down 6, mid 1, up 9), one
# BasicTransformerBlock each, with attn1 and attn2.
TRANSFORMERS = 16
UNET_COUNTS = {
    "q_v": TRANSFORMERS * 2 * 2,  # attn1/attn2 × to_q/to_v = 64
    "attention": TRANSFORMERS * 2 * 4,  # 128
    "attention_proj_ff": TRANSFORMERS * (2 * 4 + 2 + 2),  # + proj_in/proj_out + ff.net.0.proj/ff.net.2 = 192
}
TEXT_ENCODER_LAYERS = {"sd_v1": 12, "sd_v2": 23}  # diffusers' SD 2.x text encoder drops OpenCLIP's last block


def _our_names(network: LoraNetwork, targets: list[str]) -> list[str]:
    """The kohya names we export for `targets`: every Linear/Conv2d peft's target rule selects (a path equal
    to a target or ending in "." + target), named by the network as `kohya_state_dict` does."""
    config = LoraConfig(target_modules=targets)
    paths = [p for p in adaptable_module_names(network.module) if check_target_module_exists(config, p)]
    return [network.kohya_name(p) for p in paths]


def _networks(version: str) -> tuple[LoraNetwork, LoraNetwork]:
    """The UNet and text-encoder networks as StableDiffusionFamily.add_lora builds them."""
    model = _model(version)
    text_encoder = model.text_encoder
    prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
    return LoraNetwork("lora_unet", model.unet), LoraNetwork("lora_te", text_encoder, prefix)


@cache
def _model(version: str) -> MetaSDModel:
    return meta_sd_model(version)  # shared read-only; tests that add adapters build their own


def _assert_loaded_everywhere(version: str, names: list[str]) -> None:
    assert len(set(names)) == len(names)
    a1111 = a1111_dropped(names, a1111_layers(version == "sd_v2"))
    assert not a1111, f"A1111 WebUI would drop {len(a1111)} keys, e.g. {next(iter(a1111.items()))}"
    comfy = comfyui_dropped(names, comfyui_model(version))
    assert not comfy, f"ComfyUI would drop {len(comfy)} keys, e.g. {next(iter(comfy.items()))}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("preset", list(UNET_PRESETS))
def test_unet_keys_load_in_a1111_and_comfyui(version, preset):
    unet_net, _ = _networks(version)
    names = _our_names(unet_net, UNET_PRESETS[preset])
    assert len(names) == UNET_COUNTS[preset]
    _assert_loaded_everywhere(version, names)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_adaptable_unet_layer_loads_in_a1111_and_comfyui(version):
    # Any Linear/Conv2d a user may target (resnets, samplers, conv_in/out, time embedding too) must resolve.
    unet_net, _ = _networks(version)
    names = [unet_net.kohya_name(p) for p in adaptable_module_names(unet_net.module)]
    # conv_in/out + 2 time-embedding linears; 22 resnets × conv1/conv2/time_emb_proj + 14 conv_shortcuts;
    # 3 downsamplers + 3 upsamplers; 16 transformers × 12 (proj_in/out, 2 × 4 attention, 2 ff).
    assert len(names) == 4 + 22 * 3 + 14 + 6 + TRANSFORMERS * 12 == 282
    _assert_loaded_everywhere(version, names)


# OpenCLIP's names for a CLIP layer's Linears (SD 2.x); q/k/v live in the fused `attn` (in_proj_weight).
_OPEN_CLIP = {
    "self_attn.q_proj": "attn",
    "self_attn.k_proj": "attn",
    "self_attn.v_proj": "attn",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


@pytest.mark.parametrize("version", VERSIONS)
def test_each_key_reaches_the_layer_it_was_trained_on(version):
    """Not just some layer: both loaders patch the CompVis layer that tests/helpers/compvis.py (an independent
    diffusers → LDM conversion) maps the trained module to."""
    model = _model(version)
    unet_net, te_net = _networks(version)
    layers = a1111_layers(version == "sd_v2")
    comfy = comfyui_model(version)

    unet_keys = {k: k for k in model.unet.state_dict()}
    compvis_of = {d: c for c, d in unet_to_compvis(unet_keys, model.unet.config.layers_per_block).items()}
    for path in adaptable_module_names(unet_net.module):
        target = compvis_of[path + ".weight"].removeprefix("model.")  # diffusion_model.input_blocks.…
        layer = target.removesuffix(".weight").replace(".", "_")
        name = unet_net.kohya_name(path)
        assert a1111_match(name, layers) == (layer, layer), name
        assert comfy.key_map[name] == target, name

    kind = "clip_h" if version == "sd_v2" else "clip_l"
    for path in adaptable_module_names(te_net.module):
        name = te_net.kohya_name(path)
        assert comfy.key_map[name] == f"{kind}.transformer.text_model.{path}.weight", name
        _, _, index, rest = path.split(".", 3)  # encoder.layers.{i}.{self_attn.q_proj | mlp.fc1 | …}
        if version == "sd_v1":
            compvis = f"cond_stage_model.transformer.text_model.{path}.weight"
        else:
            param = "in_proj_weight" if _OPEN_CLIP[rest] == "attn" else "weight"
            compvis = f"cond_stage_model.model.transformer.resblocks.{index}.{_OPEN_CLIP[rest]}.{param}"
        assert compvis in model.compvis, compvis
        layer = compvis.removeprefix("cond_stage_model.").rsplit(".", 1)[0].replace(".", "_")
        assert a1111_match(name, layers)[1] == layer, name


@pytest.mark.parametrize("version", VERSIONS)
def test_comfyui_detects_the_sd15_unet_config(version):
    # ComfyUI's SD15 / SD21 UNet config (comfy/supported_models.py), detected from the CompVis tensors.
    config = comfyui_detect_unet_config(_model(version).compvis, "model.diffusion_model.")
    assert config == {
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1,
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_text_encoder_keys_load_in_a1111_and_comfyui(version):
    _, te_net = _networks(version)
    names = _our_names(te_net, TEXT_ENCODER_TARGETS)
    assert len(names) == TEXT_ENCODER_LAYERS[version] * 6
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in names)
    # These six are every Linear of the CLIP text encoder.
    assert len(names) == len(adaptable_module_names(te_net.module))
    _assert_loaded_everywhere(version, names)


def test_a1111_resolves_to_the_expected_compvis_layers():
    sd1, sd2 = a1111_layers(False), a1111_layers(True)
    assert not sd1.is_sd2 and sd2.is_sd2
    expectations = [
        (sd1, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"),
        (sd1, "lora_unet_up_blocks_3_attentions_2_proj_out", "diffusion_model_output_blocks_11_1_proj_out"),
        (sd1, "lora_unet_mid_block_resnets_1_conv2", "diffusion_model_middle_block_2_out_layers_3"),
        (sd1, "lora_unet_up_blocks_0_upsamplers_0_conv", "diffusion_model_output_blocks_2_1_conv"),
        (sd1, "lora_unet_down_blocks_2_downsamplers_0_conv", "diffusion_model_input_blocks_9_0_op"),
        (sd1, "lora_unet_time_embedding_linear_2", "diffusion_model_time_embed_2"),
        (sd1, "lora_te_text_model_encoder_layers_11_self_attn_q_proj",
         "transformer_text_model_encoder_layers_11_self_attn_q_proj"),
        (sd2, "lora_te_text_model_encoder_layers_22_mlp_fc1", "model_transformer_resblocks_22_mlp_c_fc"),
        (sd2, "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
         "model_transformer_resblocks_0_attn_out_proj"),
    ]  # fmt: skip
    for layers, key, layer in expectations:
        assert a1111_match(key, layers) == (layer, layer)
    # SD 2.x q/k/v have no layer of their own: re_x_proj attaches them to OpenCLIP's fused attention.
    key = "lora_te_text_model_encoder_layers_3_self_attn_k_proj"
    assert a1111_match(key, sd2) == (
        "model_transformer_resblocks_3_attn_k_proj",
        "model_transformer_resblocks_3_attn",
    )
    assert "model_transformer_resblocks_3_attn" in sd2.fused_attention
    assert "model_transformer_resblocks_23_attn" in a1111_layer_names(True)  # the unused 24th block is there


def test_a1111_applies_sd2_fused_attention_only_with_q_k_v_and_out():
    # Documents a WebUI limitation the full TE preset satisfies: q/v alone load but never take effect.
    layers = a1111_layers(True)
    partial = [f"lora_te_text_model_encoder_layers_0_self_attn_{p}" for p in ("q_proj", "v_proj")]
    assert all(a1111_match(k, layers) for k in partial)
    assert set(a1111_dropped(partial, layers)) == set(partial)
    full = [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
    assert a1111_dropped(full, layers) == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_text_encoder_keys_without_text_model_are_dropped(version):
    # transformers 5's CLIPTextModel paths (no `text_model.`) named verbatim: neither loader finds them.
    _, te_net = _networks(version)
    wrong = LoraNetwork("lora_te", te_net.module)
    names = _our_names(wrong, TEXT_ENCODER_TARGETS)
    assert names[0].startswith("lora_te_encoder_layers_0_")
    layers = a1111_layers(version == "sd_v2")
    assert all(a1111_match(n, layers) is None for n in names)
    assert a1111_convert(names[0], layers.is_sd2) == names[0]  # no conversion rule applies
    assert set(a1111_dropped(names, layers)) == set(names)
    assert set(comfyui_dropped(names, comfyui_model(version))) == set(names)


def _meta_family(version: str) -> StableDiffusionFamily:
    model = meta_sd_model(version)  # fresh modules: add_lora mutates them
    components = SDComponents(
        unet=model.unet,
        vae=None,
        text_encoder=model.text_encoder,
        tokenizer=None,
        noise_scheduler=None,
        version=version,
        prediction_type="epsilon",
        location="meta",
    )
    return StableDiffusionFamily(components)


def _exported_names(family: StableDiffusionFamily, targets: LoraTargets, spec: LoraSpec) -> list[str]:
    """add_lora (peft injection) → kohya_state_dict: the module names of the file we would write."""
    networks = family.add_lora(targets, spec)
    for network in networks:
        materialise_lora_weights(network.module)
    state_dict = kohya_state_dict(networks)
    names = sorted({k.split(".", 1)[0] for k in state_dict})
    assert count_modules(state_dict) == len(names)
    return names


@pytest.mark.parametrize("version", VERSIONS)
def test_exported_file_keys_load_in_a1111_and_comfyui(version):
    # End to end on the real writer, widest lists.
    targets = LoraTargets(unet=UNET_PRESETS["attention_proj_ff"], text_encoder=TEXT_ENCODER_TARGETS)
    names = _exported_names(_meta_family(version), targets, LoraSpec(rank=2, alpha=1.0))
    assert len(names) == UNET_COUNTS["attention_proj_ff"] + TEXT_ENCODER_LAYERS[version] * 6
    unet_net, te_net = _networks(version)
    computed = _our_names(unet_net, targets.unet) + _our_names(te_net, targets.text_encoder)
    assert names == sorted(computed)
    _assert_loaded_everywhere(version, names)


# SD 1.5 / 2.1 resnets: down 4 × 2, mid 2, up 4 × 3 = 22, each with conv1/conv2; 3 downsamplers, 3 upsamplers.
LOCON_CONVS = 22 * 2 + 3 + 3
# With conv_dim sd-scripts also adapts every Linear/1x1 conv of the resnets: 22 time_emb_proj and the 14
# conv_shortcuts of resnets that change the channel count (2 down, 12 up); the kohya preset does the same.
LOCON_LINEAR = 22 + 14


@pytest.mark.parametrize("version", VERSIONS)
def test_kohya_preset_locon_file_keys_load_in_a1111_and_comfyui(version):
    # The kohya presets equal the widest lists (proj_in/out, attention, ff; CLIP attention + MLP); LoCon adds
    # every resnet and sampler 3x3 conv (sd-scripts' conv_dim), which both loaders map to CompVis layers.
    family = _meta_family(version)
    spec = LoraSpec(rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0)
    names = _exported_names(family, LoraTargets("kohya", "kohya"), spec)
    expected = (
        UNET_COUNTS["attention_proj_ff"] + LOCON_CONVS + LOCON_LINEAR + TEXT_ENCODER_LAYERS[version] * 6
    )
    assert len(names) == expected
    resnet_linear = [n for n in names if n.endswith(("_time_emb_proj", "_conv_shortcut"))]
    assert len(resnet_linear) == LOCON_LINEAR
    convs = [n for n in names if ("resnets" in n or "samplers" in n) and n not in resnet_linear]
    assert len(convs) == LOCON_CONVS and all(
        n.endswith(("_conv1", "_conv2", "samplers_0_conv")) for n in convs
    )
    unet_net, te_net = _networks(version)
    widest = _our_names(unet_net, UNET_PRESETS["attention_proj_ff"]) + _our_names(
        te_net, TEXT_ENCODER_TARGETS
    )
    assert sorted(set(names) - set(convs) - set(resnet_linear)) == sorted(widest)
    _assert_loaded_everywhere(version, names)
