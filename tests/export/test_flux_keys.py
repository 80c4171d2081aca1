"""FLUX.1 LoRA files (export/flux_keys.py, export/fused.py): sd-scripts' names, the q/k/v (and single-block
MLP input) LoRAs written as one LoRA of the fused BFL layer with exactly the same weight update, read back
exactly, loaded by diffusers' FluxPipeline to the same weights, and the names of the full-size model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft.tuners.lora import LoraLayer

from lora_scripts.export.flux_keys import flux_networks
from lora_scripts.export.fused import PartLora, fuse, split
from lora_scripts.export.kohya import kohya_state_dict
from lora_scripts.export.lora_layouts import kohya_tensors, lora_model
from lora_scripts.export.lora_model import LoraModel, LoraModule
from lora_scripts.models.lora import add_lora_adapter
from lora_scripts.models.lora_presets import FLUX_PRESETS, resolve_targets
from lora_scripts.models.tiny import build_tiny_flux_components

ASSETS = Path(__file__).parents[2] / "lora_scripts" / "models" / "assets"
BFL_DOUBLE = ["img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2"]
BFL_DOUBLE += [name.replace("img", "txt") for name in BFL_DOUBLE]
BFL_SINGLE = ["linear1", "linear2", "modulation.lin"]


def _trained_transformer(seed: int = 0, preset: str = "kohya"):
    tiny = build_tiny_flux_components(seed)
    layers = resolve_targets(
        tiny.transformer, preset, key="target_modules", component="transformer", presets=FLUX_PRESETS
    )
    add_lora_adapter(tiny.transformer, layers, rank=4, alpha=2.0)
    generator = torch.Generator().manual_seed(seed)
    for module in tiny.transformer.modules():
        if isinstance(module, LoraLayer):  # peft starts B at zero: give every LoRA an update
            weight = module.lora_B["default"].weight
            weight.data = torch.randn(weight.shape, generator=generator) * 0.1
    return tiny


def _updates(transformer) -> dict[str, torch.Tensor]:
    """Each adapted layer's update scale * B @ A (diffusers path)."""
    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            out[name] = (b @ a) * module.scaling["default"]
    return out


def test_fuse_and_split_are_exact_and_keep_each_parts_update():
    generator = torch.Generator().manual_seed(1)
    parts = {
        0: PartLora(torch.randn(4, 8, generator=generator), torch.randn(6, 4, generator=generator), 2.0),
        2: PartLora(torch.randn(2, 8, generator=generator), torch.randn(5, 2, generator=generator), 8.0),
    }
    fused = fuse(parts, (6, 6, 5))
    assert fused.down.shape == (12, 8) and fused.up.shape == (17, 12)
    update = fused.scale * fused.up @ fused.down
    torch.testing.assert_close(update[:6], parts[0].scale * parts[0].up @ parts[0].down)
    assert not update[6:12].any()  # the part without a LoRA
    torch.testing.assert_close(update[12:], parts[2].scale * parts[2].up @ parts[2].down)
    back = split(fused, (6, 6, 5))
    assert sorted(back) == [0, 2]
    for index, part in back.items():
        torch.testing.assert_close(
            part.scale * part.up @ part.down, parts[index].scale * parts[index].up @ parts[index].down
        )
    # A LoRA trained on the fused layer itself (sd-scripts' default): one down, the up's rows split.
    dense = PartLora(torch.randn(3, 8, generator=generator), torch.randn(17, 3, generator=generator), 3.0)
    pieces = split(dense, (6, 6, 5))
    assert sorted(pieces) == [0, 1, 2] and all(p.down is dense.down for p in pieces.values())
    joined = torch.cat([p.scale * p.up @ p.down for p in pieces.values()])
    torch.testing.assert_close(joined, dense.scale * dense.up @ dense.down)


def test_saved_names_are_sd_scripts_and_updates_exact():
    tiny = _trained_transformer()
    tensors = kohya_state_dict(flux_networks(tiny.transformer, [None, None]), torch.float32)
    modules = {key.removesuffix(".lora_down.weight") for key in tensors if key.endswith(".lora_down.weight")}
    expected = {f"lora_unet_double_blocks_{b}_{n.replace('.', '_')}" for b in range(2) for n in BFL_DOUBLE}
    expected |= {f"lora_unet_single_blocks_{b}_{n.replace('.', '_')}" for b in range(2) for n in BFL_SINGLE}
    assert modules == expected
    updates = _updates(tiny.transformer)

    def fused_update(stem):
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        return (up @ down) * (tensors[f"{stem}.alpha"].item() / down.shape[0])

    qkv = fused_update("lora_unet_double_blocks_1_img_attn_qkv")
    parts = [updates[f"transformer_blocks.1.attn.{p}"] for p in ("to_q", "to_k", "to_v")]
    torch.testing.assert_close(qkv, torch.cat(parts))
    linear1 = fused_update("lora_unet_single_blocks_0_linear1")
    parts = [
        updates[f"single_transformer_blocks.0.{p}"]
        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    ]
    torch.testing.assert_close(linear1, torch.cat(parts))
    torch.testing.assert_close(
        fused_update("lora_unet_double_blocks_0_txt_mod_lin"),
        updates["transformer_blocks.0.norm1_context.linear"],
    )


