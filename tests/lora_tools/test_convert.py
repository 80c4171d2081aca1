"""`convert`: kohya ↔ diffusers ↔ peft, bit for bit, loaded by diffusers and peft with each module's own
alpha / rank."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_scripts.errors import UserError
from lora_scripts.lora_tools.convert import convert
from lora_scripts.lora_tools.files import HISTORY_KEY, open_lora
from lora_scripts.models.meta_modules import meta_model
from tests.helpers.synthetic_lora import synthetic_kohya


def _write(path, tensors, metadata=None):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata or {})
    return path


def _metadata(path):
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


@pytest.mark.parametrize(
    ("version", "conv_rank"),
    [("sd_v1", None), ("sd_v2", None), ("sdxl", 2)],
    ids=["sd15", "sd2", "sdxl-locon"],
)
def test_kohya_diffusers_peft_kohya_round_trip_is_bit_exact(tmp_path, version, conv_rank):
    original = synthetic_kohya(meta_model(version), conv_rank=conv_rank)
    source = _write(tmp_path / "a.safetensors", original, {"ss_output_name": "a"})
    convert(source, tmp_path / "d.safetensors", to="diffusers")
    convert(tmp_path / "d.safetensors", tmp_path / "p", to="peft")
    result = convert(tmp_path / "p", tmp_path / "back.safetensors", to="kohya")
    assert result.version == version and result.source_layout == "peft"
    back = safetensors.torch.load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    history = json.loads(_metadata(tmp_path / "back.safetensors")[HISTORY_KEY])
    assert [entry["tool"] for entry in history] == ["convert"] * 3
    assert [entry["params"]["to"] for entry in history] == ["diffusers", "peft", "kohya"]


def test_diffusers_layout_keys_and_adapter_metadata(tmp_path):
    original = synthetic_kohya(meta_model("sd_v1"))
    convert(_write(tmp_path / "a.safetensors", original), tmp_path / "d.safetensors", to="diffusers")
    tensors = safetensors.torch.load_file(str(tmp_path / "d.safetensors"))
    meta = _metadata(tmp_path / "d.safetensors")
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(tensors[f"{name}.lora_A.weight"], original[f"{kohya}.lora_down.weight"])
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.") for k in tensors)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 2.0
    odd = {k.removesuffix(".alpha") for k, v in original.items() if k.endswith(".alpha") and float(v) == 3.0}
    assert len(config["unet.alpha_pattern"]) + len(config["text_encoder.alpha_pattern"]) == len(odd) > 0
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4"


def _kohya_update(tensors, stem):
    down = tensors[f"{stem}.lora_down.weight"].float()
    up = tensors[f"{stem}.lora_up.weight"].float()
    alpha = float(tensors[f"{stem}.alpha"])
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * alpha / down.shape[0]


def test_diffusers_loads_and_fuses_the_converted_file_exactly(tmp_path, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    base = meta_model("sd_v1", tiny_sd_dir)
    original = synthetic_kohya(base, dtype=torch.float32, odd_alpha_every=3)
    source = _write(tmp_path / "a.safetensors", original)
    convert(source, tmp_path / "d.safetensors", to="diffusers", config_dir=tiny_sd_dir)
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False
    )
    before_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    checked = 0
    opened = open_lora(source, config_dir=tiny_sd_dir)
    for stem in {k.rsplit(".", 2)[0] for k in original if k.endswith(".lora_down.weight")}:
        module = next(
            m for m in opened.model.modules if m.name.replace(".", "_").endswith(stem.split("_", 2)[2])
        )
        key = (
            module.path.removeprefix("text_model.") + ".weight"
            if module.component != "unet"
            else module.path + ".weight"
        )
        model, before = (
            (pipe.unet, before_unet) if module.component == "unet" else (pipe.text_encoder, before_te)
        )
        after = model.state_dict()[key]
        torch.testing.assert_close(after, before[key] + _kohya_update(original, stem), rtol=0, atol=1e-5)
        checked += 1
    assert checked == sum(k.endswith(".lora_down.weight") for k in original)


def test_peft_loads_the_converted_text_encoder_adapter(tmp_path, tiny_sd_dir):
    from peft import PeftModel
    from transformers import CLIPTextModel

    base = meta_model("sd_v1", tiny_sd_dir)
    original = synthetic_kohya(base, dtype=torch.float32, odd_alpha_every=2)
    source = _write(tmp_path / "a.safetensors", original)
    convert(source, tmp_path / "p", to="peft", config_dir=tiny_sd_dir)
    encoder = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    merged = PeftModel.from_pretrained(encoder, tmp_path / "p" / "text_encoder").merge_and_unload()
    after = merged.state_dict()
    opened = open_lora(source, config_dir=tiny_sd_dir)
    te = [m for m in opened.model.modules if m.component == "text_encoder"]
    assert te
    for module in te:
        key = module.path.removeprefix("text_model.") + ".weight"
        torch.testing.assert_close(after[key], before[key] + module.update(), rtol=0, atol=1e-5)


def test_outputs_are_never_replaced_without_overwrite(tmp_path):
    source = _write(tmp_path / "a.safetensors", synthetic_kohya(meta_model("sd_v1"), text_encoder=False))
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(UserError, match=r"the file exists; .*--overwrite"):
        convert(source, tmp_path / "out.safetensors", to="diffusers")
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    with pytest.raises(UserError, match="that is an input of this command"):
        convert(source, source, to="kohya", overwrite=True)
    convert(source, tmp_path / "out.safetensors", to="diffusers", overwrite=True)
    assert safetensors.torch.load_file(str(tmp_path / "out.safetensors"))


def test_a_lora_for_another_model_is_refused_by_name(tmp_path):
    tensors = synthetic_kohya(meta_model("sd_v1"), text_encoder=False)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    source = _write(tmp_path / "a.safetensors", tensors)
    with pytest.raises(UserError, match=r"'lora_unet_not_a_layer'.*made for another base model"):
        convert(source, tmp_path / "out.safetensors", to="diffusers")
