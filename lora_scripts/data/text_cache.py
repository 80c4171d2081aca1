"""Cache of text-encoder outputs by caption, for runs whose text encoders are frozen and captions static.

sd-scripts' `cache_text_encoder_outputs` does the same for SDXL; here it works for any family, since the
family's conditioning is just a dict of tensors per caption. Each unique caption is encoded once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class TextEncoderCache:
    """Conditioning (the family's dict of tensors for one caption) by caption, computed once per caption.

    Each entry maps a name (e.g. "encoder_hidden_states") to that caption's tensor without the batch axis,
    e.g. float32 [77, 768], kept on CPU.
    """

    def __init__(self, entries: dict[str, dict[str, torch.Tensor]]):
        self._entries = entries

    @classmethod
    def build(
        cls,
        captions: Iterable[str],
        encode: Callable[[list[str]], dict[str, torch.Tensor]],
        *,
        batch_size: int = 8,
        disable_progress: bool = False,
    ) -> TextEncoderCache:
        """Encode each unique caption of `captions` once, `batch_size` at a time, under torch.no_grad().

        encode: list of B captions -> {name: tensor [B, ...]} (the family's `encode_prompts`).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unique = list(dict.fromkeys(captions))
        entries: dict[str, dict[str, torch.Tensor]] = {}
        desc = "caching text encoder outputs"
        with tqdm(total=len(unique), desc=desc, unit="caption", disable=disable_progress) as bar:
            for start in range(0, len(unique), batch_size):
                batch = unique[start : start + batch_size]
                with torch.no_grad():
                    outputs = encode(batch)
                entries.update(_split_batch(batch, outputs))
                bar.update(len(batch))
        logger.info("text encoder cache: %d unique captions encoded", len(entries))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, caption: object) -> bool:
        return caption in self._entries

    def batch(self, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The conditioning of `captions`: {name: tensor [B, ...]} stacked in order, on `device`.

        A caption the cache was not built with is a ValueError: the cache only holds the dataset's captions
        as written, so per-step caption changes (shuffle, dropout, tag keeping) cannot use it.
        """
        if not captions:
            raise ValueError("TextEncoderCache.batch needs at least one caption")
        unknown = [caption for caption in captions if caption not in self._entries]
        if unknown:
            raise ValueError(
                f"caption {unknown[0]!r} is not in the text encoder cache; the cache was built for static "
                "captions, so it cannot serve captions changed per step (shuffle, dropout, augmentation)"
            )
        names = self._entries[captions[0]].keys()
        return {
            name: torch.stack([self._entries[caption][name] for caption in captions]).to(device)
            for name in names
        }


def _split_batch(batch: list[str], outputs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{caption: {name: its own CPU copy of row i}} from encoder outputs {name: [B, ...]}."""
    for name, tensor in outputs.items():
        if tensor.shape[0] != len(batch):
            raise ValueError(f"encode returned {name} for {tensor.shape[0]} captions, not {len(batch)}")
    # clone: a slice would keep the whole batch's storage alive.
    return {
        caption: {name: tensor[i].detach().cpu().clone() for name, tensor in outputs.items()}
        for i, caption in enumerate(batch)
    }
