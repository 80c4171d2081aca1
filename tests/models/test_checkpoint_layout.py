"""The single-file name map (models/checkpoint_layout.py): every Linear/Conv2d weight of the UNet and text
encoders is found, in the right shape and rows, in CompVis (SD 1.x CLIP, SD 2.x OpenCLIP) and sgm (SDXL)
files as users download them (written here by tests/helpers/compvis.py and sgm.py)."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from lora_scripts.errors import UserError
from lora_scripts.export.lora_layouts import component_networks
from lora_scripts.models.checkpoint_layout import CheckpointLayout, open_clip_name
from lora_scripts.models.meta_modules import meta_model
from lora_scripts.models.tiny import (
    build_tiny_sd,
    build_tiny_sd_components,
    build_tiny_sdxl,
    build_tiny_sdxl_components,
)
from tests.helpers.compvis import to_compvis_state_dict
from tests.helpers.sgm import to_sgm_state_dict
from tests.helpers.webui_keys import meta_sd_model, meta_sdxl_model


def _tiny_state_and_components(version):
    if version == "sdxl":
        tiny = build_tiny_sdxl_components()
        parts = (tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
        state = to_sgm_state_dict(*(p.state_dict() for p in parts), layers_per_block=2)
        return state, {
            "unet": tiny.unet,
            "text_encoder": tiny.text_encoder,
            "text_encoder_2": tiny.text_encoder_2,
        }
    tiny = build_tiny_sd_components(version=version)
    state = to_compvis_state_dict(
        tiny.unet.state_dict(),
        tiny.vae.state_dict(),
        tiny.text_encoder.state_dict(),
        layers_per_block=1,
        text_encoder="open_clip" if version == "sd_v2" else "clip",
    )
    return state, {"unet": tiny.unet, "text_encoder": tiny.text_encoder}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """The tiny diffusers folders whose configs size the layers: SD 1.x, SD 2.x, SDXL."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "sd_v1": build_tiny_sd(root / "sd1"),
        "sd_v2": build_tiny_sd(root / "sd2", version="sd_v2"),
        "sdxl": build_tiny_sdxl(root / "sdxl"),
    }


@pytest.mark.parametrize("version", ["sd_v1", "sd_v2", "sdxl"])
def test_every_layer_weight_is_where_the_map_says(version, tiny_dirs):
    folder = tiny_dirs[version]
    model = meta_model(version, folder)
    layout = CheckpointLayout.of(model)
    state, live = _tiny_state_and_components(version)
    nets = component_networks(list(model.networks))
    expected = 0
    for component, net in nets.items():
        for path, layer in net.module.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                expected += 1
                name = f"{component}.{net.name_prefix}{path}"
                where = layout[name]
                weight = live[component].get_submodule(path).weight
                assert torch.equal(where.weight(state[where.key]), weight), name
    assert len(layout.locations) == expected
    layout.check({key: tuple(value.shape) for key, value in state.items()}, layout.locations, what="--base x")
    fused = [w for w in layout.locations.values() if w.rows is not None]
    assert bool(fused) == (version != "sd_v1")  # OpenCLIP: SD 2.x's encoder, SDXL's second


def test_open_clip_q_k_v_are_row_thirds_of_in_proj():
    layout = CheckpointLayout.of(meta_model("sdxl"))
    key = "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    prefix = "text_encoder_2.text_model.encoder.layers.31.self_attn."
    assert [(layout[prefix + p].key, layout[prefix + p].rows) for p in ("q_proj", "k_proj", "v_proj")] == [
        (key, (0, 1280)),
        (key, (1280, 2560)),
        (key, (2560, 3840)),
    ]
    projection = layout["text_encoder_2.text_projection"]
    assert projection.key == "conditioner.embedders.1.model.text_projection" and projection.transposed
    assert open_clip_name("encoder.layers.2.self_attn.v_proj.bias") == (
        "transformer.resblocks.2.attn.in_proj_bias",
        2,
    )
    assert open_clip_name("embeddings.position_ids") is None


@cache
def _full_size_header(version):
    """Key → shape of a full-size file's UNet and text encoders, from meta-device modules; SDXL's UNet keys
    come from sd-scripts' own sgm UNet (tests/helpers/sd_scripts_sdxl.py), not from our map."""
    if version == "sdxl":
        state = meta_sdxl_model().checkpoint
        extra = {"conditioner.embedders.1.model.text_projection": (1280, 1280)}  # [width, projection]
    else:
        state, extra = meta_sd_model(version).compvis, {}
    return {**{key: tuple(value.shape) for key, value in state.items()}, **extra}


@pytest.mark.parametrize(
    ("version", "layers"), [("sd_v1", 282 + 72), ("sd_v2", 282 + 138), ("sdxl", 794 + 265)]
)
def test_full_size_maps_fit_full_size_files(version, layers):
    """SD 1.5: 282 UNet layers and 12 × 6 CLIP ones; SD 2.x: 23 OpenCLIP blocks in diffusers (the file's 24th
    is unused); SDXL: 794 UNet layers, 12 × 6 + 32 × 6 + the text projection."""
    layout = CheckpointLayout.of(meta_model(version))
    assert len(layout.locations) == layers
    layout.check(_full_size_header(version), layout.locations, what="--base x")
    proj_in = layout["unet.down_blocks.1.attentions.0.proj_in"]
    assert proj_in.key == "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    assert len(proj_in.shape) == (4 if version == "sd_v1" else 2)  # SD 1.x: a 1x1 conv


def test_a_missing_or_misshapen_weight_is_named():
    layout = CheckpointLayout.of(meta_model("sd_v1"))
    header = dict(_full_size_header("sd_v1"))
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    fc1 = "text_encoder.text_model.encoder.layers.3.mlp.fc1"
    del header[layout[q].key]
    header[layout[fc1].key] = (3072, 1024)
    with pytest.raises(UserError) as caught:
        layout.check(header, [q, fc1, "unet.conv_in"], what="--base model.safetensors")
    assert caught.value.messages == [
        f"--base model.safetensors: the file has no '{layout[q].key}', where {q} is stored in sd_v1 "
        "checkpoints; it is not the base model this needs.",
        f"--base model.safetensors: '{layout[fc1].key}' has shape [3072, 1024], which does not hold {fc1} "
        "[3072, 768]; it is not the base model this needs.",
    ]


def test_a_1x1_conv_stored_as_a_matrix_fits():
    """Some SD 1.x files hold proj_in / proj_out as [out, in]; the layer is a 1x1 conv [out, in, 1, 1]."""
    layout = CheckpointLayout.of(meta_model("sd_v1"))
    where = layout["unet.down_blocks.0.attentions.0.proj_in"]
    assert where.shape == (320, 320, 1, 1) and where.fits((320, 320)) and not where.fits((320, 640))
    stored = torch.zeros(320, 320)
    where.add(stored, torch.ones(320, 320, 1, 1))
    assert torch.equal(stored, torch.ones(320, 320))
