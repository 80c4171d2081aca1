"""TextEncoderCache: one encoding per unique caption, batches equal direct encoding, unknown captions."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from lora_scripts.data.text_cache import TextEncoderCache

LENGTH = 8


@pytest.fixture(scope="module")
def text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=LENGTH,
        vocab_size=128,
        projection_dim=16,
    )
    return CLIPTextModel(config).eval()


class CountingEncoder:
    """A family-style encode (captions -> {name: [B, ...]}), tokenizing by char codes, recording calls."""

    def __init__(self, model: CLIPTextModel):
        self.model = model
        self.calls: list[list[str]] = []

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append(list(captions))
        ids = torch.zeros(len(captions), LENGTH, dtype=torch.long)
        for row, caption in enumerate(captions):
            codes = [ord(c) % 128 for c in caption[:LENGTH]]
            ids[row, : len(codes)] = torch.tensor(codes)
        out = self.model(ids)
        return {"encoder_hidden_states": out.last_hidden_state, "pooled": out.pooler_output}


CAPTIONS = ["a cat", "a dog", "a cat", "tree", "a dog", "sky", "a cat"]


def test_each_unique_caption_is_encoded_once(text_encoder: CLIPTextModel) -> None:
    encoder = CountingEncoder(text_encoder)
    cache = TextEncoderCache.build(CAPTIONS, encoder, batch_size=3, disable_progress=True)
    assert len(cache) == 4
    assert encoder.calls == [["a cat", "a dog", "tree"], ["sky"]]
    cache.batch(CAPTIONS, torch.device("cpu"))
    assert len(encoder.calls) == 2  # batch() never encodes


def test_batch_equals_direct_encoding(text_encoder: CLIPTextModel) -> None:
    encoder = CountingEncoder(text_encoder)
    cache = TextEncoderCache.build(CAPTIONS, encoder, batch_size=2, disable_progress=True)
    wanted = ["sky", "a cat", "a cat", "tree"]
    got = cache.batch(wanted, torch.device("cpu"))
    with torch.no_grad():
        direct = encoder(wanted)
    assert got.keys() == direct.keys()
    assert got["encoder_hidden_states"].shape == (4, LENGTH, 16)
    assert got["pooled"].shape == (4, 16)
    for name in direct:
        torch.testing.assert_close(got[name], direct[name], atol=1e-6, rtol=1e-6)
        assert not got[name].requires_grad


def test_entries_do_not_share_the_batch_storage(text_encoder: CLIPTextModel) -> None:
    batches: list[dict[str, torch.Tensor]] = []

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        batches.append(CountingEncoder(text_encoder)(captions))
        return batches[-1]

    cache = TextEncoderCache.build(["a", "b"], encode, disable_progress=True)
    before = cache.batch(["b"], torch.device("cpu"))["pooled"].clone()
    batches[0]["pooled"].zero_()  # the encoder's own batch tensor is reused or freed later
    assert torch.equal(cache.batch(["b"], torch.device("cpu"))["pooled"], before)


def test_unknown_caption_is_a_value_error(text_encoder: CLIPTextModel) -> None:
    cache = TextEncoderCache.build(["a cat"], CountingEncoder(text_encoder), disable_progress=True)
    assert "a cat" in cache and "a dog" not in cache
    with pytest.raises(ValueError, match="'a dog' is not in the text encoder cache.*static captions"):
        cache.batch(["a cat", "a dog"], torch.device("cpu"))


def test_wrong_batch_size_from_encode_is_rejected() -> None:
    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": torch.zeros(1, 4)}

    with pytest.raises(ValueError, match="for 1 captions, not 2"):
        TextEncoderCache.build(["a", "b"], encode, disable_progress=True)
