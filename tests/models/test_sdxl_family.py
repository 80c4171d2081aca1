"""SDXLFamily's conditioning on the tiny SDXL model: `encode_prompts` against the text encoders called
directly (penultimate hidden states of both, concatenated; bigG's `text_embeds` pooled), against diffusers'
StableDiffusionXLPipeline.encode_prompt, with max_token_length 150; and `predict` against the UNet called
with SDXL's added_cond_kwargs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from lora_scripts.models.registry import load_family
from lora_scripts.models.sdxl import SDXLFamily
from lora_scripts.models.sdxl_loading import SDXLComponents, load_sdxl_components
from lora_scripts.models.tiny import (
    TINY_SDXL_POOLED_DIM,
    TINY_SDXL_TE1_DIM,
    TINY_SDXL_TE2_DIM,
    build_tiny_sdxl,
)

CPU = torch.device("cpu")
WIDTH = TINY_SDXL_TE1_DIM + TINY_SDXL_TE2_DIM
SHORT = "ink wash painting, a heron in the reeds"
LONG = ", ".join(f"tag{i}" for i in range(40))  # 40 × 3 tokens ("tag", digits, ",") - 1: past one chunk


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def components(tiny_sdxl_dir: Path) -> SDXLComponents:
    return load_sdxl_components(str(tiny_sdxl_dir))


def plain_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    ).input_ids


def direct(components: SDXLComponents, ids_1: torch.Tensor, ids_2: torch.Tensor):
    """Both encoders called directly: (penultimate states of te1, of te2, te2's text_embeds)."""
    with torch.no_grad():
        out_1 = components.text_encoder(ids_1, output_hidden_states=True)
        out_2 = components.text_encoder_2(ids_2, output_hidden_states=True)
    return out_1.hidden_states[-2], out_2.hidden_states[-2], out_2.text_embeds


def test_load_family_picks_sdxl(tiny_sdxl_dir):
    family = load_family(str(tiny_sdxl_dir), max_token_length=150)
    assert isinstance(family, SDXLFamily) and family.max_token_length == 150
    assert family.info.base_model_version == "sdxl_base_v1-0"


def test_encode_prompts_is_both_penultimate_states_and_the_pooled_bigg_embedding(components):
    family = SDXLFamily(components)
    captions = [SHORT, "a cat", ""]
    with torch.no_grad():
        cond = family.encode_prompts(captions, CPU)
    assert set(cond) == {"encoder_hidden_states", "text_embeds"}
    assert cond["encoder_hidden_states"].shape == (3, 77, WIDTH)
    assert cond["text_embeds"].shape == (3, TINY_SDXL_POOLED_DIM)
    hidden_1, hidden_2, pooled = direct(
        components, plain_ids(components.tokenizer, captions), plain_ids(components.tokenizer_2, captions)
    )
    assert torch.equal(cond["encoder_hidden_states"], torch.cat([hidden_1, hidden_2], dim=-1))
    assert torch.equal(cond["text_embeds"], pooled)
    # not the last layer's states: the penultimate layer is what SDXL was trained on
    with torch.no_grad():
        last = components.text_encoder(plain_ids(components.tokenizer, captions)).last_hidden_state
    assert not torch.allclose(cond["encoder_hidden_states"][..., :TINY_SDXL_TE1_DIM], last)


def test_long_caption_is_read_in_two_chunks_and_pooled_from_the_first(components):
    family = SDXLFamily(components, max_token_length=150)
    tokens = components.tokenizer_2(LONG, add_special_tokens=False).input_ids
    assert 75 < len(tokens) <= 150
    with torch.no_grad():
        cond = family.encode_prompts([SHORT, LONG], CPU)
    hidden, pooled = cond["encoder_hidden_states"], cond["text_embeds"]
    assert hidden.shape == (2, 152, WIDTH) and pooled.shape == (2, TINY_SDXL_POOLED_DIM)

    # The first chunk is the plain 77-token cut: its states fill rows 0..75, and the pooled embedding is its.
    first_1, first_2, first_pooled = direct(
        components,
        plain_ids(components.tokenizer, [SHORT, LONG]),
        plain_ids(components.tokenizer_2, [SHORT, LONG]),
    )
    torch.testing.assert_close(
        hidden[:, :76], torch.cat([first_1, first_2], dim=-1)[:, :76], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(pooled, first_pooled, rtol=0, atol=1e-6)

    # The second chunk of LONG, built by hand: <BOS>, the tokens after the 75th, <EOS>, padding.
    def second_chunk(tokenizer) -> torch.Tensor:
        rest = tokenizer(LONG, add_special_tokens=False).input_ids[75:]
        ids = [tokenizer.bos_token_id, *rest, tokenizer.eos_token_id]
        return torch.tensor([ids + [tokenizer.pad_token_id] * (77 - len(ids))])

    second_1, second_2, _ = direct(
        components, second_chunk(components.tokenizer), second_chunk(components.tokenizer_2)
    )
    second = torch.cat([second_1, second_2], dim=-1)[0]
    torch.testing.assert_close(hidden[1, 76:151], second[1:76], rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden[1, 151], second[76], rtol=0, atol=1e-6)


def test_predict_is_the_unet_with_sdxl_added_conditioning(components):
    family = SDXLFamily(components)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700])
    sizes = torch.tensor([[120, 90, 10, 0, 64, 64], [70, 130, 0, 13, 64, 64]])
    with torch.no_grad():
        cond = family.encode_prompts([SHORT, "a cat"], CPU) | family.image_conditioning(sizes)
        assert cond["time_ids"].dtype == torch.float32 and cond["time_ids"].tolist() == sizes.tolist()
        ours = family.predict(latents, timesteps, cond)
        theirs = components.unet(
            latents,
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": sizes.float()},
        ).sample
        assert torch.equal(ours, theirs)
        # the sizes reach the UNet: another crop, another prediction
        moved = family.predict(latents, timesteps, cond | family.image_conditioning(sizes + 1))
    assert not torch.allclose(ours, moved)


