"""max_token_length 75 / 150 / 225 (models/long_prompts.py) against sd-scripts' algorithm, restated here from
library/strategy_base.py `TokenizeStrategy._get_input_ids` and library/strategy_sdxl.py
`SdxlTextEncodingStrategy._get_hidden_states_sdxl` (kohya-ss/sd-scripts; not imported), on the CLIP tokenizer
we ship, padded with <|endoftext|> (CLIP ViT-L, SD 1.x) and with "!" (OpenCLIP: SD 2.x, SDXL's tokenizer_2;
sd-scripts sets its pad id to 0, which is "!")."""

from __future__ import annotations

import pytest
import torch

from lora_scripts.models.long_prompts import chunked_input_ids, join_chunks
from lora_scripts.models.sd_loading import clip_tokenizer

BOS, EOS, BANG = 49406, 49407, 0
WORDS = ["cat", "dog", "red", "blue", "sky", "tree", "house", "car"]  # one token each
# Token counts around every chunk boundary: empty, short, a full first chunk (75), one over it, a full
# second (150), one over, a full third (225) and more than fits (cut at 225).
LENGTHS = [0, 3, 74, 75, 76, 149, 150, 151, 224, 225, 240]


def caption(tokens: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["pad_eos", "pad_bang"])
def tokenizer(request):
    return clip_tokenizer(request.param)


