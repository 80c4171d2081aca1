"""SDXL's kohya key layout (export/sdxl_keys.py): sgm names for the UNet, as sd-scripts writes them, that
A1111 (and Forge) and ComfyUI resolve to the layer each was trained on.

Full-size SDXL base on the meta device (names and shapes only): our diffusers UNet from the shipped config,
sd-scripts' sgm UNet (tests/helpers/sd_scripts_sdxl.py) and both text encoders. Module counts of sd-scripts'
SDXL LoRA, from its sgm UNet: 11 Transformer2DModels with 70 transformer blocks (input 2 × 2 + 2 × 10,
middle 10, output 3 × 10 + 3 × 2), each block 10 Linears (attn1/attn2 to_q/k/v/out.0, ff.net.0.proj,
ff.net.2), plus proj_in/proj_out per transformer: 70 × 10 + 11 × 2 = 722. conv_dim (LoCon) adds
17 resnets × 2 3x3 convs + 2 downsamplers + 2 upsamplers = 38 convs and the resnets' Linear / 1x1 convs:
17 emb_layers.1 + 11 skip_connections = 28, so 788. Text encoders: 12 × 6 (lora_te1) + 32 × 6 (lora_te2)
= 264. The UNet has 794 Linear/Conv2d in all (those 788, conv_in, conv_out and the 2 + 2 embedding Linears).
"""

from __future__ import annotations

from functools import cache

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lora_scripts.export.kohya import LoraNetwork, count_modules, kohya_state_dict, lora_layers
from lora_scripts.export.kohya_import import load_network_weights
from lora_scripts.export.sdxl_keys import SgmUnetMap, adaptable_layer_paths, sdxl_networks
from lora_scripts.models.lora import add_lora_adapter
from lora_scripts.models.lora_presets import TEXT_ENCODER_PRESETS, resolve_targets, unet_lora_layers
from tests.helpers.compvis import unet_to_compvis
from tests.helpers.sd_scripts_sdxl import (
    TEXT_ENCODER_TARGETS,
    UNET_CONV_TARGETS,
    UNET_TARGETS,
    create_modules_names,
    with_text_model,
)
from tests.helpers.webui_keys import (
    MetaSDXLModel,
    a1111_convert,
    a1111_dropped,
    a1111_match,
    a1111_sdxl_layers,
    comfyui_detect_unet_config,
    comfyui_dropped,
    comfyui_sdxl_model,
    materialise_lora_weights,
    meta_sd_model,
    meta_sdxl_model,
)

UNET_LORA = 722  # sd-scripts' SDXL default: the Transformer2DModels' Linears
LOCON_CONVS = 38  # conv_dim: resnet conv1/conv2 (17 × 2) and the 2 down- and 2 upsampler convs
LOCON_LINEAR = 28  # conv_dim: the resnets' 17 emb_layers.1 and 11 skip_connections, at the network dim
UNET_LAYERS = 794  # every Linear/Conv2d: the above, conv_in, conv_out, time_embed.0/.2, label_emb.0.0/.0.2
TE1_LORA, TE2_LORA = 12 * 6, 32 * 6


@cache
def _model() -> MetaSDXLModel:
    return meta_sdxl_model()  # shared read-only; tests that add adapters build their own


@cache
def _unet_map() -> SgmUnetMap:
    return SgmUnetMap.from_unet(_model().unet)


def _sd_scripts_names(model: MetaSDXLModel, *, conv: bool) -> dict[str, list[str]]:
    """The module names of an sd-scripts SDXL LoRA (networks/lora.py), per network."""
    unet_targets = UNET_TARGETS + (UNET_CONV_TARGETS if conv else ())
    return {
        "lora_unet": create_modules_names(model.sgm_unet, "lora_unet", unet_targets),
        "lora_te1": create_modules_names(
            with_text_model(model.text_encoder), "lora_te1", TEXT_ENCODER_TARGETS
        ),
        "lora_te2": create_modules_names(
            with_text_model(model.text_encoder_2), "lora_te2", TEXT_ENCODER_TARGETS
        ),
    }


def _our_names(model: MetaSDXLModel, *, conv: bool) -> dict[str, list[str]]:
    """The names we give the layers the `kohya` presets (and conv_rank) adapt, network by network."""
    unet_net, te1_net, te2_net = sdxl_networks(model.unet, [model.text_encoder, model.text_encoder_2])
    linear, convs = unet_lora_layers(model.unet, "kohya", conv=conv)
    names = {"lora_unet": [unet_net.kohya_name(p) for p in [*linear, *convs]]}
    for net in (te1_net, te2_net):
        names[net.kohya_prefix] = [net.kohya_name(p) for p in _kohya_text_encoder_layers(net.module)]
    return names


