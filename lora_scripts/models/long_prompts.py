"""Captions longer than CLIP's 75 tokens, read in chunks: sd-scripts' `max_token_length` (150 or 225).

CLIP has 77 positions (<BOS>, 75 tokens, <EOS>). sd-scripts tokenizes a caption to max_token_length + 2
ids, cuts them into chunks of 75, wraps each chunk as its own 77-id sequence, encodes the chunks separately
and joins the hidden states again: the first chunk's <BOS> state, every chunk's 75 token states, the last
chunk's final state (library/strategy_base.py `_get_input_ids`, strategy_sdxl.py `_get_hidden_states_sdxl`).
We reproduce that exactly, so a LoRA trained with max_token_length 150 here sees what it would there.
"""

from __future__ import annotations

import torch

CLIP_WINDOW = 75  # tokens between <BOS> and <EOS>


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