def test_a_saved_file_reads_back_to_every_layers_update():
    tiny = _trained_transformer(
        preset="attn"
    )  # q, k, v and out of both streams: linear1 gets its MLP part as zeros
    tensors = kohya_state_dict(flux_networks(tiny.transformer, [None, None]), torch.float32)
    fresh = build_tiny_flux_components(5).transformer
    model = lora_model(
        tensors, {}, "kohya", flux_networks(fresh, [None, None]), "FLUX.1", path=Path("x"), key="k"
    )
    read = {m.path: m.update() for m in model.modules}
    assert read.keys() == _updates(tiny.transformer).keys()  # the zero MLP part is not read as a module
    for path, update in _updates(tiny.transformer).items():
        torch.testing.assert_close(read[path], update)
    # Written again from the model: the same tensors.
    again = kohya_tensors(model, flux_networks(fresh, [None, None]))
    assert again.keys() == tensors.keys()
    for key, value in tensors.items():
        torch.testing.assert_close(again[key], value)


def _meta_full_size_transformer():
    with init_empty_weights():
        return FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(ASSETS / "flux_dev", subfolder="transformer")
        )


def test_diffusers_reads_the_full_size_file_to_the_same_updates():
    """diffusers' kohya FLUX conversion (what FluxPipeline.load_lora_weights runs) knows only FLUX.1's real
    widths, so the file is the full-size model's, for a few blocks, rank 2."""
    transformer = _meta_full_size_transformer()
    paths = [
        p
        for p in resolve_targets(
            transformer, "kohya", key="target_modules", component="transformer", presets=FLUX_PRESETS
        )
        if p.startswith(("transformer_blocks.0.", "transformer_blocks.18.", "single_transformer_blocks.37."))
    ]
    generator = torch.Generator().manual_seed(2)
    modules = []
    for path in paths:
        layer = transformer.get_submodule(path)
        down = torch.randn(2, layer.in_features, generator=generator) * 0.1
        up = torch.randn(layer.out_features, 2, generator=generator) * 0.1
        modules.append(LoraModule("transformer", path, down, up, alpha=1.0))
    tensors = kohya_tensors(LoraModel("FLUX.1", modules), flux_networks(transformer, [None, None]))
    converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    # Each update applied to a probe (the full 12288 x 3072 products would be slow to compare).
    probe = torch.randn(15360, 3, generator=generator)  # the widest input: a single block's proj_out
    theirs = {}
    for key in converted:
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight")
            a, b = converted[key], converted[f"{stem}.lora_B.weight"]
            theirs[stem.removeprefix("transformer.")] = b @ (a @ probe[: a.shape[1]])
    assert theirs.keys() == {m.path for m in modules}
    for m in modules:
        ours = m.scale * (m.up @ (m.down @ probe[: m.down.shape[1]]))
        torch.testing.assert_close(theirs[m.path], ours, rtol=1e-5, atol=1e-6)


def test_full_size_names_are_the_bfl_modules():
    transformer = _meta_full_size_transformer()
    layers = resolve_targets(
        transformer, "kohya", key="target_modules", component="transformer", presets=FLUX_PRESETS
    )
    [network] = flux_networks(transformer, [None, None])
    names = set()
    for path in layers:
        part = network.fusion(path)
        names.add(part.path if part else network.kohya_path(path))
    expected = {f"double_blocks.{b}.{n}" for b in range(19) for n in BFL_DOUBLE}
    expected |= {f"single_blocks.{b}.{n}" for b in range(38) for n in BFL_SINGLE}
    assert names == expected and len(names) == 19 * 10 + 38 * 3
    assert network.fusion("single_transformer_blocks.0.proj_mlp").sizes == (3072, 3072, 3072, 12288)
    assert network.fusion("transformer_blocks.0.attn.add_v_proj").sizes == (3072, 3072, 3072)
    with pytest.raises(ValueError, match="no name"):
        network.kohya_path("norm_out.linear")