def _kohya_text_encoder_layers(text_encoder: nn.Module) -> list[str]:
    """`text_encoder_target_modules: kohya`: every Linear of CLIPAttention and CLIPMLP."""
    key, component = "text_encoder_target_modules", "text encoder"
    return resolve_targets(text_encoder, "kohya", key=key, component=component, presets=TEXT_ENCODER_PRESETS)


# --- the map ------------------------------------------------------------------------------------------------


def test_shipped_sdxl_unet_config_builds_the_released_unet():
    model = _model()
    assert sum(p.numel() for p in model.unet.parameters()) == 2_567_463_684  # stabilityai SDXL base 1.0
    # sd-scripts' sgm UNet is the same network: the reference the names below are checked against.
    assert sum(p.numel() for p in model.sgm_unet.parameters()) == 2_567_463_684
    config = model.unet.config
    assert (config.cross_attention_dim, config.addition_embed_type, config.sample_size) == (
        2048,
        "text_time",
        128,
    )
    assert list(config.transformer_layers_per_block) == [1, 2, 10]


def test_map_is_a_bijection_onto_the_sgm_unets_layers():
    model, unet_map = _model(), _unet_map()
    paths = adaptable_layer_paths(model.unet)
    assert len(paths) == len(unet_map) == UNET_LAYERS
    sgm_layers = {
        name: layer
        for name, layer in model.sgm_unet.named_modules()
        if isinstance(layer, (nn.Linear, nn.Conv2d))
    }
    assert sorted(unet_map(p) for p in paths) == sorted(sgm_layers)  # onto, and one to one
    for path in paths:
        ours, theirs = model.unet.get_submodule(path), sgm_layers[unet_map(path)]
        assert type(ours) is type(theirs) and ours.weight.shape == theirs.weight.shape, path
        assert unet_map.to_diffusers(unet_map(path)) == path


