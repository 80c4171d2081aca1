"""`blocks_to_swap` (models/block_swap.py) on the tiny FLUX transformer with a LoRA: the swapped blocks'
frozen weights are host tensors outside their own forward, at most two swapped blocks are lent to the device
at once, each comes back for the recomputed forward of the backward, and the loss and every LoRA gradient
are bit-equal to the same steps with no swap. On a CPU the "device" copies are real copies (`copy=True`)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lora_scripts.errors import UserError
from lora_scripts.models.block_swap import BlockSwap
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.flow_matching import image_ids
from lora_scripts.models.flux import FluxFamily, FluxOptions
from lora_scripts.models.flux_loading import load_flux_components
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.tiny import build_tiny_flux


@pytest.fixture(scope="module")
def flux_family(tmp_path_factory) -> FluxFamily:
    folder = build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")
    return FluxFamily(load_flux_components(str(folder)), FluxOptions(t5_max_token_length=8))


def _with_lora(family: FluxFamily) -> FluxFamily:
    family = copy.deepcopy(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        family.add_lora(LoraTargets(unet="kohya", text_encoder=None), LoraSpec(rank=4, alpha=4.0))
    for param in family.transformer.parameters():  # a LoRA initialised to zero has no gradient on its A
        if param.requires_grad:
            with torch.no_grad():
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(param.numel()))
    family.transformer.enable_gradient_checkpointing()
    family.transformer.train()
    return family


def _steps(family: FluxFamily, swap: BlockSwap | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two steps' losses and the accumulated LoRA gradients, with frozen bf16 weights under bf16 autocast."""
    transformer = family.transformer
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, 64, generator=generator)
    context = torch.randn(2, 8, transformer.config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=generator)
    losses = []
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = transformer(
                hidden_states=hidden,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=torch.tensor([0.3, 0.8]),
                img_ids=image_ids((8, 8), torch.device("cpu"), torch.float32),
                txt_ids=torch.zeros(8, 3),
                guidance=torch.ones(2),
                return_dict=False,
            )[0]
        loss = F.mse_loss(output.float(), hidden * (step + 1))
        loss.backward()
        losses.append(loss.item())
        if swap is not None and step == 0:
            assert swap.peak_resident == 2, "the current block and the next one, no more"
    gradients = {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}
    return losses, gradients


def _frozen_bf16(family: FluxFamily) -> None:
    for param in family.transformer.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)


def test_swapped_steps_are_bit_equal_to_no_swap(flux_family):
    plain = _with_lora(flux_family)
    _frozen_bf16(plain)
    expected_losses, expected_grads = _steps(plain)

    swapped = _with_lora(flux_family)
    blocks = swapped.swap_blocks(
        swapped.transformer, 2
    )  # sd-scripts' count: 1 double block and 2 single blocks
    assert blocks == [
        swapped.transformer.transformer_blocks[1],
        *swapped.transformer.single_transformer_blocks,
    ]
    swap = BlockSwap(blocks, "cpu", copy=True)
    hosted_ids = {}
    with swap.held_back(torch.bfloat16):
        swapped.transformer.to("cpu")
    for index, entries in enumerate(swap.hosted):
        hosted_ids[index] = [entry.host.data_ptr() for entry in entries]
        assert entries and all(entry.host.dtype == torch.bfloat16 for entry in entries)
    lent: list[int] = []
    probe = blocks[0].register_forward_pre_hook(
        lambda module, args: lent.append(module.attn.to_q.base_layer.weight.data_ptr())
    )
    losses, grads = _steps(swapped, swap)
    probe.remove()

    assert losses == expected_losses
    assert grads.keys() == expected_grads.keys() and len(grads) == 80
    assert all(torch.equal(grads[name], expected_grads[name]) for name in grads)
    # The probe runs after the swap's own hook: the block computed with a lent copy, not the host tensor.
    host_q = next(
        e.host for e in swap.hosted[0] if e.name == "weight" and e.module is blocks[0].attn.to_q.base_layer
    )
    assert len(lent) == 4 and host_q.data_ptr() not in lent  # 2 forwards + 2 recomputes
    assert swap.moves_in >= 2 * 2 * len(blocks) - 1
    # Outside their forward, the swapped blocks hold their host tensors again (at most the last one recomputed
    # stays lent until the next forward: checkpointing may stop its recompute before the forward hook).
    assert len(swap.resident) <= 1
    for index in set(range(len(blocks))) - swap.resident:
        current = [
            (entry.module._buffers if entry.is_buffer else entry.module._parameters)[entry.name].data_ptr()
            for entry in swap.hosted[index]
        ]
        assert current == hosted_ids[index]
    # The LoRA weights of swapped blocks never move.
    assert all(p.requires_grad for p in blocks[0].attn.to_q.lora_A.parameters())


def test_block_counts_follow_sd_scripts(flux_family):
    family = _with_lora(flux_family)
    transformer = family.transformer
    assert family.swap_blocks(transformer, 1) == list(
        transformer.single_transformer_blocks
    )  # 0 double, 2 single
    assert family.swap_blocks(transformer, 0) == []
    with pytest.raises(
        UserError, match=r"blocks_to_swap: 3 means 1 double and 4 single blocks.*use at most 2"
    ):
        family.swap_blocks(transformer, 3)


def test_hosted_bytes_count_the_frozen_weights(flux_family):
    family = _with_lora(flux_family)
    blocks = family.swap_blocks(family.transformer, 2)
    frozen = sum(p.numel() for block in blocks for p in block.parameters() if not p.requires_grad)
    swap = BlockSwap(blocks, "cpu")
    with swap.held_back(torch.bfloat16):
        family.transformer.to("cpu")
    assert swap.hosted_bytes() == 2 * frozen
