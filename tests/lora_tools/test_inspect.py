"""`inspect`: family, layout, modules, training facts, hashes and where the file loads, from the file."""

from __future__ import annotations

import hashlib
import json

import safetensors.torch
import torch

from lora_scripts.cli import main
from lora_scripts.export.hashes import precalculate_hashes
from lora_scripts.lora_tools.convert import convert
from lora_scripts.lora_tools.inspection import format_inspection, inspect_lora
from lora_scripts.models.meta_modules import meta_model
from tests.helpers.synthetic_lora import synthetic_kohya

SD_SCRIPTS_METADATA = {
    "ss_base_model_version": "sd_v1",
    "ss_output_name": "ink_painting_v1",
    "ss_steps": "1200",
    "ss_epoch": "10",
    "ss_resolution": "(512, 512)",
    "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
    "ss_learning_rate": "0.0001",
    "ss_text_encoder_lr": "5e-05",
    "ss_training_started_at": "1733300000.5",
    "ss_dataset_dirs": json.dumps(
        {"10_ink": {"n_repeats": 10, "img_count": 24}, "1_reg": {"n_repeats": 1, "img_count": 50}}
    ),
    "ss_tag_frequency": json.dumps(
        {"10_ink": {"ink wash": 24, "mountain": 9}, "1_reg": {"mountain": 30, "sky": 2}}
    ),
}


def _save(path, tensors, metadata):
    meta = dict(metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_hashes(tensors, meta)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    return path


def test_an_sd15_lora_with_sd_scripts_metadata(tmp_path):
    tensors = synthetic_kohya(meta_model("sd_v1"), rank=8, alpha=4.0, odd_alpha_every=10**6)
    path = _save(tmp_path / "ink.safetensors", tensors, SD_SCRIPTS_METADATA)
    ins = inspect_lora(path)
    assert (ins.version, ins.layout, ins.network_type) == ("SD 1.x", "kohya", "LoRA")
    unet, te = ins.components
    # SD 1.5: 16 transformer blocks × 2 attentions × 4 projections; CLIP-L: 12 layers × 4
    assert (unet.component, unet.modules, unet.ranks, unet.alphas) == ("unet", 128, {8: 128}, {4.0: 128})
    assert (te.component, te.modules) == ("text_encoder", 48)
    assert ins.training["steps"] == "1200" and ins.training["optimizer"].endswith("AdamW8bit")
    assert ins.training["started"] == "2024-12-04 08:13:20 UTC"
    assert [(d.folder, d.images, d.repeats) for d in ins.datasets] == [("10_ink", 24, 10), ("1_reg", 50, 1)]
    assert ins.top_tags[:3] == [("mountain", 39), ("ink wash", 24), ("sky", 2)]
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert (
        ins.hashes["A1111 LoRA hash (sshs_model_hash)"] == hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    )
    assert ins.hashes["sshs_model_hash in the metadata"] == "matches"
    assert ins.hashes["Civitai AutoV2"] == hashlib.sha256(data).hexdigest()[:10].upper()
    assert ins.loads_in["A1111/Forge"] == "yes, all 176 modules"
    text = format_inspection(ins)
    assert "unet             128 modules   rank 8   alpha 4" in text
    assert "10_ink: 24 images × 10 repeats" in text


def test_an_sdxl_locon_and_its_diffusers_conversion(tmp_path):
    tensors = synthetic_kohya(meta_model("sdxl"), conv_rank=2, text_encoder=False)
    path = _save(tmp_path / "xl.safetensors", tensors, {})
    ins = inspect_lora(path)
    assert (ins.version, ins.network_type) == ("SDXL", "LoCon")
    (unet,) = ins.components
    assert unet.conv_modules > 0 and set(unet.ranks) == {2, 4}
    assert ins.hashes["sshs_model_hash in the metadata"] == "matches"
    convert(path, tmp_path / "xl_diffusers.safetensors", to="diffusers")
    converted = inspect_lora(tmp_path / "xl_diffusers.safetensors")
    assert converted.layout == "diffusers"
    assert converted.loads_in["ComfyUI"].startswith("no (they read kohya names)")
    assert [entry["tool"] for entry in converted.history] == ["convert"]


def test_names_other_loaders_may_not_map_are_listed(tmp_path):
    """SDXL UNet modules under diffusers paths (what diffusers' kohya conversion writes): A1111 maps the
    up-samplers of such files wrongly, so inspect says so and names convert as the fix."""
    base = meta_model("sdxl")
    tensors = synthetic_kohya(base, text_encoder=False)
    to_diffusers = {
        f"lora_unet_{sgm.replace('.', '_')}": f"lora_unet_{path.replace('.', '_')}"
        for path, sgm in base.networks[0].key_map.items()  # type: ignore[union-attr]
    }
    renamed = {}
    for key, value in tensors.items():
        stem, _, suffix = key.partition(".")
        renamed[f"{to_diffusers[stem]}.{suffix}"] = value
    path = _save(tmp_path / "x.safetensors", renamed, {"ss_base_model_version": "sdxl_base_v1-0"})
    ins = inspect_lora(path)
    assert ins.loads_in["A1111/Forge"].startswith("not sure: 560 of 560 modules")
    convert(path, tmp_path / "fixed.safetensors", to="kohya")
    assert inspect_lora(tmp_path / "fixed.safetensors").loads_in["A1111/Forge"] == "yes, all 560 modules"


def test_cli_inspect_json_and_convert(tmp_path, capsys):
    path = _save(tmp_path / "a.safetensors", synthetic_kohya(meta_model("sd_v1"), text_encoder=False), {})
    assert main(["inspect", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["version"].startswith("SD 1.x") and facts["components"][0]["modules"] == 128
    assert (
        main(
            [
                "convert",
                str(path),
                "-o",
                str(tmp_path / "d.safetensors"),
                "--to",
                "diffusers",
                "--precision",
                "bf16",
            ]
        )
        == 0
    )
    out = safetensors.torch.load_file(str(tmp_path / "d.safetensors"))
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    assert main(["convert", str(path), "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 2
    assert "the file exists" in capsys.readouterr().err
