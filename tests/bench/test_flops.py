"""FLOP counts: CPU attention is counted, the SD 1.5 and SDXL figures docs/performance.md quotes, and a tiny
SDXL's text encoders counted by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_scripts.bench.flops import encode_flops_per_image, meta_family, step_flops_per_image
from lora_scripts.bench.measure import count_flops
from lora_scripts.models.registry import load_family
from lora_scripts.models.tiny import build_tiny_sdxl


def test_cpu_attention_is_counted_like_the_cuda_kernels():
    """SDPA on a CPU runs `_scaled_dot_product_flash_attention_for_cpu`, which torch's counter misses."""
    b, h, s_q, s_k, d = 2, 4, 64, 77, 8
    q = torch.randn(b, h, s_q, d, requires_grad=True)
    k = torch.randn(b, h, s_k, d, requires_grad=True)
    v = torch.randn(b, h, s_k, d, requires_grad=True)
    forward = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert forward == 2 * (2 * b * h * s_q * s_k * d)  # QK^T and PV, a multiply-add each
    both = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert both == pytest.approx(3.5 * forward)  # torch's backward formula: 2.5x the forward


def test_sd15_step_and_encode_flops():
    """The issue quotes ~1.71 TFLOP per image for a rank-4 attention LoRA step at 512²; the VAE encoder and
    text encoder the reference runs in every step add two thirds of that again."""
    step = step_flops_per_image(meta_family("sd15"), 512)
    encode = sum(encode_flops_per_image(meta_family("sd15"), 512).values())
    assert step == pytest.approx(1.71e12, rel=0.005)
    assert encode / step == pytest.approx(0.66, abs=0.01)
    # Encoding is a convolution stack over the pixels: 4x the pixels, 4x the FLOPs (VAE attention aside).
    assert sum(encode_flops_per_image(meta_family("sd15"), 256).values()) == pytest.approx(
        encode / 4, rel=0.05
    )


def test_sdxl_flops_at_1024_are_the_documented_ones():
    """docs/performance.md's SDXL figures (`python -m lora_scripts.bench.flops --model sdxl`): the full-size
    architecture from the shipped configs, one image at 1024², the bench's rank-4 attention LoRA."""
    family = meta_family("sdxl")
    encode = encode_flops_per_image(family, 1024)
    assert step_flops_per_image(family, 1024) / 1e12 == pytest.approx(14.096, abs=5e-4)
    assert encode["vae_encode"] / 1e12 == pytest.approx(4.879, abs=5e-4)  # SD 1.5's VAE architecture
    assert encode["text_encoders"] / 1e12 == pytest.approx(0.1112, abs=5e-5)
    checkpointed = step_flops_per_image(meta_family("sdxl"), 1024, gradient_checkpointing=True)
    assert checkpointed / 1e12 == pytest.approx(19.212, abs=5e-4)  # the blocks' forward recomputed


def test_tiny_sdxl_text_encoders_counted_by_hand(tmp_path):
    """Both text encoders on one 77-token caption. A CLIP layer of width d on T tokens (a multiply-add is 2
    FLOPs): the q, k, v and out projections 4 * 2Td², the MLP (2d wide in the tiny encoders) 2 * 2T * d * 2d,
    attention's QKᵀ and PV 2 * 2T²d. te1: 2 layers of 32; te2: 3 layers of 48, and its 48 → 40 projection of
    the pooled token, which runs twice: transformers computes `text_embeds` itself, and the family pools at
    the first <EOS> on its own (models/sdxl.py)."""
    family = load_family(str(build_tiny_sdxl(tmp_path / "tiny-sdxl")))
    tokens = 77

    def clip_layer(d: int) -> int:
        return 4 * 2 * tokens * d * d + 2 * 2 * tokens * d * (2 * d) + 2 * 2 * tokens * tokens * d

    expected = 2 * clip_layer(32) + 3 * clip_layer(48) + 2 * (2 * 48 * 40)
    assert encode_flops_per_image(family, 64)["text_encoders"] == expected == 15_979_328


def test_an_8_bit_linear_counts_as_the_matmul_it_is():
    """quantize_base: quanto multiplies by int8 weights with its own op (`quanto::qbytes_mm`); the count must
    not drop when the weights are quantized (MFU compares against the model's FLOPs)."""
    from lora_scripts.models.quantize import quantize_frozen

    layer = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False)).requires_grad_(False)
    x = torch.randn(4, 10, 32)
    plain = count_flops(lambda: layer(x))
    assert plain == 2 * 4 * 10 * 32 * 48
    quantize_frozen(layer, "int8")
    assert count_flops(lambda: layer(x)) == plain
