"""quantize_base: the UNet's frozen weights in 8 bits (optimum-quanto), LoRA trained on top in fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from optimum.quanto import QTensor

from lora_scripts.checks.plan import speed_facts
from lora_scripts.checks.report import CheckReport, render_text
from lora_scripts.config import validate_config_dict
from lora_scripts.errors import UserError
from lora_scripts.models import quantize
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.quantize import quantize_frozen, stored_bytes
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from lora_scripts.models.tiny import build_tiny_sd_components

BASE = {"train_data_dir": "data", "base_model": "m.safetensors", "output_dir": "out"}
TARGETS = LoraTargets(["to_q", "to_k", "to_v", "to_out.0"], None)


@pytest.fixture(scope="module")
def tiny_unet() -> torch.nn.Module:
    unet = build_tiny_sd_components(seed=3).unet
    unet.requires_grad_(False)
    return unet


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, 32, generator=generator)
    return latents, torch.tensor([10, 500]), hidden


def _weights(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {
        name: m.weight
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }


@pytest.mark.parametrize(("kind", "data_dtype"), [("int8", torch.int8), ("float8", torch.float8_e4m3fn)])
def test_every_linear_and_conv_weight_is_stored_in_8_bits(tiny_unet, kind, data_dtype):
    unet = copy.deepcopy(tiny_unet)
    fp32_bytes = stored_bytes(unet)
    reference = unet(*_inputs()).sample
    quantize_frozen(unet, kind)
    weights = _weights(unet)
    assert len(weights) > 50  # convs of the resnets, attention and feed-forward linears, time embedding
    for name, weight in weights.items():
        assert isinstance(weight, QTensor), name
        assert weight._data.dtype == data_dtype, name
        assert weight._scale.shape[0] == weight.shape[0], name  # a scale per output channel
    # fp32 weights to 1 byte each, plus the scales, biases and norms that stay fp32.
    ratio = stored_bytes(unet) / fp32_bytes
    assert 0.25 < ratio < 0.3
    # The same network, with quantization noise: close to the fp32 output, but not equal to it.
    quantized = unet(*_inputs()).sample
    error = ((quantized - reference).norm() / reference.norm()).item()
    # (float8 e4m3 keeps 3 mantissa bits against int8's 7: ~5x the error on these random weights)
    assert 0 < error < (0.03 if kind == "int8" else 0.15)


def test_lora_on_a_quantized_unet_trains_only_the_lora(tiny_unet):
    """Attention LoRA and LoCon (3x3 convs) added, then the rest quantized: the LoRA layers keep fp32 weights
    and learn through the 8-bit layers, whose weights do not move."""
    family = StableDiffusionFamily.__new__(StableDiffusionFamily)  # only the UNet is needed here
    family.unet = copy.deepcopy(tiny_unet)
    family.text_encoder = None  # the UNet-only LoRA never reads it
    networks = family.add_lora(TARGETS, LoraSpec(rank=4, alpha=4, conv_rank=4, conv_alpha=4))
    quantize_frozen(family.unet, "int8")
    lora = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    assert lora == {n: p for net in networks for n, p in net.module.named_parameters() if p.requires_grad}
    assert any("conv" in n for n in lora) and any("to_q" in n for n in lora)
    assert all(p.dtype == torch.float32 and not isinstance(p, QTensor) for p in lora.values())
    base = {n: w for n, w in _weights(family.unet).items() if "lora_" not in n}
    assert base and all(isinstance(w, QTensor) for w in base.values())
    frozen = {n: w._data.clone() for n, w in base.items()}
    for p in lora.values():  # lora_B starts at zero: give it values so that lora_A gets a gradient too
        torch.nn.init.normal_(p, std=0.05)
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    latents, timesteps, hidden = _inputs()
    losses = []
    for _ in range(5):
        loss = F.mse_loss(family.unet(latents, timesteps, hidden).sample, latents)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the LoRA learns through the 8-bit layers
    for name, weight in base.items():
        assert torch.equal(weight._data, frozen[name]), name


def test_quantizing_is_deterministic(tiny_unet):
    """A resumed run quantizes the base model again: it must get the very same 8-bit weights and scales,
    or the resume would not continue the same training."""
    first, second = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    quantize_frozen(first, "int8")
    quantize_frozen(second, "int8")
    for (name, a), b in zip(_weights(first).items(), _weights(second).values(), strict=True):
        assert torch.equal(a._data, b._data) and torch.equal(a._scale, b._scale), name


def test_stored_bytes_of_plain_tensors():
    module = torch.nn.Linear(10, 4).to(torch.bfloat16)
    assert stored_bytes(module) == (10 * 4 + 4) * 2


def test_quantize_base_key_and_its_errors(monkeypatch):
    config = validate_config_dict({**BASE, "quantize_base": "int8"}, "<t>", check_paths=False)
    assert config.quantize_base == "int8"
    assert validate_config_dict(BASE, "<t>", check_paths=False).quantize_base == "no"
    with pytest.raises(UserError, match="quantize_base"):
        validate_config_dict({**BASE, "quantize_base": "int4"}, "<t>", check_paths=False)
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as err:
        validate_config_dict({**BASE, "quantize_base": "float8"}, "<t>", check_paths=False)
    assert (
        "quantize_base: float8 needs optimum-quanto; install it (pip install optimum-quanto) or set "
        "quantize_base: no" in str(err.value)
    )
    validate_config_dict(BASE, "<t>", check_paths=False)  # "no" needs nothing


def test_check_shows_the_unet_weights():
    int8 = validate_config_dict({**BASE, "quantize_base": "int8"}, "<t>", check_paths=False)
    bf16 = validate_config_dict({**BASE, "mixed_precision": "bf16"}, "<t>", check_paths=False)
    assert "int8 (quantize_base), LoRA in fp32" in render_text(CheckReport("x.yaml", speed=speed_facts(int8)))
    assert "bf16 (mixed_precision), LoRA in fp32" in render_text(
        CheckReport("x.yaml", speed=speed_facts(bf16))
    )


def test_an_int8_linear_takes_a_strided_bf16_input_on_the_cpu():
    """SDXL's linear proj_in gets its feature map as a permuted view ([B, H*W, C], the channels strided),
    which quanto's CPU bf16 kernel refused ("A must be contiguous on the last dimension")."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(32, 16)).to(torch.bfloat16).requires_grad_(False)
    quantize_frozen(layer, "int8")
    feature_map = torch.randn(1, 32, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    strided = feature_map.permute(0, 2, 3, 1).reshape(1, 16, 32)
    assert strided.stride(-1) != 1
    out = layer(strided)
    out.float().sum().backward()
    torch.testing.assert_close(out, layer(strided.contiguous()))
    assert feature_map.grad is not None and feature_map.grad.shape == feature_map.shape