def sd_scripts_input_ids(tokenizer, text: str, max_token_length: int) -> torch.Tensor:
    """`_get_input_ids(tokenizer, text, max_length)` with sd-scripts' max_length (SdxlTokenizeStrategy:
    model_max_length without --max_token_length, else max_token_length + 2): [n, 77] (n = 1 for 75)."""
    max_length = tokenizer.model_max_length if max_token_length == 75 else max_token_length + 2
    input_ids = tokenizer(
        text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids
    if max_length > tokenizer.model_max_length:
        input_ids = input_ids.squeeze(0)
        iids_list = []
        if tokenizer.pad_token_id == tokenizer.eos_token_id:  # "v1": <BOS> ... <EOS> <EOS> <EOS>
            for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
                ids_chunk = (
                    input_ids[0].unsqueeze(0),
                    input_ids[i : i + tokenizer.model_max_length - 2],
                    input_ids[-1].unsqueeze(0),
                )
                iids_list.append(torch.cat(ids_chunk))
        else:  # "v2 or SDXL": <BOS> ... <EOS> <PAD> <PAD> ...
            for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
                ids_chunk = (
                    input_ids[0].unsqueeze(0),
                    input_ids[i : i + tokenizer.model_max_length - 2],
                    input_ids[-1].unsqueeze(0),
                )
                ids_chunk = torch.cat(ids_chunk)
                # ends with "x <PAD/EOS>": make the last <EOS>
                if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                    ids_chunk[-1] = tokenizer.eos_token_id
                # starts with "<BOS> <PAD> ...": make it "<BOS> <EOS> <PAD> ..."
                if ids_chunk[1] == tokenizer.pad_token_id:
                    ids_chunk[1] = tokenizer.eos_token_id
                iids_list.append(ids_chunk)
        input_ids = torch.stack(iids_list)
    return input_ids


def sd_scripts_join(hidden: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """`_get_hidden_states_sdxl`'s re-assembly: [B * n, 77, C] → [B, n * 75 + 2, C] (n = 1: [B, 77, C])."""
    hidden = hidden.reshape((batch, -1, hidden.shape[-1]))
    if n == 1:
        return hidden
    max_token_length = n * 77  # input_ids.size()[1] * input_ids.size()[2] there
    states_list = [hidden[:, 0].unsqueeze(1)]  # <BOS>
    for i in range(1, max_token_length, 77):
        states_list.append(hidden[:, i : i + 77 - 2])  # after <BOS>, up to before the last
    states_list.append(hidden[:, -1].unsqueeze(1))  # <EOS> or <PAD>
    return torch.cat(states_list, dim=1)


def test_words_are_one_token_each(tokenizer):
    assert tokenizer(caption(9)).input_ids == [BOS, 2368, 1929, 736, 1746, 2390, 2677, 1212, 1615, 2368, EOS]


@pytest.mark.parametrize("max_token_length", [75, 150, 225])
def test_chunked_ids_equal_sd_scripts(tokenizer, max_token_length):
    captions = [caption(n) for n in LENGTHS]
    ours = chunked_input_ids(tokenizer, captions, max_token_length)
    chunks = max_token_length // 75
    assert ours.shape == (len(captions), chunks, 77) and ours.dtype == torch.long
    theirs = torch.stack([sd_scripts_input_ids(tokenizer, text, max_token_length) for text in captions])
    for row, tokens in enumerate(LENGTHS):
        assert torch.equal(ours[row], theirs[row]), f"{tokens} tokens"


def test_chunk_ends_for_each_pad(tokenizer):
    pad = tokenizer.pad_token_id
    ids = chunked_input_ids(tokenizer, [caption(76), caption(3)], 150)
    text = tokenizer(caption(76), add_special_tokens=False).input_ids
    # 76 tokens: the first chunk is full, the second holds one token
    assert ids[0, 0].tolist() == [BOS, *text[:75], EOS]  # "x <PAD>" became <EOS> where pad is "!"
    assert ids[0, 1, :3].tolist() == [BOS, text[75], EOS]
    assert ids[0, 1, 3:].tolist() == [pad] * 74
    # 3 tokens: the second chunk is empty: <BOS> <EOS> <PAD> ... either way
    assert ids[1, 0, :5].tolist() == [BOS, 2368, 1929, 736, EOS]
    assert ids[1, 1].tolist() == [BOS, EOS] + [pad] * 75


def test_one_chunk_is_the_plain_tokenization(tokenizer):
    captions = [caption(n) for n in LENGTHS]
    plain = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert torch.equal(chunked_input_ids(tokenizer, captions, 75), plain.input_ids.unsqueeze(1))
    # The first chunk of a longer reading is the plain 77-token cut too (what the pooled embedding sees).
    for max_token_length in (150, 225):
        first = chunked_input_ids(tokenizer, captions, max_token_length)[:, 0]
        assert torch.equal(first, plain.input_ids), max_token_length


@pytest.mark.parametrize("bad", [0, 76, 100, 300])
def test_other_lengths_are_refused(tokenizer, bad):
    with pytest.raises(ValueError, match=f"max_token_length must be 75, 150 or 225, got {bad}"):
        chunked_input_ids(tokenizer, ["a"], bad)


def labelled_hidden(batch: int, n: int) -> torch.Tensor:
    """[B * n, 77, 2] whose row (caption b, chunk c, position p) holds (b * 1000 + c * 100 + p, -that)."""
    b, c, p = torch.meshgrid(torch.arange(batch), torch.arange(n), torch.arange(77), indexing="ij")
    label = (b * 1000 + c * 100 + p).reshape(batch * n, 77).float()
    return torch.stack([label, -label], dim=-1)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_join_chunks_keeps_bos_the_token_states_and_the_last_state(n):
    batch = 3
    hidden = labelled_hidden(batch, n)
    joined = join_chunks(hidden, n)
    assert joined.shape == (batch, 77 if n == 1 else n * 75 + 2, 2)
    assert torch.equal(joined, sd_scripts_join(hidden, batch, n))
    for b in range(batch):
        if n == 1:
            kept = [(0, p) for p in range(77)]
        else:  # the first chunk's <BOS>, positions 1..75 of each chunk, the last chunk's position 76
            kept = [(0, 0), *[(c, p) for c in range(n) for p in range(1, 76)], (n - 1, 76)]
        assert joined[b, :, 0].tolist() == [b * 1000 + c * 100 + p for c, p in kept]
        assert torch.equal(joined[b, :, 1], -joined[b, :, 0])


def test_join_chunks_keeps_the_autograd_graph():
    hidden = labelled_hidden(2, 2).requires_grad_(True)
    join_chunks(hidden, 2).sum().backward()
    used = hidden.grad[..., 0].reshape(2, 2, 77)
    assert used[:, 0, 0].tolist() == [1.0, 1.0] and used[:, 1, 0].tolist() == [0.0, 0.0]  # 2nd <BOS> dropped
    assert used[:, 0, 76].tolist() == [0.0, 0.0] and used[:, 1, 76].tolist() == [1.0, 1.0]  # 1st end dropped
    assert int(used.sum()) == 2 * 152