def test_map_examples():
    unet_map = _unet_map()
    expected = [
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
            "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        ),
        ("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
        ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("up_blocks.0.resnets.0.conv1", "output_blocks.0.0.in_layers.2"),
        (
            "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k",
            "output_blocks.2.1.transformer_blocks.0.attn2.to_k",
        ),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.2.resnets.2.time_emb_proj", "output_blocks.8.0.emb_layers.1"),
        ("conv_out", "out.2"),
    ]
    assert [(path, unet_map(path)) for path, _ in expected] == expected
    with pytest.raises(KeyError, match="'mid_block.resnets.0.norm1' is not a Linear/Conv2d of this UNet"):
        unet_map("mid_block.resnets.0.norm1")
    with pytest.raises(KeyError, match="'output_blocks.2.1.conv' is not a Linear/Conv2d"):
        unet_map.to_diffusers("output_blocks.2.1.conv")


def test_map_of_sd15_equals_the_ldm_checkpoint_layout():
    # The layout is SD 1.x's single-file layout too: an independent diffusers → LDM conversion agrees.
    unet = meta_sd_model("sd_v1").unet
    compvis = unet_to_compvis({k: k for k in unet.state_dict()}, unet.config.layers_per_block)
    ldm_of = {diffusers: ldm for ldm, diffusers in compvis.items()}
    unet_map = SgmUnetMap.from_unet(unet)
    assert len(unet_map) == 282
    for path, sgm in unet_map.items():
        assert f"model.diffusion_model.{sgm}.weight" == ldm_of[f"{path}.weight"], path


# --- the names sd-scripts writes ----------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_kohya_names_equal_sd_scripts(conv):
    model = _model()
    theirs, ours = _sd_scripts_names(model, conv=conv), _our_names(model, conv=conv)
    assert len(theirs["lora_unet"]) == UNET_LORA + (LOCON_CONVS + LOCON_LINEAR if conv else 0)
    assert (len(theirs["lora_te1"]), len(theirs["lora_te2"])) == (TE1_LORA, TE2_LORA)
    for prefix in theirs:
        assert sorted(ours[prefix]) == sorted(theirs[prefix]), prefix
        assert len(set(ours[prefix])) == len(ours[prefix])


def test_text_encoder_names_equal_sd_scripts():
    # CLIP-L's transformers 5 paths lack `text_model.` (bigG's CLIPTextModelWithProjection has it): both
    # get it.
    names = _our_names(_model(), conv=False)
    parts = [
        "self_attn_q_proj",
        "self_attn_k_proj",
        "self_attn_v_proj",
        "self_attn_out_proj",
        "mlp_fc1",
        "mlp_fc2",
    ]
    for prefix, layers in (("lora_te1", 12), ("lora_te2", 32)):
        expected = {f"{prefix}_text_model_encoder_layers_{i}_{part}" for i in range(layers) for part in parts}
        assert set(names[prefix]) == expected
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names["lora_te1"]
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names["lora_te2"]


def test_exported_file_has_sd_scripts_names():
    # End to end on the writer: peft injection (kohya presets + LoCon) → kohya_state_dict.
    model = meta_sdxl_model()  # fresh modules: adapters go in
    linear, convs = unet_lora_layers(model.unet, "kohya", conv=True)
    add_lora_adapter(model.unet, linear, 2, 1.0, conv_targets=convs, conv_rank=2, conv_alpha=1.0)
    for text_encoder in (model.text_encoder, model.text_encoder_2):
        add_lora_adapter(text_encoder, _kohya_text_encoder_layers(text_encoder), 2, 1.0)
    networks = sdxl_networks(model.unet, [model.text_encoder, model.text_encoder_2])
    for network in networks:
        materialise_lora_weights(network.module)
    state_dict = kohya_state_dict(networks)
    names = sorted({key.split(".", 1)[0] for key in state_dict})
    assert (
        count_modules(state_dict)
        == len(names)
        == UNET_LORA + LOCON_CONVS + LOCON_LINEAR + TE1_LORA + TE2_LORA
    )
    expected = _sd_scripts_names(_model(), conv=True)  # on modules without peft's wrappers
    assert names == sorted(n for prefix_names in expected.values() for n in prefix_names)
    assert state_dict["lora_unet_output_blocks_2_2_conv.lora_down.weight"].shape == (2, 1280, 3, 3)
    assert state_dict["lora_unet_input_blocks_3_0_op.lora_up.weight"].shape == (320, 2, 1, 1)


# --- what A1111 (and Forge) and ComfyUI make of them --------------------------------------------------------


def test_comfyui_detects_the_sdxl_unet_config():
    # ComfyUI's SDXL (comfy/supported_models.py: transformer_depth [0, 0, 2, 2, 10, 10]), from sgm tensors.
    config = comfyui_detect_unet_config(_model().checkpoint, "model.diffusion_model.")
    assert config == {
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10,
    }


def test_every_unet_layer_reaches_its_layer_in_a1111_and_comfyui():
    # Every Linear/Conv2d a user may target, not just the presets' (up-sampler convs and label_emb too).
    model, unet_map = _model(), _unet_map()
    network = LoraNetwork("lora_unet", model.unet, key_map=unet_map)
    layers, comfy = a1111_sdxl_layers(), comfyui_sdxl_model()
    for path, sgm in unet_map.items():
        name = network.kohya_name(path)
        layer = f"diffusion_model_{sgm.replace('.', '_')}"
        assert a1111_match(name, layers) == (layer, layer), name
        target = f"diffusion_model.{sgm}.weight"
        assert comfy.key_map[name] == target, name
        assert model.checkpoint[f"model.{target}"].shape == model.unet.get_submodule(path).weight.shape
    names = [network.kohya_name(path) for path, _ in unet_map.items()]
    assert a1111_dropped(names, layers) == {} and comfyui_dropped(names, comfy) == {}


def test_text_encoder_names_reach_their_layers_in_a1111_and_comfyui():
    model = _model()
    _, te1_net, te2_net = sdxl_networks(model.unet, [model.text_encoder, model.text_encoder_2])
    layers, comfy = a1111_sdxl_layers(), comfyui_sdxl_model()
    open_clip = {"mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj", "self_attn.out_proj": "attn_out_proj"}
    for net, kind in ((te1_net, "clip_l"), (te2_net, "clip_g")):
        for path in adaptable_layer_paths(net.module):
            if path == "text_projection":  # bigG's pooled-output projection: not a CLIP layer's
                continue
            name = net.kohya_name(path)
            dotted = net.kohya_path(path)  # text_model.encoder.layers.{i}.{part}
            assert comfy.key_map[name] == f"{kind}.transformer.{dotted}.weight", name
            index, part = dotted.split(".")[3], ".".join(dotted.split(".")[4:])
            if kind == "clip_l":
                expected = f"0_transformer_{dotted.replace('.', '_')}"
            else:  # q/k/v attach to OpenCLIP's fused attention, applied when all of q/k/v/out_proj are there
                expected = f"1_model_transformer_resblocks_{index}_{open_clip.get(part, 'attn')}"
            assert a1111_match(name, layers)[1] == expected, name
    names = [n for names in _our_names(model, conv=False).values() for n in names]
    assert a1111_dropped(names, layers) == {} and comfyui_dropped(names, comfy) == {}


def test_diffusers_spelled_sdxl_unet_keys_lose_layers_in_a1111():
    """Why we write sgm names: the same layers named by diffusers paths (kohya's SD 1.x style) resolve in
    ComfyUI, but A1111's SD 1.x conversion sends the first up-sampler to the attention slot and has no rule
    for add_embedding, so WebUI drops those three."""
    model = _model()
    names = [LoraNetwork("lora_unet", model.unet).kohya_name(p) for p in adaptable_layer_paths(model.unet)]
    assert comfyui_dropped(names, comfyui_sdxl_model()) == {}
    layers = a1111_sdxl_layers()
    assert sorted(a1111_dropped(names, layers)) == [
        "lora_unet_add_embedding_linear_1",
        "lora_unet_add_embedding_linear_2",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ]
    wrong = a1111_convert("lora_unet_up_blocks_0_upsamplers_0_conv", is_sd2=False)
    assert wrong == "diffusion_model_output_blocks_2_1_conv"  # output_blocks.2.1 is a Transformer2DModel
    assert (
        a1111_match("lora_unet_output_blocks_2_2_conv", layers)
        == ("diffusion_model_output_blocks_2_2_conv",) * 2
    )


# --- the seam: a network with a key map, written and read back ----------------------------------------------

# A small SDXL-shaped UNet (text_time embedding, linear projections, attention-less first level) with another
# layout: 3 resnets per down block, two levels.
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=3, block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)  # fmt: skip


