"""FLOP counts: CPU attention is counted, and the SD 1.5 figures docs/performance.md quotes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_scripts.bench.flops import sd15_encode_flops_per_image, sd15_flops_per_image
from lora_scripts.bench.measure import count_flops


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
    step = sd15_flops_per_image(512)
    encode = sd15_encode_flops_per_image(512)
    assert step == pytest.approx(1.71e12, rel=0.005)
    assert encode / step == pytest.approx(0.66, abs=0.01)
    # Encoding is a convolution stack over the pixels: 4x the pixels, 4x the FLOPs (VAE attention aside).
    assert sd15_encode_flops_per_image(256) == pytest.approx(encode / 4, rel=0.05)


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