def test_diffusers_pipeline_encodes_the_same_prompt(tiny_sdxl_dir, components):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).to(torch.float32)
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            SHORT, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=None
        )
        cond = SDXLFamily(components).encode_prompts([SHORT], CPU)
    assert prompt_embeds.shape == (1, 77, WIDTH)
    assert torch.equal(cond["encoder_hidden_states"], prompt_embeds)
    assert torch.equal(cond["text_embeds"], pooled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sizes_reach_the_unet_exactly_in_half_precision(components, dtype):
    """The UNet turns each size into sinusoids in float32 (diffusers' Timesteps, sd-scripts'
    get_size_embeddings): the integers must arrive exact, not rounded to the weights' dtype first (bf16
    holds 8 bits of mantissa: 1365 would become 1368; fp16 rounds a 4001-pixel side to 4000)."""
    unet = copy.deepcopy(components.unet).to(dtype)
    family = SDXLFamily(dataclasses.replace(components, unet=unet))
    seen: list[torch.Tensor] = []
    hook = unet.add_time_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    sizes = torch.tensor([[1365, 2047, 3, 7, 1024, 1024], [4001, 3001, 17, 0, 832, 1216]])
    try:
        with torch.no_grad():
            text = family.encode_prompts([SHORT, "a cat"], CPU)
            cond = {key: value.to(dtype) for key, value in text.items()} | family.image_conditioning(sizes)
            out = family.predict(torch.randn(2, 4, 8, 8, dtype=dtype), torch.tensor([10, 700]), cond)
    finally:
        hook.remove()
    assert out.dtype == dtype and torch.isfinite(out).all()
    (time_ids,) = seen
    assert time_ids.dtype == torch.float32 and time_ids.tolist() == sizes.flatten().tolist()
