"""Reading single files and telling SD 1.x from 2.x, epsilon from v-prediction (keys and shapes only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.models.detect import (
    detect_sd_version,
    has_v_pred_key,
    is_v_prediction_unet,
    read_checkpoint,
    unet_context_dim,
)

FILE = Path("model.safetensors")


def fake_sd(
    text_encoder: str = "clip", context_dim: int = 768, in_channels: int = 4
) -> dict[str, torch.Tensor]:
    """The few keys detection looks at, with SD-like names and shapes."""
    unet = "model.diffusion_model."
    sd = {
        unet + "input_blocks.0.0.weight": torch.zeros(320, in_channels, 3, 3),
        unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, context_dim),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }
    if text_encoder == "clip":
        sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 768)
    elif text_encoder == "open_clip":
        sd["cond_stage_model.model.token_embedding.weight"] = torch.zeros(8, 1024)
    return sd


def test_sd1_and_sd2_are_told_apart_by_the_text_encoder():
    assert detect_sd_version(fake_sd("clip", 768), FILE) == "sd_v1"
    assert detect_sd_version(fake_sd("open_clip", 1024), FILE) == "sd_v2"
    assert unet_context_dim(fake_sd("clip", 768)) == 768
    assert unet_context_dim(fake_sd("open_clip", 1024)) == 1024


@pytest.mark.parametrize(
    ("state_dict", "message"),
    [
        (
            {"conditioner.embedders.1.model.positional_embedding": torch.zeros(1)},
            "SDXL checkpoint, not an SD 1.x/2.x one",
        ),
        (
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)},
            "is a LoRA, not a base model",
        ),
        (
            {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)},
            "other model families are not supported yet",
        ),
        (fake_sd(in_channels=9), "9-channel UNet input"),
        (fake_sd(text_encoder="none"), "has no text encoder weights"),
    ],
    ids=["sdxl", "lora", "flux", "inpainting", "unet_only"],
)
def test_other_files_are_refused_with_one_sentence(state_dict, message):
    with pytest.raises(UserError, match=message) as err:
        detect_sd_version(state_dict, FILE)
    assert "model.safetensors" in str(err.value)


def test_v_pred_key_marks_v_prediction():
    assert not has_v_pred_key(fake_sd())
    assert has_v_pred_key({**fake_sd(), "v_pred": torch.tensor([])})


class FakeUNet(nn.Module):
    """Returns x + offset: an epsilon model's output stays near x at t=999, a v-model's falls below it."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple] = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        self.calls.append((tuple(sample.shape), timestep.tolist(), tuple(encoder_hidden_states.shape)))
        return (sample + self.offset + self.weight,)


@pytest.mark.parametrize(("offset", "expected"), [(0.1, False), (-0.9, False), (-1.5, True)])
def test_webui_heuristic_threshold(offset, expected):
    unet = FakeUNet(offset)
    assert is_v_prediction_unet(unet, context_dim=1024) is expected
    assert unet.calls == [((1, 4, 8, 8), [999], (1, 2, 1024))]


def test_ckpt_is_read_with_weights_only_and_unwrapped(tmp_path):
    path = tmp_path / "model.ckpt"
    weights = {"a.weight": torch.arange(4.0)}
    torch.save({"state_dict": {**weights, "step": 3}, "global_step": 7}, path)
    loaded = read_checkpoint(path)
    assert loaded.keys() == {"a.weight"}
    assert torch.equal(loaded["a.weight"], weights["a.weight"])


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callbacks": RunsCodeWhenUnpickled()}, path)
    with pytest.raises(UserError, match=r"pickled Python objects.*\.safetensors") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_corrupt_files_name_the_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    if suffix == ".safetensors":
        save_file({"a": torch.zeros(100)}, path)
    else:
        torch.save({"a": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-150])  # truncated download
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)
