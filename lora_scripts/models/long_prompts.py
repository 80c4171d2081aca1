"""Texts longer than CLIP's 75 tokens, read in chunks: training captions as sd-scripts reads them
(`max_token_length`), prompts as AUTOMATIC1111 renders them.

CLIP has 77 positions (<BOS>, 75 tokens, <EOS>). Both cut the tokens into chunks of 75, wrap each chunk as its
own 77-id sequence and encode the chunks separately; they differ in how they join the hidden states again.

- sd-scripts (training, `chunked_input_ids` / `join_chunks`) tokenizes a caption to max_token_length + 2 ids
  and keeps the first chunk's <BOS> state, every chunk's 75 token states and the last chunk's final state
  (library/strategy_base.py `_get_input_ids`, strategy_sdxl.py `_get_hidden_states_sdxl`). We reproduce that
  exactly, so a LoRA trained with max_token_length 150 here sees what it would there.
- A1111 (rendering, `prompt_chunks` / `chunk_input_ids`; modules/sd_hijack_clip.py) reads any length: it
  keeps all 77 states of every chunk (2 chunks: 154 positions), and ends a chunk early at its last comma when
  that comma is among the chunk's last 20 tokens, so the phrase after it starts the next chunk whole.
"""

from __future__ import annotations

import torch

CLIP_WINDOW = 75  # tokens between <BOS> and <EOS>
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack": how far back a chunk may end at a comma


def chunked_input_ids(tokenizer: object, captions: list[str], max_token_length: int) -> torch.Tensor:
    """long [B, n, 77] with n = max_token_length / 75: each caption's chunks as sd-scripts builds them.

    75: the plain tokenization, padded and cut to 77 (n = 1). For 150 / 225, tokenizers whose pad is their
    <EOS> (CLIP ViT-L) end every chunk with the sequence's last id; the others (OpenCLIP, pad "!") end a
    chunk that stops in mid-text with <EOS>, and turn an empty chunk's first pad into <EOS>.
    """
    if max_token_length % CLIP_WINDOW or not 1 <= max_token_length // CLIP_WINDOW <= 3:
        raise ValueError(f"max_token_length must be 75, 150 or 225, got {max_token_length}")
    window = tokenizer.model_max_length  # type: ignore[attr-defined]  # 77
    length = window if max_token_length == CLIP_WINDOW else max_token_length + 2
    ids = tokenizer(  # type: ignore[operator]
        captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    ).input_ids
    if length == window:
        return ids.unsqueeze(1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id  # type: ignore[attr-defined]
    chunks = []
    for start in range(1, length - window + 2, window - 2):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + window - 2], ids[:, -1:]], dim=1)
        if pad != eos:
            ends_in_text = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[ends_in_text, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def join_chunks(hidden: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """[B * n, 77, C] hidden states of the chunks (caption-major) → [B, n * 75 + 2, C]: <BOS> of the first
    chunk, the 75 token states of each, the last chunk's final state. n = 1 returns [B, 77, C] unchanged."""
    batch = hidden.shape[0] // num_chunks
    hidden = hidden.reshape(batch, num_chunks * hidden.shape[1], hidden.shape[2])
    if num_chunks == 1:
        return hidden
    window = hidden.shape[1] // num_chunks
    parts = [hidden[:, :1]]
    parts += [hidden[:, i * window + 1 : (i + 1) * window - 1] for i in range(num_chunks)]
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


def prompt_chunks(tokenizer: object, text: str) -> list[list[int]]:
    """A1111's split of `text` into chunks of at most 75 token ids (no <BOS> / <EOS>); at least one chunk
    (empty for an empty text). A chunk that fills up ends after its last comma instead when that comma is
    among its last COMMA_BACKTRACK tokens; the tokens after the comma open the next chunk."""
    tokens = tokenizer(  # type: ignore[operator]
        text, truncation=False, add_special_tokens=False, verbose=False
    ).input_ids
    comma = tokenizer.get_vocab().get(",</w>")  # type: ignore[attr-defined]
    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1  # the position of the current chunk's last comma
    for token in tokens:
        # The same tests in the same order as sd_hijack_clip.py's tokenize_line (a comma at the boundary
        # opens the next chunk; it is only the tokens after a comma that move).
        if token == comma:
            last_comma = len(chunk)
        elif len(chunk) == CLIP_WINDOW and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
            chunks.append(chunk[: last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1 :], -1
        if len(chunk) == CLIP_WINDOW:
            chunks.append(chunk)
            chunk, last_comma = [], -1
        chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def chunk_input_ids(tokenizer: object, chunks: list[list[int]], num_chunks: int) -> torch.Tensor:
    """long [num_chunks, 77]: each chunk as <BOS> tokens <EOS> and the tokenizer's pad, which is what the
    tokenizer itself gives for the chunk's text with padding="max_length" (so a prompt of one chunk gets the
    ids diffusers' pipelines encode); empty chunks after the last (A1111's padding of the shorter of prompt
    and negative prompt)."""
    bos, eos, pad = (
        tokenizer.bos_token_id,  # type: ignore[attr-defined]
        tokenizer.eos_token_id,  # type: ignore[attr-defined]
        tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )
    padded = chunks + [[]] * (num_chunks - len(chunks))
    rows = [[bos, *chunk, eos] + [pad] * (CLIP_WINDOW - len(chunk)) for chunk in padded]
    return torch.tensor(rows, dtype=torch.long)
