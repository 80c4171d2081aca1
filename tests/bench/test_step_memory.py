"""`python -m lora_scripts.bench.step_memory`: the CPU count of one step's tensors that docs/performance.md
quotes, on the tiny models: the weights and the optimizer state counted by hand, int8 weights by their
stored bytes, and the SDXL path."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from lora_scripts.bench.step_memory import StepMemorySettings, count_step_memory, main, prepare_step
from lora_scripts.models.quantize import stored_bytes
from lora_scripts.models.tiny import (
    build_tiny_flux_components,
    build_tiny_sd_components,
    build_tiny_sdxl_components,
)


def test_weights_and_adamw_state_counted_by_hand():
    """The tiny SD UNet's frozen weights in bf16 (2 bytes each) and a rank-4 LoRA on the q, k, v and out
    projections of its 8 attention layers in fp32 (4 bytes each); AdamW keeps two fp32 states per LoRA
    weight and a step count (4 bytes) per LoRA tensor."""
    result = count_step_memory(StepMemorySettings(model="tiny", resolution=64, rank=4, target_modules="attn"))
    peak = result["peak_bytes"]

    def lora(d_in: int, d_out: int) -> int:  # rank 4: down [4, d_in] and up [d_out, 4]
        return 4 * (d_in + d_out)

    # 3 transformer blocks 32 wide (down 1, up 2), each a self- and a cross-attention, the text 32 wide too;
    # the mid block's 64 wide: self-attention, then cross-attention's q and out, and k and v from the text.
    narrow = 3 * 2 * 4 * lora(32, 32)
    mid = 4 * lora(64, 64) + 2 * lora(64, 64) + 2 * lora(32, 64)
    assert result["lora_parameters"] == narrow + mid == 9_984
    tensors = 2 * 4 * (3 * 2 + 2)  # down and up matrices of 4 projections in 8 attention layers
    frozen = sum(p.numel() for p in build_tiny_sd_components().unet.parameters())
    assert peak["Parameter"] == 2 * frozen + 4 * (narrow + mid)
    assert peak["Optstate"] == 2 * 4 * (narrow + mid) + 4 * tensors
    assert peak["Total"] == sum(v for k, v in peak.items() if k != "Total")


def test_int8_weights_are_counted_by_the_bytes_they_store(capsys):
    """`--quantize-base int8` through the command line: MemTracker counts quanto's weights by what they
    store (8-bit data and scales), and the frozen weights take about half of their bf16 bytes.

    On the tiny SD: the tiny SDXL's add-embedding is 88 wide, and torch's CPU int8 kernel for bf16 inputs
    (`_weight_int8pack_mm`, torch 2.13) computes garbage, or crashes, for widths that are not a multiple of
    16; SD's and SDXL's layers all are."""
    settings = StepMemorySettings(model="tiny", resolution=64, rank=4, target_modules="attn")
    main(
        [
            "--model",
            "tiny",
            "--resolution",
            "64",
            "--rank",
            "4",
            "--target-modules",
            "attn",
            "--quantize-base",
            "int8",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert result["lora_parameters"] == 9_984 and math.isfinite(result["loss"])
    int8_unet = prepare_step(replace(settings, quantize_base="int8"))[0].denoiser
    bf16_unet = prepare_step(settings)[0].denoiser
    weights = result["peak_mib"]["Parameter"] + result["peak_mib"]["Buffer"]  # quanto's scales are buffers
    assert weights == pytest.approx(stored_bytes(int8_unet) / 2**20, abs=0.1)
    lora_bytes = 4 * 9_984
    frozen_int8, frozen_bf16 = (stored_bytes(unet) - lora_bytes for unet in (int8_unet, bf16_unet))
    assert 0.5 < frozen_int8 / frozen_bf16 < 0.65  # one byte instead of two, plus scales, biases, norms


def test_the_sdxl_path_counts_the_sdxl_unet():
    """The tiny SDXL, its conditioning (pooled text embedding, time ids) given by the family: its frozen
    weights in bf16 and the LoRA in fp32 (without checkpointing: the tracker makes every operation slow)."""
    settings = StepMemorySettings(
        model="tiny-sdxl", resolution=64, rank=4, target_modules="attn", gradient_checkpointing=False
    )
    result = count_step_memory(settings)
    frozen = sum(p.numel() for p in build_tiny_sdxl_components().unet.parameters())
    assert result["lora_parameters"] == 50_688 and math.isfinite(result["loss"])
    assert result["peak_bytes"]["Parameter"] == 2 * frozen + 4 * 50_688


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_fake_tensors_count_the_same_bytes(model):
    """`--fake` (how FLUX.1-dev is counted on a machine without the RAM for its weights) gives the real
    count: weights, gradients and optimizer state byte for byte; activations within 1% (a few of the CPU
    kernels' scratch tensors have other sizes than their fake versions: 0.2% and 0.6% of the total here)."""
    settings = StepMemorySettings(model=model, resolution=64, rank=4, target_modules="attn")
    real = count_step_memory(settings)["peak_bytes"]
    fake = count_step_memory(replace(settings, fake=True))
    exact = ("Parameter", "Buffer", "Gradient", "Optstate")
    assert {k: fake["peak_bytes"][k] for k in exact} == {k: real[k] for k in exact}
    assert fake["peak_bytes"]["Total"] == pytest.approx(real["Total"], rel=0.01)
    assert fake["loss"] is None and real["Parameter"] > 0


def test_swapped_blocks_leave_the_device():
    """FLUX.1's `blocks_to_swap` counted on the device (the swapped weights wait on the meta device): the
    peak's weights drop by the swapped blocks' frozen bytes less the two blocks lent at the peak. The tiny
    FLUX: 2 double and 2 single blocks; `blocks_to_swap: 2` swaps the second double and both singles."""
    settings = StepMemorySettings(model="tiny-flux", resolution=64, rank=4, target_modules="kohya", fake=True)
    plain = count_step_memory(settings)["peak_bytes"]
    swapped = count_step_memory(replace(settings, blocks_to_swap=2))["peak_bytes"]
    transformer = build_tiny_flux_components().transformer
    blocks = [transformer.transformer_blocks[1], *transformer.single_transformer_blocks]
    frozen = [2 * sum(p.numel() for p in block.parameters()) for block in blocks]  # bf16
    assert plain["Parameter"] - swapped["Parameter"] == sum(frozen)  # lent copies count as activations
    lent = swapped["Activation"] + swapped["Temp"] - plain["Activation"] - plain["Temp"]
    assert 0 < lent <= max(frozen) + sorted(frozen)[-2]
    assert swapped["Total"] < plain["Total"]
