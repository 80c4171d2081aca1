"""Export: kohya key layout from peft adapters, sd-scripts hashes, atomic writes."""

from __future__ import annotations

import hashlib
import io

import pytest
import safetensors.torch
import torch
from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic
from lora_scripts.export.hashes import addnet_hash_legacy, file_model_hash, precalculate_hashes
from lora_scripts.export.kohya import LoraNetwork, count_modules, kohya_state_dict
from lora_scripts.models.lora import add_lora_adapter, check_targets


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(6, 4)
        self.to_v = nn.Linear(6, 4)
        self.to_out = nn.ModuleList([nn.Linear(4, 6)])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        return x


def _adapted(targets, rank=2, alpha=4.0):
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: F401 - peft must be importable

    net = _Net()
    # nn.Module has no add_adapter; use peft's injection the way diffusers' add_adapter does.
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), net)
    return net


def test_kohya_keys_shapes_and_alpha():
    net = _adapted(["to_q", "to_out.0"])
    sd = kohya_state_dict([LoraNetwork("lora_unet", net)], dtype=torch.float16)
    assert count_modules(sd) == 4
    assert sd["lora_unet_blocks_0_to_q.lora_down.weight"].shape == (2, 6)
    assert sd["lora_unet_blocks_0_to_q.lora_up.weight"].shape == (4, 2)
    assert sd["lora_unet_blocks_1_to_out_0.lora_up.weight"].shape == (6, 2)
    assert sd["lora_unet_blocks_1_to_out_0.alpha"].item() == 4.0
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert all(k.startswith("lora_unet_") for k in sd)
    assert len(sd) == 4 * 3  # down, up, alpha per module and nothing else


def test_text_model_prefix_is_added():
    net = _adapted(["to_v"])
    sd = kohya_state_dict([LoraNetwork("lora_te", net, "text_model.")])
    assert "lora_te_text_model_blocks_0_to_v.lora_down.weight" in sd


def test_precalculated_hash_matches_file(tmp_path):
    tensors = {"a.lora_down.weight": torch.randn(600, 600), "a.alpha": torch.tensor(1.0)}
    meta = {"ss_output_name": "x", "modelspec.title": "x"}
    model_hash, legacy = precalculate_hashes(tensors, meta)
    path = tmp_path / "f.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    assert file_model_hash(path) == model_hash
    # sha256 of the bytes after the header, computed independently
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert model_hash == hashlib.sha256(raw[8 + n :]).hexdigest()
    # legacy hash: 64 KiB at 1 MiB of the serialization with only ss_* metadata (file is > 1 MiB)
    ss_only = safetensors.torch.save(tensors, {"ss_output_name": "x"})
    assert legacy == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert legacy == addnet_hash_legacy(io.BytesIO(ss_only))


def test_write_atomic_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, failing)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_unknown_target_module_is_a_user_error():
    net = _Net()
    with pytest.raises(UserError) as info:
        check_targets(net, ["to_q", "to_qq", "attn"], key="target_modules", component="UNet")
    assert info.value.messages == [
        "target_modules: 'to_qq' matches no layer of the UNet; use layer names such as to_q, to_v.",
        "target_modules: 'attn' matches no layer of the UNet; use layer names such as to_q, to_v.",
    ]


def test_add_lora_adapter_counts_trainable_params():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    n = add_lora_adapter(unet, ["to_q"], rank=2, alpha=2)
    q_layers = [m for name, m in unet.named_modules() if name.endswith("to_q")]
    expected = sum(2 * (m.in_features + m.out_features) for m in q_layers)
    assert n == expected
    assert all(not p.requires_grad for name, p in unet.named_parameters() if "lora_" not in name)