def _tiny_adapted_unet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    linear, convs = unet_lora_layers(unet, "kohya", conv=True)
    add_lora_adapter(unet, linear, 4, 2.0, conv_targets=convs, conv_rank=2, conv_alpha=1.0)
    for layer in unet.modules():
        if isinstance(layer, BaseTunerLayer):
            nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: give the file something
    return unet


def test_tiny_layout_map_and_network_weights_round_trip(tmp_path):
    unet = _tiny_adapted_unet(0)
    unet_map = SgmUnetMap.from_unet(unet)  # built after peft wrapped the layers: same paths
    assert dict(unet_map.items()) == dict(
        SgmUnetMap.from_unet(UNet2DConditionModel(**TINY_SDXL_UNET)).items()
    )
    assert unet_map("down_blocks.0.downsamplers.0.conv") == "input_blocks.4.0.op"
    assert unet_map("down_blocks.1.attentions.2.proj_out") == "input_blocks.7.1.proj_out"
    assert unet_map("mid_block.attentions.0.transformer_blocks.0.attn2.to_v") == (
        "middle_block.1.transformer_blocks.0.attn2.to_v"
    )
    assert unet_map("up_blocks.0.upsamplers.0.conv") == "output_blocks.3.2.conv"
    assert unet_map("up_blocks.1.resnets.3.conv_shortcut") == "output_blocks.7.0.skip_connection"

    (network,) = sdxl_networks(unet)
    state_dict = kohya_state_dict([network], dtype=torch.float32)
    assert "lora_unet_output_blocks_3_2_conv.lora_down.weight" in state_dict
    assert not any(key.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for key in state_dict)
    path = tmp_path / "tiny_sdxl.safetensors"
    safetensors.torch.save_file(state_dict, str(path))

    fresh = _tiny_adapted_unet(1)
    (target,) = sdxl_networks(fresh)
    report = load_network_weights([target], path)
    assert (report.loaded, report.not_in_file) == (len(lora_layers(target)), 0)
    assert kohya_state_dict([target], dtype=torch.float32).keys() == state_dict.keys()
    for key, value in kohya_state_dict([target], dtype=torch.float32).items():
        assert torch.allclose(value, state_dict[key]), key

    # Files that spell SDXL UNet modules by diffusers path (other trainers) load into the same layers.
    diffusers_spelled = kohya_state_dict([LoraNetwork("lora_unet", unet)], dtype=torch.float32)
    path = tmp_path / "tiny_sdxl_diffusers_names.safetensors"
    safetensors.torch.save_file(diffusers_spelled, str(path))
    (target,) = sdxl_networks(_tiny_adapted_unet(2))
    assert load_network_weights([target], path).loaded == len(lora_layers(target))
    assert kohya_state_dict([target], dtype=torch.float32).keys() == state_dict.keys()


def test_network_takes_a_name_prefix_or_a_key_map():
    layer = nn.Linear(2, 2)
    assert LoraNetwork("lora_te", layer, "text_model.").kohya_path("encoder.x") == "text_model.encoder.x"
    mapped = LoraNetwork("lora_unet", layer, key_map=str.upper)
    assert mapped.kohya_name("mid_block.x") == "lora_unet_MID_BLOCK_X"
    with pytest.raises(ValueError, match="name_prefix or a key_map"):
        LoraNetwork("lora_unet", layer, "text_model.", key_map=str.upper)
    with pytest.raises(ValueError, match="two text encoders"):
        sdxl_networks(_model().unet, [layer])
