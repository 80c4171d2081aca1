"""Prompts longer than 75 tokens as AUTOMATIC1111 reads them (models/long_prompts.py `prompt_chunks`,
models/inference.py `prompt_arguments`): chunks of 75 tokens, a chunk ended early at a comma among its last 20
tokens, every chunk encoded on its own and all its 77 states kept, the shorter text padded with empty chunks.
Checked against the diffusers pipelines' own `encode_prompt` on each chunk's text, on the tiny SD and SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_scripts.generation.pipeline import SamplingSettings, render_image
from lora_scripts.generation.samplers import resolve_sampler
from lora_scripts.models.inference import prompt_arguments, sd_pipeline, sdxl_pipeline
from lora_scripts.models.long_prompts import chunk_input_ids, prompt_chunks
from lora_scripts.models.sd_loading import clip_tokenizer
from lora_scripts.models.tiny import (
    TINY_CONTEXT_DIM,
    TINY_SDXL_POOLED_DIM,
    TINY_SDXL_TE1_DIM,
    TINY_SDXL_TE2_DIM,
    build_tiny_sd_components,
    build_tiny_sdxl_components,
)

CPU = torch.device("cpu")
BOS, EOS, COMMA = 49406, 49407, 267
WORDS = ["cat", "dog", "red", "blue", "sky", "tree", "house", "car"]  # one token each
XL_WIDTH = TINY_SDXL_TE1_DIM + TINY_SDXL_TE2_DIM


def words(count: int, start: int = 0) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(start, start + count))


def ids77(tokenizer, text: str) -> torch.Tensor:
    """The 77 ids the pipelines encode for a text of at most 75 tokens: [77]."""
    return tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids[0]


def render(pipe, prompt: str, negative_prompt: str = "", clip_skip: int = 1) -> np.ndarray:
    """A 64 px image in 2 steps, seed 3: [64, 64, 3] uint8."""
    settings = SamplingSettings(
        sampler=resolve_sampler("euler_a"),
        steps=2,
        width=64,
        height=64,
        negative_prompt=negative_prompt,
        clip_skip=clip_skip,
    )
    image = render_image(pipe, prompt, settings, seed=3, progress=False)
    assert image.size == (64, 64)
    return np.asarray(image)


@pytest.fixture(scope="module")
def sd_pipe():
    tiny = build_tiny_sd_components()
    pipe = sd_pipeline(tiny.unet, tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.scheduler)
    for module in (tiny.unet, tiny.vae, tiny.text_encoder):
        module.eval()
    return pipe


@pytest.fixture(scope="module")
def xl_pipe():
    tiny = build_tiny_sdxl_components()
    encoders = (tiny.text_encoder, tiny.text_encoder_2)
    pipe = sdxl_pipeline(tiny.unet, tiny.vae, encoders, (tiny.tokenizer, tiny.tokenizer_2), tiny.scheduler)
    for module in (tiny.unet, tiny.vae, *encoders):
        module.eval()
    return pipe


# --- chunking -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "lengths"),
    [(0, [0]), (3, [3]), (75, [75]), (76, [75, 1]), (150, [75, 75]), (151, [75, 75, 1])],
)
def test_prompts_are_cut_into_chunks_of_75(tokens, lengths):
    chunks = prompt_chunks(clip_tokenizer("<|endoftext|>"), words(tokens))
    assert [len(c) for c in chunks] == lengths


@pytest.mark.parametrize(
    ("comma_at", "lengths"),
    [
        (55, [56, 44]),  # 20 tokens from the end of a full chunk: the chunk ends after the comma
        (54, [75, 25]),  # 21 back: too far, the chunk is cut at 75
        (74, [75, 25]),  # the chunk's last token: a plain cut
        (75, [75, 25]),  # the first token past 75: it opens the next chunk
    ],
)
def test_a_full_chunk_ends_at_a_comma_among_its_last_20_tokens(comma_at, lengths):
    text = words(comma_at) + " , " + words(99 - comma_at, start=comma_at)
    chunks = prompt_chunks(clip_tokenizer("<|endoftext|>"), text)
    assert [len(c) for c in chunks] == lengths
    flat = [token for chunk in chunks for token in chunk]
    assert len(flat) == 100 and flat.index(COMMA) == comma_at  # nothing lost, nothing reordered


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_chunk_ids_are_the_tokenizers_own_padding_and_empty_chunks_pad_to_the_count(pad):
    tokenizer = clip_tokenizer(pad)
    text = words(80)
    ids = chunk_input_ids(tokenizer, prompt_chunks(tokenizer, text), num_chunks=3)
    assert ids.shape == (3, 77)
    assert torch.equal(ids[0], ids77(tokenizer, words(75)))
    assert torch.equal(ids[1], ids77(tokenizer, words(5, start=75)))
    assert torch.equal(ids[2], ids77(tokenizer, ""))
    assert ids[2, :2].tolist() == [BOS, EOS] and ids[2, -1].item() == tokenizer.pad_token_id


# --- SD 1.x / 2.x -------------------------------------------------------------------------------------


def _sd_encode(pipe, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, CPU, 1, True, negative_prompt=negative)


def test_sd_150_tokens_give_154_positions_each_chunk_its_own_encoding(sd_pipe):
    args = prompt_arguments(sd_pipe, words(150), "blurry", clip_skip=1)
    positive, negative = args["prompt_embeds"], args["negative_prompt_embeds"]
    assert set(args) == {"prompt_embeds", "negative_prompt_embeds"}
    assert positive.shape == negative.shape == (1, 154, TINY_CONTEXT_DIM)
    first, blurry = _sd_encode(sd_pipe, words(75), "blurry")
    second, empty = _sd_encode(sd_pipe, words(75, start=75), "")
    assert torch.equal(positive[:, :77], first) and torch.equal(positive[:, 77:], second)
    # the negative prompt: its own chunk, then an empty one
    assert torch.equal(negative[:, :77], blurry) and torch.equal(negative[:, 77:], empty)


def test_sd_long_negative_pads_the_prompt(sd_pipe):
    args = prompt_arguments(sd_pipe, "a cat", words(76), clip_skip=1)
    assert args["prompt_embeds"].shape == args["negative_prompt_embeds"].shape == (1, 154, TINY_CONTEXT_DIM)
    cat, empty = _sd_encode(sd_pipe, "a cat", "")
    assert torch.equal(args["prompt_embeds"], torch.cat([cat, empty], dim=1))


def test_sd_clip_skip_2_is_the_penultimate_state_through_the_final_layer_norm(sd_pipe):
    encoder = sd_pipe.text_encoder
    args = prompt_arguments(sd_pipe, words(150), "blurry", clip_skip=2)
    with torch.no_grad():
        for embeds, texts in [
            (args["prompt_embeds"], [words(75), words(75, start=75)]),
            (args["negative_prompt_embeds"], ["blurry", ""]),  # the negative prompt at the same layer
        ]:
            for k, text in enumerate(texts):
                ids = ids77(sd_pipe.tokenizer, text).unsqueeze(0)
                hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
                assert torch.equal(embeds[:, 77 * k : 77 * (k + 1)], encoder.final_layer_norm(hidden))
    plain = prompt_arguments(sd_pipe, words(150), "blurry", clip_skip=1)["prompt_embeds"]
    assert not torch.allclose(plain, args["prompt_embeds"])


# --- SDXL ---------------------------------------------------------------------------------------------


def _xl_encode(pipe, prompt: str, negative: str | None, clip_skip: int | None = None) -> tuple:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device=CPU, negative_prompt=negative, clip_skip=clip_skip)


def test_sdxl_150_tokens_give_154_positions_of_both_encoders_and_the_first_chunks_pooled(xl_pipe):
    args = prompt_arguments(xl_pipe, words(150), "blurry", clip_skip=1)
    assert args["prompt_embeds"].shape == args["negative_prompt_embeds"].shape == (1, 154, XL_WIDTH)
    assert args["pooled_prompt_embeds"].shape == (1, TINY_SDXL_POOLED_DIM)
    first, blurry, first_pooled, blurry_pooled = _xl_encode(xl_pipe, words(75), "blurry")
    second, _, second_pooled, _ = _xl_encode(xl_pipe, words(75, start=75), "blurry")
    empty, _, _, _ = _xl_encode(xl_pipe, "", None)
    assert torch.equal(args["prompt_embeds"][:, :77], first)
    assert torch.equal(args["prompt_embeds"][:, 77:], second)
    assert torch.equal(args["pooled_prompt_embeds"], first_pooled)
    assert not torch.equal(first_pooled, second_pooled)
    assert torch.equal(args["negative_prompt_embeds"][:, :77], blurry)
    assert torch.equal(args["negative_prompt_embeds"][:, 77:], empty)
    assert torch.equal(args["negative_pooled_prompt_embeds"], blurry_pooled)


def test_sdxl_empty_negative_is_zeros_of_the_prompts_length(xl_pipe):
    args = prompt_arguments(xl_pipe, words(160), "", clip_skip=1)
    assert args["negative_prompt_embeds"].shape == (1, 231, XL_WIDTH)
    assert not args["negative_prompt_embeds"].any() and not args["negative_pooled_prompt_embeds"].any()


def test_sdxl_clip_skip_2_reads_the_layer_the_pipeline_reads(xl_pipe):
    args = prompt_arguments(xl_pipe, words(150), "", clip_skip=2)
    # diffusers counts from the penultimate layer: A1111's 2 is its 1
    first, _, pooled, _ = _xl_encode(xl_pipe, words(75), None, clip_skip=1)
    second, *_ = _xl_encode(xl_pipe, words(75, start=75), None, clip_skip=1)
    assert torch.equal(args["prompt_embeds"], torch.cat([first, second], dim=1))
    assert torch.equal(args["pooled_prompt_embeds"], pooled)  # the pooled output is the last layer's
    penultimate = prompt_arguments(xl_pipe, words(150), "", 1)["prompt_embeds"]
    assert not torch.equal(args["prompt_embeds"], penultimate)


# --- which path ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_texts_of_one_chunk_at_clip_skip_1_go_to_the_pipeline_as_text(request, family):
    pipe = request.getfixturevalue(f"{family}_pipe")
    assert prompt_arguments(pipe, words(75), "a dog", 1) == {"prompt": words(75), "negative_prompt": "a dog"}
    assert prompt_arguments(pipe, "a cat", "", 1) == {"prompt": "a cat", "negative_prompt": None}
    assert "prompt_embeds" in prompt_arguments(pipe, words(76), "", 1)
    assert "prompt_embeds" in prompt_arguments(pipe, "a cat", words(76), 1)
    assert "prompt_embeds" in prompt_arguments(pipe, "a cat", "", 2)


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_render_reads_the_tokens_past_75(request, family):
    """A 150-token prompt (or negative prompt) renders, and not as its first 75 tokens alone (which is what
    diffusers would read)."""
    pipe = request.getfixturevalue(f"{family}_pipe")
    assert not np.array_equal(render(pipe, words(150)), render(pipe, words(75)))
    assert not np.array_equal(render(pipe, "a cat", words(150)), render(pipe, "a cat", words(75)))


def test_sd_renders_at_clip_skip_2(sd_pipe):
    """Samples of a clip_skip 2 run: diffusers 0.42's own SD clip skip looks for CLIPTextModel.text_model,
    which transformers 5 no longer has; ours reads the layer (see above) and renders."""
    assert not np.array_equal(render(sd_pipe, "a cat", clip_skip=1), render(sd_pipe, "a cat", clip_skip=2))
